"""``gfmfr-secure sweep``: a resumable grid of training runs (configs x axes x seeds).

A sweep spec (YAML) names base config files, fixed overrides, axes (any dotted
config keys with a list of values), seeds, the round budget, the attacks to run
on recorded views and the reference scorers. Its cells are the Cartesian product
of the axes times the seeds; every cell is one run folder under ``OUT/cells``,
written through :func:`gfmfr_secure.runio.create_run`: it appears under its final
name, in one rename, only once training, evaluation and the attacks are done.

Resuming: a cell whose folder exists is finished and is skipped (its
``config.yaml`` must equal the config the spec gives now, else the sweep stops);
a killed cell leaves only a hidden ``.NAME.partial-XXXX`` folder, which the next
run deletes before redoing the cell. An exclusive lock on ``OUT/.sweep.lock``
keeps two sweeps from writing into one folder, and one per running cell
(``OUT/.locks/NAME.lock``) keeps a sweep from deleting the partial folder of a
worker that outlived an interrupted sweep.

Non-private cells: a cell whose ``privacy.epsilon`` is ``.inf`` runs with
``privacy.mechanism: none`` (a user-level mechanism needs a finite epsilon), so
``epsilon: [.inf, 8]`` x ``mechanism: [central, local]`` gives one non-private
cell per seed, the reference the private cells are compared with.

A ``method`` axis: each value also sets the ``model.backbone`` and
``distill.enabled`` its name implies in the runner's method registry, so
``method: [fedrap, gfmfr]`` over one base config gives two valid cells; any
other setting the methods differ in goes under ``set`` or its own axis.

A cell whose training diverges (``FloatingPointError``) is a result too: its
folder holds ``diverged.json`` instead of ``metrics.json``, and the report lists it.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import fcntl
import hashlib
import importlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gfmfr_secure.config import (
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    resolve_data_path,
    with_overrides,
)
from gfmfr_secure.errors import ConfigError, GfmfrError
from gfmfr_secure.runio import create_run, environment_info, utc_now

__all__ = [
    "CELLS_DIR",
    "CELL_FILE",
    "REFERENCE_NAMES",
    "AttackSpec",
    "Cell",
    "SweepError",
    "SweepSpec",
    "expand_cells",
    "load_spec",
    "run_sweep",
    "spec_from_dict",
]

#: folder of the cells' run folders, inside the sweep's output folder
CELLS_DIR = "cells"
#: file in each cell folder naming the cell (axis values, seed, label)
CELL_FILE = "cell.json"
#: reference scorers a spec may ask for (computed once per dataset)
REFERENCE_NAMES = ("popularity", "random", "ease", "mf")
_SPEC_KEYS = ("name", "base", "set", "axes", "exclude", "seeds", "rounds", "attacks", "references", "keep")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9.+-]+")


class SweepError(GfmfrError):
    """A sweep cannot start or go on: a bad spec, a locked or inconsistent output folder, a failed cell."""


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class AttackSpec:
    """Attacks run on each cell's recorded views.

    Attributes
    ----------
    round : int
        Round whose adversary views are recorded and attacked (>= 0, < the round budget).
    imia_clients : int
        Clients attacked with IMIA (slow); 0 skips IMIA.
    attribute_folds : int
        Outer cross-validation folds of the attribute inference (nested, so about a
        minute and a half per cell on ML-100K); 0 skips it.
    """

    round: int = 0
    imia_clients: int = 0
    attribute_folds: int = 0


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: what to train, over which values, with which seeds.

    Attributes
    ----------
    name : str
        Label of the sweep (report title).
    base : tuple of Path
        Config files merged in order (a later file's keys win); absolute paths.
    overrides : tuple of str
        ``dotted.key=value`` applied to every cell, after the base files.
    axes : tuple of (str, tuple)
        Dotted config key and its values, in spec order.
    exclude : tuple of dict
        Axis combinations not to run: a cell whose axis values match every pair of
        one entry is left out (e.g. ``{privacy.mechanism: central, aggregation.backend:
        masking}``, which the masking backend refuses).
    seeds : tuple of int
        Root seeds; every axis combination runs once per seed.
    rounds : int or None
        Round budget (``train.rounds`` of every cell); None keeps the base config's.
    attacks : AttackSpec or None
        Attacks on recorded views; None runs none.
    references : tuple of str
        Reference scorers fitted once on the training split (``popularity``, ``ease`` ...).
    keep_model, keep_views : bool
        Keep ``model.pt`` / the recorded ``views/`` in each cell folder (default: no,
        the report reads neither and they take 0.1-0.3 GB per cell on ML-100K).
    """

    name: str
    base: tuple[Path, ...]
    overrides: tuple[str, ...] = ()
    axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    exclude: tuple[Mapping[str, Any], ...] = ()
    seeds: tuple[int, ...] = (0,)
    rounds: int | None = None
    attacks: AttackSpec | None = None
    references: tuple[str, ...] = ("popularity", "ease")
    keep_model: bool = False
    keep_views: bool = False

    @property
    def axis_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.axes)


