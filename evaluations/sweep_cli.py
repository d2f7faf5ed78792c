"""``gfmfr-secure sweep`` (a resumable grid of runs) and ``gfmfr-secure report`` (its tables and plots)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a privacy-utility grid (configs x axes x seeds), resumable, then write its report",
        description=(
            "Read a sweep spec (base configs, axes of config values, seeds, round budget, attacks,\n"
            "reference scorers), run every cell (configuration x seed) as a run folder under\n"
            "OUT/cells, and write OUT/report.md, OUT/results.csv, OUT/results.json and the plots.\n"
            "A cell's folder appears only once it is complete: re-running the same command skips\n"
            "finished cells and redoes interrupted ones. Presets: configs/sweeps/*.yaml."
        ),
        epilog="example:\n  gfmfr-secure sweep configs/sweeps/quick.yaml --out runs/quick --data ../shared/datasets/ml-100k-mm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", metavar="SPEC.yaml", help="sweep spec file")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (cells, tables, plots)")
    p.add_argument("--data", metavar="PATH", help="data folder or interactions .csv file (else $GFMFR_DATA, else the configs' data.path)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="cells run at once, each in its own process (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_sweep)

    r = subparsers.add_parser(
        "report",
        help="regenerate a sweep's tables and plots from its finished cells",
        description=(
            "Read the finished cells under DIR/cells (unfinished ones are left out) and write\n"
            "DIR/results.csv, DIR/results.json, DIR/report.md and the plots (PNG and SVG):\n"
            "utility against epsilon, attack success against epsilon, the privacy-utility\n"
            "frontier and the cost per aggregation backend."
        ),
        epilog="example:\n  gfmfr-secure report runs/quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("dir", metavar="DIR", help="output folder of a sweep")
    r.set_defaults(handler=_cmd_report)


def _command() -> str:
    return "gfmfr-secure " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""


def _cmd_sweep(args: argparse.Namespace) -> int:
    from evaluations.sweep import load_spec, run_sweep
    from evaluations.sweep_report import write_report

    spec = load_spec(args.spec)
    outcome = run_sweep(spec, args.out, data=args.data, jobs=args.jobs, progress=not args.quiet, command=["gfmfr-secure", *args.command_line])
    report = write_report(args.out, command=_command())
    print(f"sweep {spec.name}: {len(outcome.ran)} cells run, {len(outcome.skipped)} already finished, {len(outcome.cells)} in all")
    print(f"report: {report}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from evaluations.sweep_report import write_report

    report = write_report(args.dir, command=_command())
    print(f"report: {report}")
    return 0
