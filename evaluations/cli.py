"""``gfmfr-secure compare``: several configs x several seeds -> a results table."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare",
        help="run configs over seeds and write a mean/std table",
        description=(
            "Train each config once per seed (every run in its own folder under OUT/runs) and\n"
            "write OUT/results.md and OUT/results.csv with the mean and std of the test metrics\n"
            "(HR and NDCG at 10, 20, 50), plus OUT/results.json with every seed's figures."
        ),
        epilog="example:\n  gfmfr-secure compare configs/fedrap.yaml configs/gfmfr.yaml --seeds 0 1 2 \\\n      --data ../shared/datasets/ml-100k-mm --out results/baselines",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("configs", nargs="+", help="YAML config files, one table row each")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="root seeds (default: 0 1 2)")
    p.add_argument("--data", help="data folder or interactions .csv file (else $GFMFR_DATA, else each config's data.path)")
    p.add_argument("--out", required=True, help="output folder for the runs and the tables")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override applied to every config (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_compare)

    t = subparsers.add_parser(
        "tune",
        help="equal-budget grid search on validation, writes tuned configs",
        description=(
            "Run the same grid (same seed, same round budget) for every config, select each\n"
            "config's setting by validation NDCG@10, and write OUT/tuned/<config>.yaml plus\n"
            "OUT/tuning.md. The test split plays no part in the selection."
        ),
        epilog="example:\n  gfmfr-secure tune configs/fedrap.yaml configs/gfmfr.yaml --grid train.lr=0.002,0.01 \\\n      --set train.rounds=8 --data ../shared/datasets/ml-100k-mm --out results/tuning",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("configs", nargs="+", help="YAML config files")
    t.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis (repeatable)")
    t.add_argument("--seed", type=int, default=0, help="seed of every tuning run (default 0)")
    t.add_argument("--data", help="data folder or interactions .csv file (else $GFMFR_DATA, else each config's data.path)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override applied to every run (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(handler=_cmd_tune)


def _cmd_compare(args: argparse.Namespace) -> int:
    from evaluations.compare import run_compare, write_tables

    rows = run_compare(args.configs, args.seeds, out_dir=args.out, data=args.data, overrides=args.overrides, progress=not args.quiet)
    command = "gfmfr-secure " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    md, csv_path = write_tables(rows, args.out, command=command)
    print(md.read_text(encoding="utf-8"))
    print(f"tables: {md} {csv_path}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from evaluations.tune import tune

    report = tune(args.configs, args.grid, out_dir=args.out, data=args.data, overrides=args.overrides, seed=args.seed, progress=not args.quiet)
    print(report.read_text(encoding="utf-8"))
    return 0