def _fail(key: str, problem: str, fix: str) -> SweepError:
    return SweepError(f"sweep spec key {key!r}: {problem}; {fix}")


def _as_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, f"expected an integer >= {minimum}, got {value!r}", f"write e.g. {key}: {max(minimum, 1)}")
    return value


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, f"expected true or false, got {value!r}", f"write {key}: false")
    return value


def _yaml_value(value: Any) -> str:
    """The text of ``value`` as an override reads it back (``.inf`` for infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def spec_from_dict(data: Any, source: str | Path = "<spec>", base_dir: str | Path = ".") -> SweepSpec:
    """Validate a parsed spec mapping; relative base paths are read from ``base_dir``.

    Raises
    ------
    SweepError
        Naming the offending key and how to fix it.
    """
    if not isinstance(data, dict):
        raise SweepError(f"sweep spec {str(source)!r} must be a mapping with keys {', '.join(_SPEC_KEYS)}")
    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        raise _fail(unknown[0], "unknown key", f"valid keys: {', '.join(_SPEC_KEYS)}")
    name = data.get("name", Path(str(source)).stem)
    if not isinstance(name, str) or not name:
        raise _fail("name", f"expected a non-empty string, got {name!r}", "write e.g. name: quick")

    base_raw = data.get("base")
    if isinstance(base_raw, str):
        base_raw = [base_raw]
    if not isinstance(base_raw, list) or not base_raw or not all(isinstance(b, str) for b in base_raw):
        raise _fail("base", f"expected a config file or a list of them, got {base_raw!r}", "write e.g. base: [../fedrap.yaml] (relative to the spec file)")
    base = []
    for entry in base_raw:
        path = Path(entry) if Path(entry).is_absolute() else Path(base_dir) / entry
        if not path.is_file():
            raise _fail("base", f"config file {entry!r} does not exist (looked for {str(path)!r})", "give a path relative to the spec file")
        base.append(path.resolve())

    fixed = data.get("set") or {}
    if not isinstance(fixed, dict) or not all(isinstance(k, str) for k in fixed):
        raise _fail("set", f"expected a mapping of dotted config keys to values, got {fixed!r}", "write e.g. set: {train.selection: last}")
    overrides = tuple(f"{k}={_yaml_value(v)}" for k, v in fixed.items())

    axes_raw = data.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise _fail("axes", f"expected a mapping of dotted config keys to value lists, got {axes_raw!r}", "write e.g. axes: {privacy.epsilon: [.inf, 8, 2]}")
    axes = []
    for key, values in axes_raw.items():
        if not isinstance(key, str) or key in ("seed", "train.rounds"):
            raise _fail(f"axes.{key}", "is not a sweepable config key", "use the spec's 'seeds' and 'rounds' keys")
        if not isinstance(values, list) or not values:
            raise _fail(f"axes.{key}", f"expected a non-empty list of values, got {values!r}", f"write e.g. {key}: [a, b]")
        if len({_yaml_value(v) for v in values}) != len(values):
            raise _fail(f"axes.{key}", f"repeated value in {values!r}", "list each value once")
        if key in fixed:
            raise _fail(f"axes.{key}", "is also fixed under 'set'", "remove it from one of them")
        axes.append((key, tuple(values)))

    exclude_raw = data.get("exclude") or []
    axis_values = dict(axes)
    if not isinstance(exclude_raw, list):
        raise _fail("exclude", f"expected a list of mappings from axis keys to values, got {exclude_raw!r}", "write e.g. exclude: [{privacy.mechanism: central, aggregation.backend: masking}]")
    for i, entry in enumerate(exclude_raw):
        if not isinstance(entry, dict) or not entry:
            raise _fail(f"exclude[{i}]", f"expected a non-empty mapping from axis keys to values, got {entry!r}", "write e.g. {aggregation.backend: masking}")
        for key, value in entry.items():
            if key not in axis_values:
                raise _fail(f"exclude[{i}].{key}", "is not an axis", f"use one of: {', '.join(axis_values) or '(no axes)'}")
            if _yaml_value(value) not in {_yaml_value(v) for v in axis_values[key]}:
                raise _fail(f"exclude[{i}].{key}", f"{value!r} is not one of the axis values {list(axis_values[key])}", "use a value listed under axes")

    seeds_raw = data.get("seeds", [0])
    if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool):
        seeds_raw = [seeds_raw]
    if not isinstance(seeds_raw, list) or not seeds_raw:
        raise _fail("seeds", f"expected a non-empty list of integers, got {seeds_raw!r}", "write e.g. seeds: [0, 1, 2]")
    seeds = tuple(_as_int("seeds", s, 0) for s in seeds_raw)
    if len(set(seeds)) != len(seeds):
        raise _fail("seeds", f"repeated seed in {list(seeds)}", "list each seed once")

    rounds = data.get("rounds")
    if rounds is not None:
        rounds = _as_int("rounds", rounds, 1)

    attacks_raw = data.get("attacks")
    attacks = None
    if attacks_raw not in (None, False):
        if attacks_raw is True:
            attacks_raw = {}
        if not isinstance(attacks_raw, dict) or set(attacks_raw) - {"round", "imia_clients", "attribute_folds"}:
            raise _fail(
                "attacks",
                f"expected a mapping with keys round, imia_clients, attribute_folds, got {attacks_raw!r}",
                "write e.g. attacks: {round: 0, imia_clients: 0, attribute_folds: 0}, or attacks: null",
            )
        attacks = AttackSpec(
            round=_as_int("attacks.round", attacks_raw.get("round", 0), 0),
            imia_clients=_as_int("attacks.imia_clients", attacks_raw.get("imia_clients", 0), 0),
            attribute_folds=_as_int("attacks.attribute_folds", attacks_raw.get("attribute_folds", 0), 0),
        )
        if attacks.attribute_folds == 1:
            raise _fail("attacks.attribute_folds", "1 outer fold leaves no held-out users", "use 0 (skip the attribute inference) or 2 or more (5 is usual)")
        if rounds is not None and attacks.round >= rounds:
            raise _fail("attacks.round", f"round {attacks.round} is not below the round budget {rounds}", f"use a round in 0..{rounds - 1}")

    refs_raw = data.get("references", ["popularity", "ease"])
    if refs_raw is None:
        refs_raw = []
    if not isinstance(refs_raw, list) or any(r not in REFERENCE_NAMES for r in refs_raw):
        raise _fail("references", f"expected a list drawn from {list(REFERENCE_NAMES)}, got {refs_raw!r}", "write e.g. references: [popularity, ease]")

    keep = data.get("keep") or {}
    if not isinstance(keep, dict) or set(keep) - {"model", "views"}:
        raise _fail("keep", f"expected a mapping with keys model, views, got {keep!r}", "write e.g. keep: {model: false, views: false}")
    return SweepSpec(
        name=name,
        base=tuple(base),
        overrides=overrides,
        axes=tuple(axes),
        exclude=tuple(dict(e) for e in exclude_raw),
        seeds=seeds,
        rounds=rounds,
        attacks=attacks,
        references=tuple(refs_raw),
        keep_model=_as_bool("keep.model", keep.get("model", False)),
        keep_views=_as_bool("keep.views", keep.get("views", False)),
    )


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file (see :func:`spec_from_dict`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepError(f"sweep spec {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise SweepError(f"sweep spec {str(path)!r} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise SweepError(f"sweep spec {str(path)!r} is not a text (UTF-8) file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SweepError(f"sweep spec {str(path)!r} is not valid YAML: {err}") from None
    return spec_from_dict(data, path, path.parent)


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One configuration x seed of a sweep.

    Attributes
    ----------
    name : str
        Run-folder name: the axis values and the seed (``epsilon-8_mechanism-central_seed-0``).
    label : str
        The configuration without the seed (seeds of one label are aggregated in the report).
    seed : int
    axes : dict
        Axis key -> the value this cell runs with (after the non-private rule).
    config : ExperimentConfig
        The cell's full, validated config (data path resolved).
    """

    name: str
    label: str
    seed: int
    axes: Mapping[str, Any]
    config: ExperimentConfig = field(repr=False)


