"""Per-round time and bytes per client of GFMFR under each aggregation backend.

Runs a few rounds of GFMFR at the default config on ML-100K-mm (all 943 clients, G = 5)
with oblivious grouping, once per backend, and prints per round: client training, the
server side (aggregation protocol, FedAvg, fusion, teacher), the aggregation cost the
backend reports (bytes up and down per client, client and server seconds) and the
ratios to ``plain``. Two plain baselines are given: what plain clients actually send
(their touched rows, sparse), and plain carrying the same information as the secure
backends (the dense group-indexed layout in float32), which is the fair comparison.

    python benchmarks/bench_secure_round.py --data ../shared/datasets/ml-100k-mm --backends plain masking ckks --rounds 2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

import gfmfr_secure  # noqa: F401  (first: sets the OpenMP wait policy before torch loads OpenMP)

# isort: split
import torch

from gfmfr_secure.config import load_config
from gfmfr_secure.simulation import loop
from gfmfr_secure.simulation.runner import prepare_data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("GFMFR_DATA", "../shared/datasets/ml-100k-mm"))
    ap.add_argument("--config", default="configs/gfmfr.yaml")
    ap.add_argument("--backends", nargs="+", default=["plain", "masking", "ckks"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = [f"data.path={args.data}", f"train.rounds={args.rounds}", "train.patience=0", "grouping.method=oblivious", *args.overrides]
    cfg0 = load_config(args.config, base)
    data, split = prepare_data(cfg0)
    rows = {}
    for backend in args.backends:
        cfg = load_config(args.config, [*base, f"aggregation.backend={backend}"])
        run = loop.run_federated(cfg, data, split, progress=False)
        hist = run.history
        per_round = sum(h["client_s"] + h["server_s"] for h in hist) / len(hist)
        cost = run.metrics["cost"]
        rows[backend] = (per_round, cost)
        print(f"{backend}: {per_round:.2f} s per round (client training {sum(h['client_s'] for h in hist) / len(hist):.2f} s), "
              f"val NDCG@10 last {hist[-1]['val']['NDCG@10']:.4f}; cost {', '.join(f'{k} {v:.4g}' for k, v in cost.items())}")
    if "plain" in rows:
        p_time, p_cost = rows["plain"]
        sparse = p_cost["bytes_up_per_client"]
        for backend, (secs, cost) in rows.items():
            if backend == "plain":
                continue
            dense = cost.get("plain_dense_bytes_per_client", float("nan"))
            print(f"{backend} / plain: time x{secs / p_time:.2f}; bytes up x{cost['bytes_up_per_client'] / dense:.2f} vs plain with the same "
                  f"information ({dense / 2**20:.2f} MiB dense float32), x{cost['bytes_up_per_client'] / sparse:.1f} vs plain's sparse upload "
                  f"({sparse / 2**10:.0f} KiB)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
