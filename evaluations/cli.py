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
    p.add_argument("--data", help="data folder (else $GFMFR_DATA, else each config's data.path)")
    p.add_argument("--out", required=True, help="output folder for the runs and the tables")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override applied to every config (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from evaluations.compare import run_compare, write_tables

    rows = run_compare(args.configs, args.seeds, out_dir=args.out, data=args.data, overrides=args.overrides, progress=not args.quiet)
    command = "gfmfr-secure " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    md, csv_path = write_tables(rows, args.out, command=command)
    print(md.read_text(encoding="utf-8"))
    print(f"tables: {md} {csv_path}")
    return 0
