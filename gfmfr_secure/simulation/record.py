"""Run one configured training job in a run folder (shared by ``train`` and ``compare``)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from gfmfr_secure.config import config_to_yaml
from gfmfr_secure.runio import (
    create_run,
    cxx_compiler_version,
    default_run_name,
    environment_info,
    utc_now,
)

__all__ = ["train_and_record"]


def train_and_record(
    cfg: Any,
    out_dir: str | Path,
    *,
    name: str | None = None,
    command: list[str] | None = None,
    console: bool = True,
    progress: bool = True,
) -> tuple[dict[str, Any], Path]:
    """Run ``cfg`` in a fresh run folder under ``out_dir``; returns (metrics, run folder).

    The folder holds ``config.yaml`` (resolved config), ``run.json`` (seed, command,
    times, package versions, git revision), ``log.txt``, ``metrics.json``,
    ``history.json``, ``curve.png`` (learning curve) and ``model.pt``; it appears only once
    the run has finished.
    """
    # looked up at call time (through sys.modules) so tests can stand in a fake runner
    runner = importlib.import_module("gfmfr_secure.simulation.runner")

    name = name or default_run_name(cfg.method, cfg.seed)
    record: dict[str, Any] = {
        "seed": cfg.seed,
        "method": cfg.method,
        "command": list(command or []),
        "cwd": os.getcwd(),
        "started_at": utc_now().isoformat(),
        "finished_at": None,
        "environment": environment_info(),
    }
    if cfg.fusion.compile:  # compiled kernels round as their compiler vectorises them
        record["environment"]["cxx"] = cxx_compiler_version()
    with create_run(out_dir, name, console=console) as run:
        run.write_text("config.yaml", config_to_yaml(cfg))
        run.write_json("run.json", record)
        run.logger.info("run %s: method=%s seed=%d data=%s", name, cfg.method, cfg.seed, cfg.data.path)
        metrics = runner.run_training(cfg, run, progress=progress)
        run.write_json("metrics.json", metrics)
        record["finished_at"] = utc_now().isoformat()
        run.write_json("run.json", record)
    return metrics, Path(out_dir) / name
