"""Time one pairwise-mask secure-aggregation round (:func:`gfmfr_secure.secagg.masking.secure_sum`).

Random inputs in [-B, B] for ``n`` clients of ``D`` coordinates; ``--neighbours k`` gives a
SecAgg+ graph of degree k (default ``2 ceil(log2 n)``), ``--neighbours 0`` the complete graph.
The threshold defaults to a majority of the closed neighbourhood (``floor(|N[u]| / 2) + 1``).
Printed: wall time of ``secure_sum`` and its breakdown (mean per-client keygen / sharing /
masking time, server time), bytes sent and received per client against the ``4 D`` bytes of a
plain float32 upload, the fixed-point resolution and the largest error against a float64 sum.

Usage::

    python benchmarks/bench_masking.py --n 943 --dim 280000 --neighbours 20
    python benchmarks/bench_masking.py --n 100 --dim 280000 --neighbours 0
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time

import numpy as np

from gfmfr_secure.secagg.fixedpoint import max_sum_error, resolution
from gfmfr_secure.secagg.masking import neighbourhood_graph, secure_sum
from gfmfr_secure.secagg.simulation import simulation_workers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=943, help="number of clients")
    parser.add_argument("--dim", type=int, default=280_000, help="coordinates per client (D)")
    parser.add_argument(
        "--neighbours", type=int, default=None, help="SecAgg+ degree k (even); 0 = complete graph"
    )
    parser.add_argument("--threshold", type=int, default=None, help="Shamir threshold t")
    parser.add_argument(
        "--drop", type=float, default=0.0, help="fraction of clients dropping before upload"
    )
    parser.add_argument("--bound", type=float, default=1.0, help="value bound B")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="threads playing the clients (default: GFMFR_WORKERS or the usable CPUs)")
    args = parser.parse_args(argv)

    n, dim = args.n, args.dim
    k = 2 * math.ceil(math.log2(n)) if args.neighbours is None else (args.neighbours or None)
    size = neighbourhood_graph(n, k, args.seed).neighbourhood_size
    threshold = args.threshold if args.threshold is not None else size // 2 + 1
    rng = np.random.default_rng(args.seed)
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 64):  # float64 draws rounded to float32, in blocks to bound memory
        block = vectors[start : start + 64]
        block[:] = rng.uniform(-args.bound, args.bound, size=block.shape)
    n_drop = round(args.drop * n)
    dropped = tuple(int(u) for u in rng.choice(n, size=n_drop, replace=False))

    workers = simulation_workers() if args.workers is None else args.workers
    load = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = secure_sum(
        vectors,
        value_bound=args.bound,
        threshold=threshold,
        neighbours=k,
        seed=args.seed,
        dropped=dropped,
        workers=workers,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    c = result.costs
    alive = np.array(result.survivors)
    exact = np.zeros(dim)
    for u in result.survivors:
        exact += vectors[u]
    err = float(np.abs(result.total - exact).max())

    graph = "complete graph" if k is None or size == n else f"SecAgg+ k={k}"
    print(f"secure_sum: n={n} D={dim} {graph} t={threshold} (of |N[u]|={size}) dropped={n_drop} workers={workers}")
    print(
        f"  wall time                      {wall:9.2f} s  (CPU {cpu:.2f} s; load average before {load:.1f})"
    )
    print(
        f"  mean client time               {c.mean_client_s * 1e3:9.1f} ms  (keygen "
        f"{c.client_keygen_s[alive].mean() * 1e3:.2f} + sharing {c.client_share_s[alive].mean() * 1e3:.2f} "
        f"+ masking {c.client_mask_s[alive].mean() * 1e3:.1f} ms; unmask reply "
        f"{c.client_unmask_s[alive].mean() * 1e3:.2f} ms)"
    )
    print(
        f"  server setup / aggregate / unmask {c.server_setup_s:.2f} / {c.server_aggregate_s:.2f} / "
        f"{c.server_unmask_s:.2f} s"
    )
    up, down = c.bytes_up[alive], c.bytes_down[alive]
    print(
        f"  bytes up per client            {up.mean():,.0f} (min {up.min():,}, max {up.max():,}) "
        f"= {up.mean() / c.plain_bytes:.5f} x plain 4D={c.plain_bytes:,}"
    )
    print(
        f"  bytes down per client          {down.mean():,.0f} = {down.mean() / c.plain_bytes:.5f} x plain"
    )
    print(
        f"  fixed point                    f={result.frac_bits} resolution {resolution(result.frac_bits):.3g}, "
        f"max |error| {err:.3g} (bound {max_sum_error(len(alive), result.frac_bits):.3g})"
    )
    print(
        f"  peak RSS                       {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
