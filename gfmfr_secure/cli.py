"""The ``gfmfr-secure`` command line.

Subcommands are registered, not chosen by an if/elif ladder: a function
decorated with :func:`register_command` adds its subparser, and every module in
:data:`PLUGIN_MODULES` that is present is imported and its
``register(subparsers)`` called. Each subparser sets ``handler`` to a function
``(args) -> int``.

Errors raised by the library (:class:`gfmfr_secure.errors.GfmfrError`) are
printed as ``error: <message>`` with exit status 2; anything else is a bug and
propagates with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gfmfr_secure
from gfmfr_secure.config import (
    DATA_ENV_VAR,
    DataConfig,
    EvalConfig,
    load_config,
    resolve_data_folder,
    resolve_data_path,
    with_overrides,
)
from gfmfr_secure.errors import GfmfrError

__all__ = ["COMMANDS", "PLUGIN_MODULES", "build_parser", "main", "register_command"]

# argparse exposes no public name for the object add_subparsers() returns.
if typing.TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction
CommandRegistrar = Callable[[Subparsers], None]

#: Built-in subcommands: name -> function adding its subparser.
COMMANDS: dict[str, CommandRegistrar] = {}

#: Optional modules that add subcommands through ``register(subparsers)``;
#: each is imported only when its file exists.
PLUGIN_MODULES: tuple[str, ...] = (
    "gfmfr_secure.encoders.cli",
    "gfmfr_secure.privacy.cli",
    "evaluations.cli",
    "evaluations.sweep_cli",
    "attacks.cli",
)


def register_command(name: str) -> Callable[[CommandRegistrar], CommandRegistrar]:
    """Decorator adding ``fn(subparsers)`` to :data:`COMMANDS` under ``name``.

    Raises
    ------
    ValueError
        If ``name`` is already registered (the known names are listed).
    """

    def decorate(fn: CommandRegistrar) -> CommandRegistrar:
        if name in COMMANDS:
            raise ValueError(
                f"command {name!r} is already registered; known: {', '.join(sorted(COMMANDS))}"
            )
        COMMANDS[name] = fn
        return fn

    return decorate


class CommandError(GfmfrError):
    """A command was given arguments it cannot work with."""


def _add_parser(
    subparsers: Subparsers, name: str, summary: str, description: str, example: str
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog="example:\n  " + example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --------------------------------------------------------------------------- output helpers


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Aligned table of ``NAME@k`` metrics: one row per metric, one column per k.

    Keys without ``@`` (such as ``users``) are left out.
    """
    names: list[str] = []
    ks: list[str] = []
    for key in metrics:
        if "@" not in key:
            continue
        name, k = key.split("@", 1)
        if name not in names:
            names.append(name)
        if k not in ks:
            ks.append(k)
    if not names:
        return "(no metrics)"
    width = max(len(n) for n in names)
    lines = [" " * width + "".join(f"{'@' + k:>10}" for k in ks)]
    for name in names:
        cells = []
        for k in ks:
            value = metrics.get(f"{name}@{k}")
            cells.append(f"{value:>10.4f}" if isinstance(value, (int, float)) else f"{'-':>10}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, dotted + "."))
        else:
            rows.append((dotted, value))
    return rows


def format_key_values(mapping: Mapping[str, Any]) -> str:
    """Aligned ``key  value`` lines; nested mappings become dotted keys."""
    rows = _flatten(mapping)
    if not rows:
        return "(empty)"
    width = max(len(k) for k, _ in rows)
    out = []
    for key, value in rows:
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        out.append(f"{key:<{width}}  {text}")
    return "\n".join(out)


def _json_text(obj: Any) -> str:
    return json.dumps(
        obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)
    )


# --------------------------------------------------------------------------- data helpers


