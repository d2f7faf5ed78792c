"""Per-round time, bytes per client and accuracy of GFMFR under each aggregation backend.

Runs a few rounds of GFMFR at the default config on ML-100K-mm (all 943 clients, G = 5)
with oblivious grouping, once per backend, in one process, and prints per round: client
training, the server side (aggregation protocol, FedAvg, fusion, teacher), the
aggregation cost the backend reports (bytes up and down per client, client and server
seconds) and the ratios to ``plain`` against the issue's targets (masking <= 2.0x the
plain round, CKKS <= 20x, CKKS upload <= 8x the plain bytes). Two plain baselines are
given for bytes: what plain clients actually send (their touched rows, sparse), and
plain carrying the same information as the secure backends (the dense group-indexed
layout in float32), which is the fair comparison and the one the target is about.

Accuracy check: every backend runs on the same seed with ``secrets: reproducible``
(mask seeds and the CKKS flooding key then derive from the seed, so reruns agree), and
the validation NDCG@10 of each round is printed beside plain's; both must stay within
1e-3 of plain. Masking's masks cancel exactly, but the values are summed in fixed point
(resolution 2^-14 at ``value_bound`` 8 and 943 summands), so its sums differ from plain's
float32 sums by rounding; CKKS's release also carries the flooding noise.

Besides the simulated round (every client's protocol work on this machine's cores), a
deployment estimate is printed: plain's round plus one client's protocol seconds plus
the server's, as when each client runs its own part on its own device in parallel. One
client's seconds include its check of the count phase (under ``masking`` a replay of the
phase's transcript, which the loop runs once for all clients; the signatures it finds
already verified in this process are charged at the time their verification took).

A one-round plain run warms up first (it compiles the fusion kernel), untimed. The
secure backends spread their simulated clients over the CPUs this process may use
(``GFMFR_WORKERS`` overrides the count); the load average is printed because the round
times are wall-clock (the CPU seconds of each run, children included, are printed beside
them: on a shared machine they move less with the load).

    python benchmarks/bench_secure_round.py --data ../shared/datasets/ml-100k-mm --backends plain masking ckks --rounds 2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import gfmfr_secure  # noqa: F401  (first: sets the OpenMP wait policy before torch loads OpenMP)

# isort: split
import torch

from gfmfr_secure.secagg.simulation import simulation_workers
from gfmfr_secure.config import load_config
from gfmfr_secure.simulation import loop
from gfmfr_secure.simulation.runner import prepare_data

#: backend -> (largest round time / plain's, largest upload / plain's dense float32 upload)
TARGETS = {"masking": (2.0, None), "ckks": (20.0, 8.0)}
#: backend -> largest |NDCG@10 - plain's| after every round
ACCURACY = {"masking": 1e-3, "ckks": 1e-3}


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the secure backends' workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def verdict(value: float, limit: float | None) -> str:
    return "" if limit is None else f" (target <= {limit:g}: {'met' if value <= limit else 'NOT met'})"


def keystream_floor(cfg: object, n_users: int, dim: int, plain_s: float) -> str:
    """The AES-CTR keystream a simulated masking round must generate, timed here, against plain's round.

    Each pair mask is expanded once for both endpoints (n k / 2 pairs under SecAgg+, n (n - 1) / 2
    on the complete graph), plus each client's self mask and the server's re-expansion of it.
    """
    from gfmfr_secure.secagg.masking.primitives import Keystream

    n = max(1, round(cfg.train.client_fraction * n_users))
    k = cfg.aggregation.neighbours
    pairs = n * k // 2 if 0 < k < n - 1 else n * (n - 1) // 2
    expansions = pairs + 2 * n
    stream, key = Keystream(dim), os.urandom(32)
    stream.fill(key)
    t0 = time.perf_counter()
    for _ in range(20):
        stream.fill(key)
    per_fill = (time.perf_counter() - t0) / 20
    workers = simulation_workers()
    floor = expansions * per_fill / workers
    return (
        f"masking keystream floor: {expansions:,} expansions of {dim:,} words ({expansions * 4 * dim / 1e9:.1f} GB), "
        f"{per_fill * 1e3:.2f} ms each here: {floor:.2f} s on {workers} workers = x{floor / plain_s:.2f} plain's round "
        f"before anything else a masking round does"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("GFMFR_DATA", "../shared/datasets/ml-100k-mm"))
    ap.add_argument("--config", default="configs/gfmfr.yaml")
    ap.add_argument("--backends", nargs="+", default=["plain", "masking", "ckks"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--secrets", choices=["reproducible", "os"], default="reproducible", help="reproducible: the accuracy check compares like with like")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = [
        f"data.path={args.data}",
        f"train.rounds={args.rounds}",
        "train.patience=0",
        "grouping.method=oblivious",
        f"secrets={args.secrets}",
        *args.overrides,
    ]
    cfg0 = load_config(args.config, base)
    data, split = prepare_data(cfg0)
    print(f"{os.cpu_count()} CPUs, secure backends on {simulation_workers()} workers (masking: threads, ckks: processes); load average {os.getloadavg()[0]:.1f}")
    # warm-up, not timed: the first run pays for compiling the fusion kernel and filling caches
    loop.run_federated(load_config(args.config, [*base, "train.rounds=1", "aggregation.backend=plain"]), data, split, progress=False)
    rows = {}
    for backend in args.backends:
        cfg = load_config(args.config, [*base, f"aggregation.backend={backend}"])
        cpu0 = cpu_seconds()
        run = loop.run_federated(cfg, data, split, progress=False)
        cpu = (cpu_seconds() - cpu0) / args.rounds
        hist = run.history
        per_round = sum(h["client_s"] + h["server_s"] for h in hist) / len(hist)
        cost = run.metrics["cost"]
        ndcg = [h["val"]["NDCG@10"] for h in hist]
        rows[backend] = (per_round, cost, ndcg, cpu)
        print(
            f"{backend}: {per_round:.2f} s per round (client training {sum(h['client_s'] for h in hist) / len(hist):.2f} s; "
            f"{cpu:.1f} CPU s per round, validation included), "
            f"val NDCG@10 by round {', '.join(f'{v:.5f}' for v in ndcg)}; cost {', '.join(f'{k} {v:.4g}' for k, v in cost.items())}"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if "plain" not in rows:
        return 0
    p_time, p_cost, p_ndcg, p_cpu = rows["plain"]
    sparse = p_cost["bytes_up_per_client"]
    for backend, (secs, cost, ndcg, cpu) in rows.items():
        if backend == "plain":
            continue
        time_limit, bytes_limit = TARGETS.get(backend, (None, None))
        dense = cost.get("plain_dense_bytes_per_client", float("nan"))
        ratio = cost["bytes_up_per_client"] / dense
        print(
            f"{backend} / plain: time x{secs / p_time:.2f}{verdict(secs / p_time, time_limit)} (CPU x{cpu / p_cpu:.2f}); "
            f"bytes up x{ratio:.2f} vs plain with the same "
            f"information ({dense / 2**20:.2f} MiB dense float32){verdict(ratio, bytes_limit)}, "
            f"x{cost['bytes_up_per_client'] / sparse:.1f} vs plain's sparse upload ({sparse / 2**10:.0f} KiB)"
        )
        if "client_s" in cost and "server_s" in cost:
            # both phases of an oblivious round: the count phase's cost comes prefixed
            check_s = cost.get("count_phase_check_client_s", 0.0)
            client_s = cost["client_s"] + cost.get("count_phase_client_s", 0.0) + check_s
            server_s = cost["server_s"] + cost.get("count_phase_server_s", 0.0)
            deployed = p_time + client_s + server_s
            print(
                f"{backend} deployment estimate: plain's {p_time:.2f} s + one client's protocol {client_s:.3f} s "
                f"(its count check {check_s:.3f} s included) + the server's {server_s:.2f} s = {deployed:.2f} s per round (x{deployed / p_time:.2f})"
            )
        gap = max(abs(a - b) for a, b in zip(ndcg, p_ndcg, strict=True))
        limit = ACCURACY.get(backend)
        within = "" if limit is None else f" (required <= {limit:g}: {'met' if gap <= limit else 'NOT met'})"
        print(f"{backend} accuracy: largest |val NDCG@10 - plain's| over {len(ndcg)} rounds {gap:.2e}{within}")
    if "masking" in rows:
        print(keystream_floor(cfg0, data.n_users, int(rows["masking"][1]["plain_dense_bytes_per_client"]) // 4, p_time))
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
