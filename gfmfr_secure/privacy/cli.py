"""The ``budget`` subcommand: calibrate sigma for an epsilon, or epsilon for a sigma."""

from __future__ import annotations

import argparse
import typing

from gfmfr_secure.privacy.accounting import ACCOUNTANTS, calibrate_noise, epsilon_for

__all__ = ["format_budget_table", "register"]

if typing.TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

COLUMNS = ("epsilon", "sigma", "q", "rounds", "delta", "accountant")

DESCRIPTION = """\
Privacy budget of T rounds of a Poisson-subsampled Gaussian mechanism
(unit: one user; relation: add/remove one user), computed by an Opacus
accountant. With --epsilon, prints for each target the calibrated noise
multiplier sigma (noise std = sigma * clip) whose epsilon does not exceed it;
with --sigma, prints the epsilon each sigma reaches after T rounds."""

EXAMPLE = (
    "gfmfr-secure budget --sample-rate 1.0 --rounds 100 --delta 1e-4 --epsilon 8 4 2 1\n"
    "  gfmfr-secure budget --sample-rate 0.01 --rounds 1000 --delta 1e-5 --sigma 1.0 --accountant prv"
)


def register(subparsers: Subparsers) -> None:
    """Add the ``budget`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "budget",
        help="epsilon <-> noise multiplier for T subsampled Gaussian rounds",
        description=DESCRIPTION,
        epilog="example:\n  " + EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sample-rate",
        type=float,
        required=True,
        metavar="Q",
        help="Poisson sampling rate q of users per round, in (0, 1]",
    )
    p.add_argument(
        "--rounds", type=int, required=True, metavar="T", help="number of rounds T (>= 1)"
    )
    p.add_argument(
        "--delta",
        type=float,
        required=True,
        metavar="D",
        help="target delta in (0, 1); below 1/number of users",
    )
    p.add_argument(
        "--accountant",
        choices=sorted(ACCOUNTANTS),
        default="rdp",
        help="Opacus accountant (default: rdp)",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--epsilon",
        type=float,
        nargs="+",
        metavar="E",
        help="target epsilons (inf allowed): print the calibrated sigma of each",
    )
    what.add_argument(
        "--sigma",
        type=float,
        nargs="+",
        metavar="S",
        help="noise multipliers: print the epsilon each reaches after T rounds",
    )
    p.set_defaults(handler=_cmd_budget)


def _fmt(value: float | str) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_budget_table(rows: list[dict[str, float | int | str]]) -> str:
    """Aligned table with one line per row and the columns of :data:`COLUMNS`."""
    cells = [list(COLUMNS)] + [[_fmt(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths)).rstrip() for line in cells
    )


def _cmd_budget(args: argparse.Namespace) -> int:
    common = {
        "q": float(args.sample_rate),
        "rounds": int(args.rounds),
        "delta": float(args.delta),
        "accountant": args.accountant,
    }
    rows: list[dict[str, float | int | str]] = []
    if args.epsilon is not None:
        for target in args.epsilon:
            sigma = calibrate_noise(
                target, args.delta, args.sample_rate, args.rounds, args.accountant
            )
            rows.append({"epsilon": float(target), "sigma": sigma, **common})
    else:
        for sigma in args.sigma:
            eps = epsilon_for(sigma, args.sample_rate, args.rounds, args.delta, args.accountant)
            rows.append({"epsilon": eps, "sigma": float(sigma), **common})
    print(format_budget_table(rows))
    return 0
