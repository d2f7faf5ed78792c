"""Run one configured training job in a run folder (shared by ``train`` and ``compare``), or continue one."""

from __future__ import annotations

import fcntl
import glob
import importlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gfmfr_secure.config import config_to_yaml, load_config
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.runio import (
    RunFolder,
    create_run,
    cxx_compiler_version,
    default_run_name,
    environment_info,
    partial_run_name,
    utc_now,
)
from gfmfr_secure.simulation.checkpoint import CHECKPOINT_DIR, read_checkpoint_meta

__all__ = ["find_partial_run", "resume_and_record", "train_and_record"]

RUNNER = "gfmfr_secure.simulation.runner"


def train_and_record(
    cfg: Any,
    out_dir: str | Path,
    *,
    name: str | None = None,
    command: list[str] | None = None,
    console: bool = True,
    progress: bool = True,
    keep_model: bool = True,
    checkpoint_every: int = 0,
) -> tuple[dict[str, Any], Path]:
    """Run ``cfg`` in a fresh run folder under ``out_dir``; returns (metrics, run folder).

    The folder holds ``config.yaml`` (resolved config), ``run.json`` (seed, command,
    options, times, package versions, git revision), ``log.txt``, ``metrics.json``,
    ``history.json``, ``curve.png`` (learning curve) and, with ``keep_model``,
    ``model.pt``; it appears only once the run has finished. With ``checkpoint_every``
    > 0 the partial folder holds a checkpoint (``checkpoint/``, removed at the end) and
    is kept if the run stops early, for :func:`resume_and_record`.
    """
    # looked up at call time (through sys.modules) so tests can stand in a fake runner
    runner = importlib.import_module(RUNNER)

    name = name or default_run_name(cfg.method, cfg.seed)
    record: dict[str, Any] = {
        "seed": cfg.seed,
        "method": cfg.method,
        "command": list(command or []),
        "cwd": os.getcwd(),
        "options": {"keep_model": keep_model, "checkpoint_every": checkpoint_every},
        "started_at": utc_now().isoformat(),
        "finished_at": None,
        "environment": environment_info(),
    }
    if cfg.fusion.compile:  # compiled kernels round as their compiler vectorises them
        record["environment"]["cxx"] = cxx_compiler_version()
    keep = CHECKPOINT_DIR if checkpoint_every > 0 else None
    with create_run(out_dir, name, console=console, keep_on_error=keep) as run, _exclusive(run.dir):
        run.write_text("config.yaml", config_to_yaml(cfg))
        run.write_json("run.json", record)
        run.logger.info("run %s: method=%s seed=%d data=%s", name, cfg.method, cfg.seed, cfg.data.path)
        metrics = _train(runner, cfg, run, record, progress=progress, resume=False)
    return metrics, Path(out_dir) / name


def resume_and_record(
    run_dir: str | Path,
    *,
    command: list[str] | None = None,
    console: bool = True,
    progress: bool = True,
    keep_model: bool | None = None,
    checkpoint_every: int | None = None,
) -> tuple[dict[str, Any], Path]:
    """Continue an interrupted run from its checkpoint; returns (metrics, final run folder).

    ``run_dir`` is the partial folder ``OUT/.NAME.partial-XXXXXXXX``, or the final path
    ``OUT/NAME`` of a run whose single partial folder is then used. The config comes
    from the folder's ``config.yaml``; ``keep_model`` and ``checkpoint_every`` default to
    the interrupted run's. The folder ends as an uninterrupted run's would; ``run.json`` is
    rewritten when the run finishes and lists the resumption that completed it under
    ``resumed``; a refused or stopped resumption leaves it as it was.

    Raises
    ------
    ConfigError
        If the folder does not exist, is already complete, has no checkpoint, is in use
        by a running process, or its checkpoint was made with another config;
        :class:`~gfmfr_secure.errors.DataError` if it was made with other data.
    """
    runner = importlib.import_module(RUNNER)
    partial = find_partial_run(run_dir)
    meta = read_checkpoint_meta(partial / CHECKPOINT_DIR)
    if meta is None:
        raise ConfigError(
            f"run folder {str(partial)!r} has no checkpoint: it stopped before its first round ended, was started "
            "with --checkpoint-every 0, or its method writes none; start the run again"
        )
    cfg = load_config(partial / "config.yaml")
    record: dict[str, Any] = json.loads((partial / "run.json").read_text(encoding="utf-8"))
    options = record.get("options", {})
    keep_model = bool(options.get("keep_model", True)) if keep_model is None else keep_model
    checkpoint_every = int(options.get("checkpoint_every", 1)) if checkpoint_every is None else checkpoint_every
    record["options"] = {"keep_model": keep_model, "checkpoint_every": checkpoint_every}
    after = int(meta["next_round"]) - 1
    record.setdefault("resumed", []).append({"at": utc_now().isoformat(), "command": list(command or []), "after_round": after})
    with _exclusive(partial), RunFolder.reopen(partial, console=console, keep_on_error=CHECKPOINT_DIR) as run:
        run.logger.info("run %s resumed after round %d: method=%s seed=%d data=%s", run.name, after, cfg.method, cfg.seed, cfg.data.path)
        metrics = _train(runner, cfg, run, record, progress=progress, resume=True)
    return metrics, run.final_dir


def _train(runner: Any, cfg: Any, run: RunFolder, record: dict[str, Any], *, progress: bool, resume: bool) -> dict[str, Any]:
    """Train into the open ``run`` and write metrics and the finished record; the checkpoint goes last."""
    options = record["options"]
    metrics: dict[str, Any] = runner.run_training(
        cfg, run, progress=progress, keep_model=options["keep_model"], checkpoint_every=options["checkpoint_every"], resume=resume
    )
    run.write_json("metrics.json", metrics)
    record["finished_at"] = utc_now().isoformat()
    run.write_json("run.json", record)
    if run.path(CHECKPOINT_DIR).exists():
        shutil.rmtree(run.path(CHECKPOINT_DIR))
    return metrics


def find_partial_run(run_dir: str | Path) -> Path:
    """The partial folder to resume for ``run_dir`` (see :func:`resume_and_record`).

    Raises
    ------
    ConfigError
        If there is no such folder, the run is already complete, or ``OUT/NAME`` has
        several partial folders.
    """
    path = Path(run_dir)
    name = partial_run_name(path)
    if name is not None:
        if not path.is_dir():
            raise ConfigError(f"run folder {str(path)!r} does not exist")
        if (path.parent / name).exists():
            raise ConfigError(f"run {str(path.parent / name)!r} is already complete; nothing to resume")
        return path
    if path.is_dir():
        if (path / "metrics.json").is_file():
            raise ConfigError(f"run {str(path)!r} is already complete (it has metrics.json); nothing to resume")
        raise ConfigError(f"{str(path)!r} is not a run folder to resume: pass the partial folder .NAME.partial-XXXXXXXX")
    found = [p for p in sorted(path.parent.glob(f".{glob.escape(path.name)}.partial-*")) if partial_run_name(p) == path.name]
    if not found:
        raise ConfigError(f"run folder {str(path)!r} does not exist, nor a partial folder of it")
    if len(found) > 1:
        raise ConfigError(f"run {path.name!r} has several partial folders ({', '.join(p.name for p in found)}); pass one of them")
    return found[0]


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` for the block (the OS drops it if the process dies).

    Raises
    ------
    ConfigError
        If another process holds it (the run is still going).
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"run folder {str(folder)!r} is in use by a running process; wait for it or stop it first") from None
        yield
    finally:
        os.close(fd)
