"""The ``budget`` subcommand: calibrate sigma for an epsilon, or epsilon for a sigma."""

from __future__ import annotations

import argparse
import math
import sys
import typing

from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy.accounting import ACCOUNTANTS, calibrate_noise, epsilon_for
from gfmfr_secure.privacy.plan import delta_warning

__all__ = ["format_budget_table", "register"]

if typing.TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

COLUMNS = ("epsilon", "sigma", "q", "rounds", "delta", "accountant")

DESCRIPTION = """\
Privacy budget of T rounds of a Poisson-subsampled Gaussian mechanism
(unit: one user; relation: add/remove one user), computed by an Opacus
accountant. With --epsilon, prints for each target the calibrated noise
multiplier sigma (noise std = sigma * clip) whose epsilon does not exceed it;
with --sigma, prints the epsilon each sigma reaches after T rounds. With
--users N it warns when --delta is not below 1/N."""

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
        "--users",
        type=int,
        metavar="N",
        help="number of users the guarantee covers: warn when --delta is not below 1/N",
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


def _check_flags(args: argparse.Namespace) -> None:
    """Validate the budget flags, naming each flag (not the library's parameter names)."""
    q, rounds, delta = args.sample_rate, args.rounds, args.delta
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"--sample-rate must be in (0, 1], got {q:g}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"--delta must be in (0, 1), got {delta:g}")
    if args.users is not None and args.users < 1:
        raise ConfigError(f"--users must be >= 1, got {args.users}")
    for target in args.epsilon or ():
        if math.isnan(target) or target <= 0.0:
            raise ConfigError(f"--epsilon values must be > 0 (inf allowed), got {target:g}")
    for sigma in args.sigma or ():
        if not (math.isfinite(sigma) and sigma >= 0.0):
            raise ConfigError(f"--sigma values must be finite and >= 0, got {sigma:g}")


def _calibrate(target: float, args: argparse.Namespace) -> float:
    """The calibrated sigma of one ``--epsilon`` target; an unreachable target names the flags."""
    try:
        return calibrate_noise(target, args.delta, args.sample_rate, args.rounds, args.accountant)
    except ConfigError as err:
        raise ConfigError(
            f"--epsilon {target:g} cannot be reached with --delta {args.delta:g}, "
            f"--sample-rate {args.sample_rate:g}, --rounds {args.rounds} ({args.accountant}): "
            "no noise multiplier is large enough; raise --epsilon or --delta, or lower "
            "--sample-rate or --rounds"
        ) from err


def _cmd_budget(args: argparse.Namespace) -> int:
    _check_flags(args)
    if args.users is not None:
        message = delta_warning(args.delta, args.users, name="--delta")
        if message is not None:
            print(f"warning: {message}", file=sys.stderr)
    common = {
        "q": float(args.sample_rate),
        "rounds": int(args.rounds),
        "delta": float(args.delta),
        "accountant": args.accountant,
    }
    rows: list[dict[str, float | int | str]] = []
    if args.epsilon is not None:
        for target in args.epsilon:
            sigma = _calibrate(target, args)
            rows.append({"epsilon": float(target), "sigma": sigma, **common})
    else:
        for sigma in args.sigma:
            eps = epsilon_for(sigma, args.sample_rate, args.rounds, args.delta, args.accountant)
            rows.append({"epsilon": eps, "sigma": float(sigma), **common})
    print(format_budget_table(rows))
    return 0
