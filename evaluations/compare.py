"""Run several configs over several seeds and tabulate mean and std of the test metrics."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gfmfr_secure.config import load_config, resolve_data_path, with_overrides
from gfmfr_secure.simulation.record import train_and_record

__all__ = ["CompareRow", "run_compare", "summarise", "write_tables", "METRIC_COLUMNS"]

METRIC_COLUMNS = ("HR@10", "HR@20", "HR@50", "NDCG@10", "NDCG@20", "NDCG@50")


@dataclass(frozen=True)
class CompareRow:
    """One config's results over seeds."""

    label: str
    method: str
    seeds: tuple[int, ...]
    test: dict[str, list[float]]
    val: dict[str, list[float]]
    best_rounds: list[int]
    seconds_per_round: list[float]
    run_dirs: list[str]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def run_compare(
    configs: Sequence[str | Path],
    seeds: Sequence[int],
    *,
    out_dir: str | Path,
    data: str | None = None,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> list[CompareRow]:
    """Train every config with every seed (each in its own run folder under ``out_dir/runs``)."""
    rows = []
    for path in configs:
        label = Path(path).stem
        base = resolve_data_path(load_config(path, overrides), data)
        test: dict[str, list[float]] = {k: [] for k in METRIC_COLUMNS}
        val: dict[str, list[float]] = {k: [] for k in METRIC_COLUMNS}
        best, secs, dirs = [], [], []
        for seed in seeds:
            cfg = with_overrides(base, [f"seed={seed}"])
            metrics, run_dir = train_and_record(cfg, Path(out_dir) / "runs", name=f"{label}-seed{seed}", console=False, progress=progress)
            for k in METRIC_COLUMNS:
                test[k].append(float(metrics["test"][k]))
                val[k].append(float(metrics["val"][k]))
            best.append(int(metrics["best_round"]))
            timing = metrics.get("timing", {})
            secs.append(float(timing.get("client_s_per_round", timing.get("train_s_per_round", 0.0))) + float(timing.get("server_s_per_round", 0.0)))
            dirs.append(str(run_dir))
        rows.append(CompareRow(label, base.method, tuple(seeds), test, val, best, secs, dirs))
    return rows


def summarise(rows: Sequence[CompareRow]) -> list[dict[str, Any]]:
    """One flat record per config: mean and std of every test metric."""
    out = []
    for r in rows:
        rec: dict[str, Any] = {"config": r.label, "method": r.method, "seeds": len(r.seeds)}
        for k in METRIC_COLUMNS:
            rec[f"{k} mean"], rec[f"{k} std"] = _mean_std(r.test[k])
        rec["val NDCG@10 mean"] = _mean_std(r.val["NDCG@10"])[0]
        rec["best round mean"] = _mean_std([float(b) for b in r.best_rounds])[0]
        rec["s/round"] = _mean_std(r.seconds_per_round)[0]
        out.append(rec)
    return out


def write_tables(rows: Sequence[CompareRow], out_dir: str | Path, command: str = "") -> tuple[Path, Path]:
    """Write ``results.md`` (mean +- std) and ``results.csv`` (plus ``results.json`` with every seed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    lines = []
    if command:
        lines += [f"Produced by: `{command}`", ""]
    lines.append("| config | method | seeds | " + " | ".join(METRIC_COLUMNS) + " | best round | s/round |")
    lines.append("|" + "---|" * (len(METRIC_COLUMNS) + 5))
    for rec in summary:
        cells = [f"{rec[f'{k} mean']:.4f} ± {rec[f'{k} std']:.4f}" for k in METRIC_COLUMNS]
        lines.append(f"| {rec['config']} | {rec['method']} | {rec['seeds']} | " + " | ".join(cells) + f" | {rec['best round mean']:.1f} | {rec['s/round']:.2f} |")
    md = out / "results.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(md)
    csv_path = out / "results.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(summary[0]) if summary else ["config"])
        writer.writeheader()
        writer.writerows(summary)
    tmp.replace(csv_path)
    raw = out / "results.json"
    tmp = raw.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([r.__dict__ for r in rows], indent=2), encoding="utf-8")
    tmp.replace(raw)
    return md, csv_path
