"""Run several configs over several seeds and tabulate mean and std of the test metrics."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfmfr_secure.config import load_config, resolve_data_path, with_overrides
from gfmfr_secure.simulation.record import train_and_record

__all__ = ["METRIC_COLUMNS", "PRIVACY_COLUMNS", "CompareRow", "run_compare", "summarise", "write_tables"]

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
    privacy: list[dict[str, Any]]


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; the std is None for a single value (no spread)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
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
        best, secs, dirs, priv = [], [], [], []
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
            report = dict(metrics.get("privacy") or {"mechanism": "none"})
            report.pop("ledger", None)
            priv.append(report)
        rows.append(CompareRow(label, base.method, tuple(seeds), test, val, best, secs, dirs, priv))
    return rows


def summarise(rows: Sequence[CompareRow]) -> list[dict[str, Any]]:
    """One flat record per config: mean and std of every test metric (std None with one seed)."""
    out = []
    for r in rows:
        rec: dict[str, Any] = {"config": r.label, "method": r.method, "seeds": len(r.seeds)}
        for k in METRIC_COLUMNS:
            rec[f"{k} mean"], rec[f"{k} std"] = _mean_std(r.test[k])
        rec["val NDCG@10 mean"] = _mean_std(r.val["NDCG@10"])[0]
        rec["best round mean"] = _mean_std([float(b) for b in r.best_rounds])[0]
        rec["s/round"] = _mean_std(r.seconds_per_round)[0]
        rec.update(_privacy_columns(r.privacy))
        out.append(rec)
    return out


PRIVACY_COLUMNS = ("epsilon", "sigma", "C", "q", "rounds", "delta", "accountant", "mechanism")


def _privacy_columns(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The DP settings of a row (identical over seeds except epsilon, whose largest value is shown).

    ``epsilon`` is ``inf`` without DP, and ``withheld`` when any seed's report
    withheld it (some release was not covered).
    """
    first = reports[0] if reports else {"mechanism": "none"}
    mech = first.get("mechanism", "none")
    if mech == "none":
        return {"epsilon": "inf", "sigma": 0.0, "C": "-", "q": "-", "rounds": "-", "delta": "-", "accountant": "-", "mechanism": "none"}
    eps = [r.get("epsilon") for r in reports]
    shown: Any = "withheld" if any(e is None for e in eps) else max(float(e) for e in eps)
    return {
        "epsilon": shown,
        "sigma": first.get("noise_multiplier"),
        "C": first.get("clip"),
        "q": first.get("sample_rate"),
        "rounds": max(int(r.get("rounds", 0)) for r in reports),
        "delta": first.get("delta"),
        "accountant": first.get("accountant"),
        "mechanism": mech,
    }


def _spread(mean: float, std: float | None) -> str:
    """``mean ± std``, or the mean alone when there is no std (one seed)."""
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_tables(rows: Sequence[CompareRow], out_dir: str | Path, command: str = "") -> tuple[Path, Path]:
    """Write ``results.md`` (mean ± std; the value alone for a one-seed row) and ``results.csv``
    (std empty for one seed), plus ``results.json`` with every seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    lines = []
    if command:
        lines += [f"Produced by: `{command}`", ""]
    dp = any(rec["mechanism"] != "none" for rec in summary)
    extra = PRIVACY_COLUMNS if dp else ()
    lines.append("| config | method | seeds | " + " | ".join(METRIC_COLUMNS + extra) + " | best round | s/round |")
    lines.append("|" + "---|" * (len(METRIC_COLUMNS) + len(extra) + 5))
    for rec in summary:
        cells = [_spread(rec[f"{k} mean"], rec[f"{k} std"]) for k in METRIC_COLUMNS] + [_cell(rec[k]) for k in extra]
        lines.append(f"| {rec['config']} | {rec['method']} | {rec['seeds']} | " + " | ".join(cells) + f" | {rec['best round mean']:.1f} | {rec['s/round']:.2f} |")
    if any(rec["seeds"] == 1 for rec in summary):
        lines += ["", "A row of 1 seed shows its value without a spread (no std from one seed); run more --seeds for one."]
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