def _load_split(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the dataset named by ``args`` and split it leave-one-out."""
    from gfmfr_secure.data import leave_one_out, load_dataset

    data = load_dataset(resolve_data_folder(args.data), fmt=args.format, duplicates=args.duplicates)
    split = leave_one_out(data, args.min_interactions)
    return data, split


def _choices(section: type, key: str) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` config field (one source for config and flags)."""
    return typing.get_args(typing.get_type_hints(section)[key])


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    defaults = DataConfig()
    parser.add_argument("--data", metavar="PATH", help=f"data folder or interactions .csv file (default: ${DATA_ENV_VAR})")
    parser.add_argument(
        "--format",
        default=defaults.format,
        choices=_choices(DataConfig, "format"),
        help="layout of the data folder (default: %(default)s)",
    )
    parser.add_argument(
        "--duplicates",
        default=defaults.duplicates,
        choices=_choices(DataConfig, "duplicates"),
        help="what to do with repeated (user, item) pairs (default: %(default)s)",
    )
    parser.add_argument(
        "--min-interactions",
        type=int,
        default=defaults.min_interactions,
        metavar="N",
        help="smallest history that gets a validation item (default: %(default)s)",
    )


# --------------------------------------------------------------------------- train


@register_command("train")
def _register_train(subparsers: Subparsers) -> None:
    p = _add_parser(
        subparsers,
        "train",
        "train a federated recommender and write a run folder",
        "Load a YAML config, apply --set overrides, train, evaluate and write a run folder\n"
        "(config.yaml, run.json, log.txt, metrics.json, history.json, curve.png and, unless\n"
        "--no-keep-model, model.pt). The folder appears under its final name only when the\n"
        "run completes; until then it is OUT/.NAME.partial-XXXXXXXX and holds a checkpoint\n"
        "of the last finished round. If the run is stopped (Ctrl-C, a crash, a killed job),\n"
        "'train --resume' on that folder continues it and ends as the uninterrupted run would:\n"
        "bit for bit with secrets: reproducible or without DP; with secrets: os and DP the\n"
        "rounds after the checkpoint draw fresh noise (same epsilon). Data folder\n"
        f"precedence: --data > ${DATA_ENV_VAR} > data.path.",
        "gfmfr-secure train --config configs/gfmfr.yaml --data ../shared/datasets/ml-100k-mm "
        "--set train.rounds=5 --seed 1\n"
        "  gfmfr-secure train --resume runs/.gfmfr-20250101T120000Z-seed1.partial-1a2b3c4d",
    )
    p.add_argument("--config", metavar="FILE", help="YAML experiment config (required unless --resume)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its checkpoint: its partial folder "
        "OUT/.NAME.partial-XXXXXXXX, or OUT/NAME when that run has one partial folder. The "
        "config, seed and data come from the folder, so --config, --set, --seed, --data, "
        "--name and --out are errors with it",
    )
    p.add_argument(
        "--data", metavar="PATH", help=f"data folder or interactions .csv file (overrides ${DATA_ENV_VAR} and data.path)"
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="parent folder of run folders (default: runs)",
    )
    p.add_argument("--seed", type=int, metavar="N", help="root seed (overrides the config)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.rounds=5 (repeatable)",
    )
    p.add_argument("--name", help="run folder name (default: <method>-<UTC time>-seed<seed>)")
    p.add_argument(
        "--keep-model",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write model.pt, the selected model that 'evaluate --run' reads (about 100 MB on "
        "ML-100K); on by default for train (sweep cells do not write it); with --resume: the "
        "interrupted run's choice",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="save a checkpoint after every N rounds (default: 1; 0: none, the run cannot be "
        "resumed; the centralized method writes none); with --resume: the interrupted run's value",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or console log")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from gfmfr_secure.simulation.record import resume_and_record, train_and_record

    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise CommandError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    command = ["gfmfr-secure", *args.command_line]
    if args.resume is not None:
        given = [
            flag
            for flag, value in (
                ("--config", args.config),
                ("--set", args.overrides),
                ("--seed", args.seed),
                ("--data", args.data),
                ("--name", args.name),
                ("--out", args.out),
            )
            if value not in (None, [])
        ]
        if given:
            raise CommandError(
                f"--resume continues a run with the config, seed and data stored in its folder: drop {', '.join(given)}"
            )
        metrics, run_dir = resume_and_record(
            args.resume,
            command=command,
            console=not args.quiet,
            progress=not args.quiet,
            keep_model=args.keep_model,
            checkpoint_every=args.checkpoint_every,
        )
    else:
        if args.config is None:
            raise CommandError("train needs --config FILE (or --resume RUN_DIR to continue a run)")
        cfg = load_config(args.config, args.overrides)
        if args.seed is not None:
            cfg = with_overrides(cfg, [f"seed={args.seed}"])
        cfg = resolve_data_path(cfg, args.data)
        metrics, run_dir = train_and_record(
            cfg,
            args.out or "runs",
            name=args.name,
            command=command,
            console=not args.quiet,
            progress=not args.quiet,
            keep_model=True if args.keep_model is None else args.keep_model,
            checkpoint_every=1 if args.checkpoint_every is None else args.checkpoint_every,
        )
    test = metrics.get("test", {})
    ks = [key.split("@", 1)[1] for key in test if key.startswith("HR@")] or ["10"]
    scores = " ".join(f"{name}@{k}={_fmt(test.get(f'{name}@{k}'))}" for name in ("HR", "NDCG") for k in ks)
    print(f"test {scores} run: {run_dir}")
    privacy = metrics.get("privacy") or {}
    if privacy.get("mechanism", "none") != "none":
        if privacy.get("epsilon") is not None:
            print(
                f"privacy: epsilon={privacy['epsilon']:.4g} delta={privacy.get('delta')} "
                f"({privacy.get('accountant')}, {privacy.get('mechanism')}, unit: {privacy.get('unit')})"
            )
        else:
            print(f"privacy: no epsilon holds for this run: {privacy.get('epsilon_withheld_because', 'sigma is 0')}")
    return 0


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


# --------------------------------------------------------------------------- evaluate


@register_command("evaluate")
def _register_evaluate(subparsers: Subparsers) -> None:
    p = _add_parser(
        subparsers,
        "evaluate",
        "full-ranking evaluation of a simple scorer or a finished run",
        "Rank every item for each user with a held-out item (training items masked; for\n"
        "the test split the validation item too; ties count against the model) and print\n"
        "HR, NDCG, Recall and MRR at each cut-off. Either --data with --scorer (a simple\n"
        "reference scorer on the leave-one-out split) or --run (a finished train run).",
        "gfmfr-secure evaluate --data ../shared/datasets/ml-100k-mm --scorer popularity",
    )
    p.add_argument("--run", metavar="RUN_DIR", help="folder written by 'train'")
    _add_data_options(p)
    from gfmfr_secure.references import REFERENCES
    from gfmfr_secure.references.ease import DEFAULT_LAMBDAS
    from gfmfr_secure.references.mf import MFSettings

    p.add_argument(
        "--scorer",
        choices=tuple(REFERENCES),
        help="reference scorer (with --data): popularity (training-interaction counts), random "
        "(uniform noise), ease (centralised EASE, lambda chosen on validation) or mf "
        "(centralised BPR matrix factorisation, epoch chosen on validation)",
    )
    p.add_argument(
        "--lambdas",
        type=float,
        nargs="+",
        metavar="L",
        help="ease: L2 weights to choose from on validation NDCG@10 "
        f"(default: {' '.join(f'{v:g}' for v in DEFAULT_LAMBDAS)})",
    )
    p.add_argument(
        "--mf-lr",
        type=float,
        nargs="+",
        metavar="LR",
        help=f"mf: Adam step size; several values are chosen from on validation (default: {MFSettings.lr:g})",
    )
    p.add_argument(
        "--mf-weight-decay",
        type=float,
        nargs="+",
        metavar="WD",
        help="mf: L2 weight per sampled pair; several values are chosen from on validation "
        f"(default: {MFSettings.weight_decay:g})",
    )
    p.add_argument(
        "--mf-epochs",
        type=int,
        metavar="N",
        help=f"mf: most full-batch epochs (default: {MFSettings.max_epochs})",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=("val", "test"),
        help="held-out item to rank (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the random and mf scorers (default: %(default)s)",
    )
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=list(EvalConfig().ks),
        metavar="K",
        help="cut-offs (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=_cmd_evaluate)


#: evaluate options that configure one reference scorer only: flag -> scorer
_SCORER_FLAGS = {
    "lambdas": ("--lambdas", "ease"),
    "mf_lr": ("--mf-lr", "mf"),
    "mf_weight_decay": ("--mf-weight-decay", "mf"),
    "mf_epochs": ("--mf-epochs", "mf"),
}


def _reference_options(args: argparse.Namespace, chunk: int) -> Any:
    """ReferenceOptions from the evaluate flags; a flag meant for another scorer is an error."""
    import dataclasses

    from gfmfr_secure.references import ReferenceOptions

    for attr, (flag, scorer) in _SCORER_FLAGS.items():
        if getattr(args, attr) is not None and args.scorer != scorer:
            raise CommandError(f"{flag} configures --scorer {scorer}, not {args.scorer}: drop it")
    options = ReferenceOptions(seed=args.seed, chunk_users=chunk)
    if args.lambdas is not None:
        options = dataclasses.replace(options, ease_lambdas=tuple(args.lambdas))
    if args.mf_lr is not None:
        options = dataclasses.replace(options, mf_lrs=tuple(args.mf_lr))
    if args.mf_weight_decay is not None:
        options = dataclasses.replace(options, mf_weight_decays=tuple(args.mf_weight_decay))
    if args.mf_epochs is not None:
        options = dataclasses.replace(options, mf=dataclasses.replace(options.mf, max_epochs=args.mf_epochs))
    return options


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from gfmfr_secure.metrics import evaluate_ranking

    chunk = EvalConfig().chunk_users
    if args.run is not None:
        if args.scorer is not None or args.data is not None:
            raise CommandError(
                "--run evaluates a trained run: do not combine it with --scorer/--data"
            )
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise CommandError(f"run folder {args.run!r} does not exist")
        config_file = run_dir / "config.yaml"
        if config_file.is_file():
            chunk = load_config(config_file).eval.chunk_users
        from gfmfr_secure.simulation.runner import load_scorer

        score_fn, split = load_scorer(run_dir)
        source, settings = f"run {run_dir}", {}
    else:
        if args.scorer is None:
            raise CommandError("evaluate needs --run RUN_DIR, or --scorer with --data DIR")
        from gfmfr_secure.references import build_reference

        options = _reference_options(args, chunk)
        _, split = _load_split(args)
        fit = build_reference(args.scorer, split, options)
        score_fn, settings = fit.score_fn, fit.settings
        source = f"{args.scorer} scorer"
    metrics: dict[str, Any] = evaluate_ranking(score_fn, split, which=args.split, ks=args.ks, chunk_size=chunk)
    if args.json:
        print(_json_text({**metrics, "settings": settings} if settings else metrics))
    else:
        print(f"{source}, split={args.split}, users={metrics['users']}")
        if settings:
            print(format_key_values(settings))
        print(format_metrics_table(metrics))
    return 0


# --------------------------------------------------------------------------- data


@register_command("data")
def _register_data(subparsers: Subparsers) -> None:
    p = _add_parser(
        subparsers,
        "data",
        "inspect a data folder",
        "Dataset utilities. 'data stats' loads a folder, splits it leave-one-out by\n"
        "timestamp and prints its statistics.",
        "gfmfr-secure data stats --data ../shared/datasets/ml-100k-mm",
    )
    inner = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    stats = _add_parser(
        inner,
        "stats",
        "dataset and split statistics",
        "Load the dataset, apply the leave-one-out split and print users, items,\n"
        "interactions, density and the split sizes as an aligned table (or JSON).",
        "gfmfr-secure data stats --data ../shared/datasets/ml-100k-mm --json",
    )
    _add_data_options(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(handler=_cmd_data_stats)


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from gfmfr_secure.data import describe

    data, split = _load_split(args)
    summary = describe(data, split)
    print(_json_text(summary) if args.json else format_key_values(summary))
    return 0


# --------------------------------------------------------------------------- configs


def _default_configs_dir() -> Path:
    """``./configs`` when it exists, else the ``configs`` folder beside the installed package."""
    here = Path("configs")
    return here if here.is_dir() else Path(gfmfr_secure.__file__).resolve().parent.parent / "configs"


def config_description(path: Path) -> str:
    """First sentence of a YAML file's leading comment block ('' when it has none)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(t for t in lines if t) + " "
    cut = text.find(". ")
    sentence = text[: cut + 1] if cut > 0 else text.strip()
    return sentence if len(sentence) <= 120 else sentence[:117].rstrip() + "..."


@register_command("configs")
def _register_configs(subparsers: Subparsers) -> None:
    p = _add_parser(
        subparsers,
        "configs",
        "list the preset configs and sweep specs with one line each",
        "List every YAML file under the configs folder (method presets, privacy and secure\n"
        "aggregation settings, attack-table columns, encoders, sweep specs) with the first\n"
        "sentence of its leading comment.",
        "gfmfr-secure configs",
    )
    p.add_argument("--dir", metavar="DIR", help="configs folder (default: ./configs, else the one beside the package)")
    p.set_defaults(handler=_cmd_configs)


def _cmd_configs(args: argparse.Namespace) -> int:
    root = Path(args.dir) if args.dir else _default_configs_dir()
    if not root.is_dir():
        raise CommandError(f"configs folder {str(root)!r} does not exist; pass --dir DIR")
    files = sorted(root.rglob("*.yaml"), key=lambda f: (len(f.relative_to(root).parts), str(f)))
    if not files:
        raise CommandError(f"no .yaml files under {str(root)!r}")
    names = [str(f.relative_to(root.parent) if args.dir is None else f) for f in files]
    width = max(len(n) for n in names)
    for name, f in zip(names, files, strict=True):
        print(f"{name:<{width}}  {config_description(f)}")
    return 0


# --------------------------------------------------------------------------- parser and entry point


def _module_exists(name: str) -> bool:
    """Whether module ``name`` can be imported, checking each parent package first."""
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        if importlib.util.find_spec(".".join(parts[:depth])) is None:
            return False
    return True


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered and plugin subcommand."""
    parser = argparse.ArgumentParser(
        prog="gfmfr-secure",
        description="Privacy-preserving multimodal federated recommendation (GFMFR) toolkit.",
        epilog="example:\n  gfmfr-secure train --config configs/gfmfr.yaml "
        "--data ../shared/datasets/ml-100k-mm --out runs/\n\n"
        "Run 'gfmfr-secure COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {gfmfr_secure.__version__}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS.values():
        register(subparsers)
    for module_name in PLUGIN_MODULES:
        if _module_exists(module_name):
            importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Parameters
    ----------
    argv : arguments without the program name (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = argv
    try:
        status: int = args.handler(args)
    except GfmfrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