def _merged_base(spec: SweepSpec) -> ExperimentConfig:
    tree: dict[str, Any] = config_to_dict(ExperimentConfig())
    for path in spec.base:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise _fail("base", f"config file {str(path)!r} is not valid YAML: {err}", "fix the file") from None
        except UnicodeDecodeError:
            raise _fail("base", f"config file {str(path)!r} is not a text (UTF-8) file", "name a YAML config") from None
        if not isinstance(data, dict):
            raise _fail("base", f"config file {str(path)!r} is not a mapping", "name a YAML config")
        tree = _deep_merge(tree, data)
    try:
        return config_from_dict(tree)
    except ConfigError as err:
        raise _fail("base", str(err), "fix the base config files") from None


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def _label_part(key: str, value: Any, short: Mapping[str, str]) -> str:
    text = "inf" if isinstance(value, float) and math.isinf(value) else (f"{value:g}" if isinstance(value, float) else _yaml_value(value))
    return f"{short[key]}-{_NAME_CHARS.sub('+', text).strip('+') or 'x'}"


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last component of each dotted key, or the whole key where two would clash."""
    tails = [k.split(".")[-1] for k in keys]
    return {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails, strict=True)}


def _nonprivate(values: dict[str, Any], base: ExperimentConfig) -> tuple[list[str], dict[str, Any]]:
    """The cell's overrides after the non-private rule: epsilon = inf runs with mechanism none."""
    eps = values.get("privacy.epsilon", base.privacy.epsilon)
    mechanism = values.get("privacy.mechanism", base.privacy.mechanism)
    sigma = values.get("privacy.noise_multiplier", base.privacy.noise_multiplier)
    if isinstance(eps, float) and math.isinf(eps) and eps > 0 and sigma is None and mechanism in ("central", "distributed", "local"):
        values = {**values, "privacy.mechanism": "none"} if "privacy.mechanism" in values else values
        extra = [] if "privacy.mechanism" in values else ["privacy.mechanism=none"]
        return [f"{k}={_yaml_value(v)}" for k, v in values.items()] + extra, values
    return [f"{k}={_yaml_value(v)}" for k, v in values.items()], values


