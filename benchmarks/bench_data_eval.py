"""Time the data path and full-ranking evaluation on ML-100K-mm and a large synthetic set.

Stages, per dataset: load (generation for the synthetic set), leave-one-out
split, one round of negative sampling, and a full-ranking evaluation of every
user with a test item, scored by a random scorer. Prints seconds per stage and
memory: the process peak resident size after the stage (``ru_maxrss``, which
only grows) and, for the numpy-only stages (split, negatives), the peak of
Python-traced allocations during the stage (``tracemalloc``; numpy arrays are
traced, torch tensors are not). ``--trace-all`` traces every stage, which slows
the pandas loader several-fold.

Usage::

    python benchmarks/bench_data_eval.py                      # both datasets
    python benchmarks/bench_data_eval.py --skip-synthetic --data /path/to/ml-100k-mm
    python benchmarks/bench_data_eval.py --synthetic-users 20000 --synthetic-items 10000
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import gfmfr_secure  # noqa: F401  (first: sets the OpenMP wait policy before torch loads OpenMP)

# isort: split
import torch

from gfmfr_secure.data import (
    InteractionData,
    Split,
    leave_one_out,
    load_dataset,
    make_synthetic,
    sample_training,
)
from gfmfr_secure.rng import numpy_rng, torch_generator

_DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "ml-100k-mm"
_CHEAP_TO_TRACE = {"split", "negatives"}


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _timed(
    name: str, fn: Callable[[], Any], trace: bool, rows: list[dict[str, Any]], label: str
) -> Any:
    """Run ``fn`` once, append a result row, return its value."""
    traced = trace or name in _CHEAP_TO_TRACE
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    peak = None
    if traced:
        peak = tracemalloc.get_traced_memory()[1] / (1024 * 1024)
        tracemalloc.stop()
    rows.append(
        {
            "dataset": label,
            "stage": name,
            "seconds": seconds,
            "maxrss_mib": _maxrss_mib(),
            "traced_peak_mib": peak,
        }
    )
    print(
        f"  {label:<10} {name:<11} {seconds:9.3f} s   maxrss {_maxrss_mib():8.0f} MiB   "
        f"traced peak {'-' if peak is None else f'{peak:.0f} MiB'}",
        flush=True,
    )
    return value


def _random_scorer(n_items: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """score_fn(users [B]) -> uniform random scores [B, n_items] from a seeded generator."""
    gen = torch_generator(seed, "bench", "scores")

    def score_fn(users: torch.Tensor) -> torch.Tensor:
        return torch.rand(users.shape[0], n_items, generator=gen)

    return score_fn


def _run(
    label: str,
    load: Callable[[], InteractionData],
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
) -> None:
    data: InteractionData = _timed("load", load, args.trace_all, rows, label)
    print(
        f"  {label:<10} {'':<11} {data.n_users} users, {data.n_items} items, {data.n_interactions} interactions",
        flush=True,
    )
    split: Split = _timed("split", lambda: leave_one_out(data), args.trace_all, rows, label)
    samples = _timed(
        "negatives",
        lambda: sample_training(split, args.n_neg, numpy_rng(args.seed, "negatives", 0)),
        args.trace_all,
        rows,
        label,
    )
    print(
        f"  {label:<10} {'':<11} {len(samples)} training rows ({args.n_neg} negatives per positive)",
        flush=True,
    )
    del samples
    try:
        from gfmfr_secure.metrics import evaluate_ranking
    except ImportError as err:
        print(
            f"  {label:<10} evaluation skipped: gfmfr_secure.metrics.evaluate_ranking unavailable ({err})"
        )
        return
    scorer = _random_scorer(data.n_items, args.seed)
    result = _timed(
        "evaluate",
        lambda: evaluate_ranking(
            scorer, split, which="test", ks=(10, 20, 50), chunk_size=args.chunk_size
        ),
        args.trace_all,
        rows,
        label,
    )
    shown = ", ".join(
        f"{k}={v:.4f}" for k, v in result.items() if k in ("HR@10", "NDCG@10", "HR@50")
    )
    print(
        f"  {label:<10} {'':<11} random scorer: {shown} (users evaluated: {result.get('users')})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ["GFMFR_DATA"]) if os.environ.get("GFMFR_DATA") else _DEFAULT_DATA,
        help="ML-100K-mm folder (default: $GFMFR_DATA, else ../shared/datasets/ml-100k-mm)",
    )
    parser.add_argument("--synthetic-users", type=int, default=100_000)
    parser.add_argument("--synthetic-items", type=int, default=50_000)
    parser.add_argument(
        "--synthetic-mean", type=float, default=30.0, help="mean interactions per synthetic user"
    )
    parser.add_argument("--n-neg", type=int, default=4, help="negatives per positive")
    parser.add_argument("--chunk-size", type=int, default=1024, help="users per scoring call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--skip-ml", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument(
        "--trace-all", action="store_true", help="tracemalloc every stage (slows loading)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    rows: list[dict[str, Any]] = []
    if not args.skip_ml:
        if (args.data / "u.data").is_file():
            print(f"ML-100K-mm from {args.data}")
            _run("ml-100k", lambda: load_dataset(args.data), args, rows)
        else:
            print(f"ML-100K-mm skipped: no u.data in {args.data} (use --data or GFMFR_DATA)")
    if not args.skip_synthetic:
        u, i = args.synthetic_users, args.synthetic_items
        print(
            f"synthetic {u} users x {i} items (mean {args.synthetic_mean:g} interactions per user)"
        )
        _run(
            "synthetic",
            lambda: make_synthetic(u, i, mean_interactions=args.synthetic_mean, seed=args.seed),
            args,
            rows,
        )
    print("\ndataset    stage        seconds   maxrss MiB   traced peak MiB")
    for row in rows:
        peak = "-" if row["traced_peak_mib"] is None else f"{row['traced_peak_mib']:.0f}"
        print(
            f"{row['dataset']:<10} {row['stage']:<11} {row['seconds']:8.3f} {row['maxrss_mib']:12.0f} {peak:>17}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