def _method_settings(method: Any, registry: Mapping[str, Any]) -> list[str]:
    """A ``method`` axis value brings the backbone and distillation its name implies (runner registry)."""
    spec = registry.get(method) if isinstance(method, str) else None
    if spec is None:
        return []
    out = [] if spec.backbone is None else [f"model.backbone={spec.backbone}"]
    return out + ([] if spec.distill is None else [f"distill.enabled={str(spec.distill).lower()}"])


def _apply(base: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """``with_overrides`` whose error message drops the echo of the overrides (it names the key)."""
    try:
        return with_overrides(base, overrides)
    except ConfigError as err:
        prefix = "override " + ", ".join(repr(t) for t in overrides) + ": "
        raise ConfigError(str(err).removeprefix(prefix)) from None


def expand_cells(spec: SweepSpec, data: str | None = None, environ: Mapping[str, str] | None = None) -> list[Cell]:
    """Every cell of ``spec`` with its validated config, in run order (seed-major within a label).

    Identical configurations (the non-private rule can merge several) run once.

    Raises
    ------
    SweepError
        A base file, axis key or value that gives an invalid config (naming the key), or
        a method the runner does not know or whose settings contradict its name.
    """
    base = _merged_base(spec)
    fixed = list(spec.overrides) + ([f"train.rounds={spec.rounds}"] if spec.rounds is not None else [])
    if spec.attacks is not None:
        fixed.append(f"record.views_rounds=[{spec.attacks.round}]")
    try:
        base = with_overrides(base, fixed)
    except ConfigError as err:
        raise _fail("set", str(err), "fix the value or key under 'set' (or 'rounds')") from None
    base = resolve_data_path(base, data, environ)
    runner = importlib.import_module("gfmfr_secure.simulation.runner")
    short = _short_names(spec.axis_keys)
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    combos = itertools.product(*(values for _, values in spec.axes)) if spec.axes else iter([()])
    for combo in combos:
        values = dict(zip(spec.axis_keys, combo, strict=True))
        if any(all(_yaml_value(values[k]) == _yaml_value(v) for k, v in entry.items()) for entry in spec.exclude):
            continue
        overrides, values = _nonprivate(values, base)
        overrides = _method_settings(values.get("method"), getattr(runner, "METHODS", {})) + overrides
        try:
            cfg = _apply(base, overrides)
        except ConfigError as err:
            named = [k for k in spec.axis_keys if k in str(err)]
            shown = ", ".join(f"{k}={_yaml_value(v)}" for k, v in values.items())
            raise _fail(f"axes.{named[0]}" if named else "axes", f"the cell {shown} is not a valid config: {err}", "change the axis values or the base config") from None
        try:
            runner.check_method(cfg)
        except ConfigError as err:
            raise _fail("axes.method" if "method" in values else "base", str(err), "pick a base config that agrees with the method (e.g. configs/<method>.yaml) or drop the method axis") from None
        label = "_".join(_label_part(k, v, short) for k, v in values.items()) or "base"
        text = config_to_yaml(cfg)
        if label in seen:
            if seen[label] != text:
                raise _fail("axes", f"two different cells share the folder name {label!r}", "use axis values that differ after replacing characters other than letters, digits, '.', '+', '-'")
            continue
        seen[label] = text
        for seed in spec.seeds:
            cells.append(Cell(f"{label}_seed-{seed}", label, seed, values, with_overrides(cfg, [f"seed={seed}"])))
    return cells


# --------------------------------------------------------------------------- one cell


@dataclass(frozen=True)
class CellTask:
    """What a worker process needs to run one cell (picklable)."""

    cells_dir: str
    cell: Cell
    attacks: AttackSpec | None
    keep_model: bool
    keep_views: bool
    command: tuple[str, ...]
    runner: str = "gfmfr_secure.simulation.runner"


def cell_is_finished(folder: Path) -> bool:
    """A final (renamed) cell folder with its results file: nothing in it is half-written."""
    return folder.is_dir() and (folder / CELL_FILE).is_file() and ((folder / "metrics.json").is_file() or (folder / "diverged.json").is_file())


def run_cell(task: CellTask) -> str:
    """Train, evaluate and attack one cell inside a partial run folder; returns the cell name.

    Mirrors :func:`gfmfr_secure.simulation.record.train_and_record` (same files), with the
    attacks, the cell record and the clean-up done before the folder is renamed. The
    runner module is looked up by name when the cell runs, so tests can stand in another.
    """
    runner = importlib.import_module(task.runner)
    cell, cfg = task.cell, task.cell.config
    record: dict[str, Any] = {
        "seed": cfg.seed,
        "method": cfg.method,
        "command": list(task.command),
        "cwd": os.getcwd(),
        "started_at": utc_now().isoformat(),
        "finished_at": None,
        "environment": environment_info(),
    }
    with _cell_lock(Path(task.cells_dir), cell.name), create_run(task.cells_dir, cell.name, console=False) as run:
        run.write_text("config.yaml", config_to_yaml(cfg))
        run.write_json("run.json", record)
        run.logger.info("sweep cell %s: method=%s seed=%d data=%s", cell.name, cfg.method, cfg.seed, cfg.data.path)
        try:
            metrics = runner.run_training(cfg, run, progress=False, keep_model=task.keep_model)
        except FloatingPointError as err:  # a diverged cell is a result, listed by the report
            run.logger.info("diverged: %s", err)
            run.write_json("diverged.json", {"error": str(err)})
            metrics = None
        if metrics is not None:
            run.write_json("metrics.json", metrics)
            if task.attacks is not None:
                run.write_json("attacks.json", _attack(cfg, run.path("views"), task.attacks))
        if not task.keep_views and run.path("views").exists():
            shutil.rmtree(run.path("views"))
        record["finished_at"] = utc_now().isoformat()
        run.write_json("run.json", record)
        run.write_json(CELL_FILE, {"name": cell.name, "label": cell.label, "seed": cell.seed, "axes": dict(cell.axes)})
    return cell.name


def _attack(cfg: ExperimentConfig, views: Path, attacks: AttackSpec) -> list[dict[str, Any]]:
    """Every view attack on the recorded round: one record per (attack, adversary)."""
    from attacks.suite import run_view_attacks

    runner = importlib.import_module("gfmfr_secure.simulation.runner")
    data, split = runner.prepare_data(cfg)
    results = run_view_attacks(
        views, attacks.round, data, split, seed=cfg.seed, imia_clients=attacks.imia_clients,
        num_negatives=cfg.train.num_negatives, attribute_folds=attacks.attribute_folds,
    )
    out = []
    for r in results:
        metrics = {k: float(v) for k, v in r.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out.append({"attack": r.name, "adversary": r.observer, "round": attacks.round, "n_targets": int(r.n_targets), "metrics": metrics})
    return out


# --------------------------------------------------------------------------- references


def reference_key(cfg: ExperimentConfig) -> str:
    """Short hash of the data settings: cells with equal keys share their reference scores."""
    text = json.dumps(config_to_dict(cfg.data) | {"ks": list(cfg.eval.ks)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def compute_references(cfg: ExperimentConfig, names: Sequence[str]) -> dict[str, Any]:
    """Test metrics of each reference scorer on ``cfg``'s split (settings chosen on validation)."""
    from gfmfr_secure.metrics import evaluate_ranking
    from gfmfr_secure.references import ReferenceOptions, build_reference

    runner = importlib.import_module("gfmfr_secure.simulation.runner")
    _, split = runner.prepare_data(cfg)
    options = ReferenceOptions(seed=0, ks=tuple(cfg.eval.ks) if 10 in cfg.eval.ks else (10, *cfg.eval.ks), chunk_users=cfg.eval.chunk_users)
    out: dict[str, Any] = {"data": config_to_dict(cfg.data), "scorers": {}}
    for name in names:
        fit = build_reference(name, split, options)
        test = evaluate_ranking(fit.score_fn, split, which="test", ks=options.ks, chunk_size=cfg.eval.chunk_users)
        out["scorers"][name] = {"test": {k: float(v) for k, v in test.items()}, "settings": fit.settings}
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"value of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


# --------------------------------------------------------------------------- the sweep


@contextmanager
def _flock(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing); raise SweepError(busy) if another process holds it."""
    with open(path, "a", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _locked(out: Path) -> Any:
    out.mkdir(parents=True, exist_ok=True)
    return _flock(out / ".sweep.lock", f"another sweep is writing into {str(out)!r}; wait for it or choose another --out")


def _cell_lock(cells_dir: Path, name: str) -> Any:
    """Held while a cell runs, so an orphaned worker of a killed sweep is never raced."""
    locks = cells_dir.parent / ".locks"
    locks.mkdir(exist_ok=True)
    return _flock(locks / f"{name}.lock", f"cell {name!r} is still being run by another process (a worker of an interrupted sweep?); wait for it to end")


def _stale_partials(cells_dir: Path, name: str) -> list[Path]:
    return [p for p in cells_dir.glob(f".{name}.partial-*") if p.is_dir()]


@dataclass
class SweepOutcome:
    """What a sweep did: cells run now, cells found finished, all cells of the spec."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)


def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    *,
    data: str | None = None,
    jobs: int = 1,
    progress: bool = True,
    command: Sequence[str] = (),
    on_cell: Callable[[str], None] | None = None,
    runner: str = "gfmfr_secure.simulation.runner",
) -> SweepOutcome:
    """Run every unfinished cell of ``spec`` under ``out_dir/cells``; finished cells are skipped.

    ``jobs > 1`` runs cells in that many spawned processes; ``jobs == 1`` runs them in
    this process. The reference scores are written to ``out_dir/references.json``.
    ``on_cell`` is called with each cell's name before it runs in this process;
    ``runner`` names the module whose ``run_training`` trains a cell.

    Raises
    ------
    SweepError
        An invalid spec, a locked output folder, a finished cell whose config differs
        from the spec's, or a cell that failed (the finished cells are kept).
    """
    if jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {jobs}")
    out = Path(out_dir)
    cells = expand_cells(spec, data)
    outcome = SweepOutcome(cells=cells)
    with _locked(out):
        cells_dir = out / CELLS_DIR
        cells_dir.mkdir(exist_ok=True)
        _write_spec(out, spec, cells)
        todo = []
        for cell in cells:
            folder = cells_dir / cell.name
            if cell_is_finished(folder):
                written = (folder / "config.yaml").read_text(encoding="utf-8")
                if written != config_to_yaml(cell.config):
                    raise SweepError(
                        f"cell {cell.name!r} in {str(cells_dir)!r} was run with a different config than the spec gives now "
                        "(another spec, data folder or code version); use a new --out, or delete that cell folder to redo it"
                    )
                outcome.skipped.append(cell.name)
                continue
            if folder.exists():
                raise SweepError(f"{str(folder)!r} exists but is not a finished sweep cell; delete it to redo the cell")
            stale = _stale_partials(cells_dir, cell.name)  # left by a killed run
            if stale:
                with _cell_lock(cells_dir, cell.name):
                    for folder_ in stale:
                        shutil.rmtree(folder_)
            todo.append(cell)
        _write_references(out, spec, cells)
        tasks = [CellTask(str(cells_dir), c, spec.attacks, spec.keep_model, spec.keep_views, tuple(command), runner) for c in todo]
        _execute(tasks, jobs, progress, len(cells), len(outcome.skipped), outcome, on_cell)
    return outcome


def _write_spec(out: Path, spec: SweepSpec, cells: Sequence[Cell]) -> None:
    record = {
        "name": spec.name,
        "base": [str(p) for p in spec.base],
        "set": list(spec.overrides),
        "axes": {k: list(v) for k, v in spec.axes},
        "exclude": [dict(e) for e in spec.exclude],
        "seeds": list(spec.seeds),
        "rounds": spec.rounds,
        "attacks": None if spec.attacks is None else dataclasses.asdict(spec.attacks),
        "references": list(spec.references),
        "cells": [c.name for c in cells],
    }
    _write_json_atomic(out / "sweep.json", record)


def _write_references(out: Path, spec: SweepSpec, cells: Sequence[Cell]) -> None:
    if not spec.references:
        return
    path = out / "references.json"
    existing: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    changed = False
    for cell in cells:
        key = reference_key(cell.config)
        have = existing.get(key, {}).get("scorers", {})
        missing = [n for n in spec.references if n not in have]
        if missing:
            fresh = compute_references(cell.config, missing)
            existing[key] = {"data": fresh["data"], "scorers": {**have, **fresh["scorers"]}}
            changed = True
    if changed:
        _write_json_atomic(path, existing)


def _execute(tasks: Sequence[CellTask], jobs: int, progress: bool, total: int, done: int, outcome: SweepOutcome, on_cell: Callable[[str], None] | None) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, desc="sweep", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        if jobs == 1 or len(tasks) <= 1:
            for task in tasks:
                bar.set_postfix_str(task.cell.name)
                if on_cell is not None:
                    on_cell(task.cell.name)
                _run_or_fail(lambda t=task: run_cell(t), task.cell.name)
                outcome.ran.append(task.cell.name)
                bar.update(1)
            return
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init, initargs=(jobs,)) as pool:
            running = {pool.submit(run_cell, task): task.cell.name for task in tasks}
            bar.set_postfix_str(", ".join(list(running.values())[:jobs]))
            try:
                for future in cf.as_completed(running):
                    name = running[future]
                    _run_or_fail(future.result, name)
                    outcome.ran.append(name)
                    bar.update(1)
                    pending = [n for f, n in running.items() if not f.done()]
                    bar.set_postfix_str(", ".join(pending[:jobs]) or name)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


def _run_or_fail(fn: Callable[[], Any], name: str) -> Any:
    try:
        return fn()
    except GfmfrError as err:
        raise SweepError(f"cell {name!r} failed: {err} (finished cells are kept; re-run the same command to resume)") from err
    except BrokenProcessPool as err:
        raise SweepError(
            f"the worker process running cell {name!r} died (killed, or out of memory: try fewer --jobs); "
            "finished cells are kept; re-run the same command to resume"
        ) from err


def _worker_init(jobs: int) -> None:
    """Share the cores among the worker processes (each would otherwise use all of them)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
