"""The report of a sweep, built from its finished cells only.

:func:`write_report` reads every final folder under ``OUT/cells`` that holds
``cell.json`` and ``metrics.json`` (a cell folder appears only once complete;
hidden ``.partial`` folders are never read) and writes, each file atomically:

- ``results.csv`` / ``results.json``: one row per cell and seed (utility, privacy
  spent, cost, attack metrics);
- ``report.md``: tables (mean and std over seeds) and the plots below;
- ``utility_vs_epsilon``, ``attacks_vs_epsilon``, ``frontier``, ``cost`` as PNG and SVG
  (matplotlib, Agg backend); the attack plots only when attacks were run.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluations.sweep import CELL_FILE, CELLS_DIR, SweepError

__all__ = ["UTILITY", "collect_rows", "write_report"]

UTILITY = ("NDCG@10", "HR@10", "NDCG@20", "HR@20", "NDCG@50", "HR@50")
ATTACK_METRICS = ("auc", "tpr_at_fpr_0.01", "exact_recovery")
_ATTACK_TITLES = {"auc": "AUC", "tpr_at_fpr_0.01": "TPR at 1% FPR", "exact_recovery": "exact-recovery rate"}
_PLOTS = ("utility_vs_epsilon", "attacks_vs_epsilon", "frontier", "cost")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _config_facts(folder: Path) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    privacy, aggregation = cfg.get("privacy", {}), cfg.get("aggregation", {})
    mechanism = privacy.get("mechanism", "none")
    return {
        "method": cfg.get("method"),
        "mechanism": mechanism,
        "backend": aggregation.get("backend", "plain"),
        "epsilon_target": math.inf if mechanism == "none" else float(privacy.get("epsilon", math.inf)),
        "rounds": cfg.get("train", {}).get("rounds"),
    }


def collect_rows(out_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of finished cells, diverged cells) under ``out_dir/cells``, in name order."""
    cells = Path(out_dir) / CELLS_DIR
    if not cells.is_dir():
        raise SweepError(f"{str(out_dir)!r} holds no sweep cells (no {CELLS_DIR}/ folder); run 'gfmfr-secure sweep' first")
    rows, diverged = [], []
    for folder in sorted(p for p in cells.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / CELL_FILE).is_file():
            continue
        cell = _read_json(folder / CELL_FILE)
        base = {"cell": cell["name"], "label": cell["label"], "seed": cell["seed"], **{f"axis:{k}": v for k, v in cell["axes"].items()}, **_config_facts(folder)}
        if (folder / "diverged.json").is_file():
            diverged.append({**base, "error": _read_json(folder / "diverged.json").get("error", "")})
            continue
        if not (folder / "metrics.json").is_file():
            continue
        metrics = _read_json(folder / "metrics.json")
        test = metrics.get("test", {})
        row: dict[str, Any] = dict(base)
        for k in UTILITY:
            if k in test:
                row[k] = float(test[k])
        privacy = metrics.get("privacy") or {}
        row["epsilon_spent"] = privacy.get("epsilon")
        row["sigma"] = privacy.get("noise_multiplier")
        timing = metrics.get("timing", {})
        row["s_per_round"] = float(timing.get("client_s_per_round", timing.get("train_s_per_round", 0.0))) + float(timing.get("server_s_per_round", 0.0))
        cost = metrics.get("cost") or {}
        for k in ("bytes_up_per_client", "bytes_down_per_client", "broadcast_bytes_per_client"):
            if k in cost:
                row[k] = float(cost[k])
        if (folder / "attacks.json").is_file():
            for rec in _read_json(folder / "attacks.json"):
                for m in ATTACK_METRICS:
                    if m in rec["metrics"]:
                        row[f"attack:{rec['attack']}:{rec['adversary']}:{m}"] = float(rec["metrics"][m])
        rows.append(row)
    return rows, diverged


# --------------------------------------------------------------------------- statistics


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


@dataclass(frozen=True)
class Group:
    """The seeds of one configuration (cell label)."""

    label: str
    facts: dict[str, Any]
    rows: list[dict[str, Any]]

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.rows if isinstance(r.get(key), (int, float)) and r.get(key) is not None]

    @property
    def series(self) -> str:
        """Every axis value except epsilon and the seed: one line of a plot."""
        parts = [f"{k.removeprefix('axis:').split('.')[-1]}={v}" for k, v in self.facts.items() if k.startswith("axis:") and k != "axis:privacy.epsilon"]
        return ", ".join(parts) or self.facts.get("method", "")


def _groups(rows: Sequence[dict[str, Any]]) -> list[Group]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    out = []
    for label, rs in by.items():
        facts = {k: v for k, v in rs[0].items() if k.startswith("axis:") or k in ("method", "mechanism", "backend", "epsilon_target")}
        out.append(Group(label, facts, rs))
    return out


def _attack_keys(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    keys = sorted({tuple(k.split(":")[1:3]) for r in rows for k in r if k.startswith("attack:")})
    return [(a, o) for a, o in keys]


# --------------------------------------------------------------------------- files


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    tmp = out / f".results.csv.{os.getpid()}.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or ["cell"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "results.csv")
    _atomic_text(out / "results.json", json.dumps(rows, indent=2) + "\n")


def _references(out: Path) -> dict[str, dict[str, float]]:
    """Reference scorer -> test metrics, when every cell shares one dataset setting."""
    path = out / "references.json"
    if not path.is_file():
        return {}
    refs = _read_json(path)
    if len(refs) != 1:
        return {}
    entry = next(iter(refs.values()))
    return {name: rec["test"] for name, rec in entry.get("scorers", {}).items()}


def write_report(out_dir: str | Path, *, command: str = "") -> Path:
    """Write the tables, plots and ``report.md`` of a sweep from its finished cells.

    Raises
    ------
    SweepError
        When ``out_dir`` holds no sweep or no finished cell.
    """
    out = Path(out_dir)
    rows, diverged = collect_rows(out)
    if not rows and not diverged:
        raise SweepError(f"no finished cell in {str(out / CELLS_DIR)!r} yet; run 'gfmfr-secure sweep' (it resumes) first")
    _write_tables(out, rows)
    groups = _groups(rows)
    refs = _references(out)
    attack_keys = _attack_keys(rows)
    sweep = _read_json(out / "sweep.json") if (out / "sweep.json").is_file() else {}
    planned = sweep.get("cells", [])
    finished = {r["cell"] for r in rows} | {d["cell"] for d in diverged}

    import matplotlib

    matplotlib.use("Agg")
    plots = [_plot_utility(out, groups, refs)]
    if attack_keys:
        plots += [_plot_attacks(out, groups, attack_keys), _plot_frontier(out, groups, attack_keys)]
    plots.append(_plot_cost(out, groups))

    lines = [f"# Sweep {sweep.get('name', out.name)}", ""]
    if command:
        lines += [f"Produced by: `{command}`", ""]
    lines.append(f"{len(rows)} finished cells ({len(groups)} configurations), {len(diverged)} diverged" + (f", {len(planned) - len(finished & set(planned))} of {len(planned)} planned cells not finished" if planned else "") + ".")
    lines += ["", "## Utility (test split, mean ± std over seeds)", ""]
    axis_cols = [k for k in groups[0].facts if k.startswith("axis:")] if groups else []
    head = [c.removeprefix("axis:") for c in axis_cols] + ["method", "mechanism", "backend", "seeds", "NDCG@10", "HR@10", "epsilon spent"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        spent = [r["epsilon_spent"] for r in g.rows if r.get("epsilon_spent") is not None]
        eps = f"{max(spent):.3g}" if spent else ("inf" if g.facts["mechanism"] == "none" else "withheld")
        cells = [str(g.facts[c]) for c in axis_cols] + [str(g.facts["method"]), str(g.facts["mechanism"]), str(g.facts["backend"]), str(len(g.rows))]
        cells += [_fmt(*_mean_std(g.values(k))) if g.values(k) else "-" for k in ("NDCG@10", "HR@10")] + [eps]
        lines.append("| " + " | ".join(cells) + " |")
    if refs:
        lines += ["", "Reference scorers on the same split (test): " + "; ".join(f"{n} NDCG@10 {m.get('NDCG@10', math.nan):.4f}, HR@10 {m.get('HR@10', math.nan):.4f}" for n, m in refs.items()) + "."]
    if attack_keys:
        lines += ["", "## Attacks (mean ± std over seeds)", "", "| configuration | attack | adversary | AUC | TPR@1%FPR | exact recovery |", "|---|---|---|---|---|---|"]
        for g in groups:
            for a, o in attack_keys:
                found = [g.values(f"attack:{a}:{o}:{m}") for m in ATTACK_METRICS]
                if any(found):
                    lines.append(f"| {g.label} | {a} | {o} | " + " | ".join(_fmt(*_mean_std(v)) if v else "-" for v in found) + " |")
    lines += ["", "## Cost per backend (mean over cells)", "", "| backend | cells | s / round | bytes up / client | broadcast bytes / client |", "|---|---|---|---|---|"]
    for backend, rs in _by_backend(rows).items():
        lines.append(f"| {backend} | {len(rs)} | {_mean_of(rs, 's_per_round', '.3f')} | {_mean_of(rs, 'bytes_up_per_client', '.4g')} | {_mean_of(rs, 'broadcast_bytes_per_client', '.4g')} |")
    if diverged:
        lines += ["", "## Diverged cells", ""] + [f"- {d['cell']}: {d['error']}" for d in diverged]
    lines += ["", "## Plots", ""] + [f"![{p}]({p}.png) ([SVG]({p}.svg))" for p in plots]
    report = out / "report.md"
    _atomic_text(report, "\n".join(lines) + "\n")
    return report


def _by_backend(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(str(r["backend"]), []).append(r)
    return out


def _mean_of(rows: Sequence[dict[str, Any]], key: str, spec: str) -> str:
    values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return format(sum(values) / len(values), spec) if values else "-"


# --------------------------------------------------------------------------- plots


def _save(fig: Any, out: Path, stem: str) -> str:
    for ext in ("png", "svg"):
        tmp = out / f".{stem}.{os.getpid()}.tmp.{ext}"
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=ext)
        os.replace(tmp, out / f"{stem}.{ext}")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return stem


def _private(groups: Sequence[Group]) -> dict[str, list[Group]]:
    series: dict[str, list[Group]] = {}
    for g in groups:
        if g.facts["mechanism"] != "none":
            series.setdefault(g.series, []).append(g)
    for gs in series.values():
        gs.sort(key=lambda g: g.facts["epsilon_target"])
    return series


def _epsilon_axis(ax: Any, series: Mapping[str, Sequence[Group]]) -> None:
    """Log-scale epsilon axis ticked at the swept values."""
    from matplotlib.ticker import NullLocator

    ticks = sorted({g.facts["epsilon_target"] for gs in series.values() for g in gs})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("target epsilon (user-level)")
    ax.grid(True, alpha=0.3)


def _plot_utility(out: Path, groups: Sequence[Group], refs: Mapping[str, Mapping[str, float]]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = _private(groups)
    nonprivate = [g for g in groups if g.facts["mechanism"] == "none"]
    styles = {"popularity": ":", "ease": "-.", "mf": (0, (5, 1)), "random": (0, (1, 3))}
    for ax, metric in zip(axes, ("NDCG@10", "HR@10"), strict=True):
        for name, gs in series.items():
            xs = [g.facts["epsilon_target"] for g in gs]
            stats = [_mean_std(g.values(metric)) for g in gs]
            means = [m for m, _ in stats]
            stds = [0.0 if math.isnan(s) else s for _, s in stats]
            line = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
            for g in gs:
                ax.scatter([g.facts["epsilon_target"]] * len(g.values(metric)), g.values(metric), s=8, alpha=0.35, color=line[0].get_color())
        for g in nonprivate:
            mean, std = _mean_std(g.values(metric))
            shown = g.series if g.series else g.label
            colour = "black" if len(nonprivate) == 1 else None
            line = ax.axhline(mean, color=colour, linestyle="--", linewidth=1, label=f"non-private ({shown})")
            if not math.isnan(std):
                ax.axhspan(mean - std, mean + std, color=line.get_color(), alpha=0.08)
        for name, m in refs.items():
            if metric in m:
                ax.axhline(m[metric], color="grey", linestyle=styles.get(name, ":"), linewidth=1, label=f"{name} (centralised)" if name in ("ease", "mf") else name)
        if series:
            _epsilon_axis(ax, series)
        else:
            ax.set_xticks([])
        ax.set_ylabel(f"test {metric}")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("utility against the privacy budget (mean ± std over seeds; dots: seeds)")
    fig.tight_layout()
    return _save(fig, out, "utility_vs_epsilon")


#: above this many series, the attack plot shows each series' strongest attack only (report.md lists every attack)
_MAX_SERIES_PER_ATTACK = 2


def _strongest(g: Group, attacks: Sequence[str], adversary: str, metric: str) -> tuple[float, float] | None:
    """(mean, std) over seeds of the attack with the highest mean ``metric``, or None if none was run."""
    stats = [_mean_std(g.values(f"attack:{a}:{adversary}:{metric}")) for a in attacks if g.values(f"attack:{a}:{adversary}:{metric}")]
    return max(stats, key=lambda st: st[0]) if stats else None


def _plot_attacks(out: Path, groups: Sequence[Group], keys: Sequence[tuple[str, str]]) -> str:
    import matplotlib.pyplot as plt

    adversaries = sorted({o for _, o in keys})
    present = [m for m in ATTACK_METRICS if any(k.endswith(f":{m}") for g in groups for r in g.rows for k in r)]
    fig, axes = plt.subplots(len(present), len(adversaries), figsize=(5.5 * len(adversaries), 3.5 * len(present)), squeeze=False)
    series = _private(groups)
    nonprivate = [g for g in groups if g.facts["mechanism"] == "none"]
    all_attacks = sorted({a for a, _ in keys})
    for col, adversary in enumerate(adversaries):
        for row, metric in enumerate(present):
            title = _ATTACK_TITLES[metric]
            ax = axes[row][col]
            names = [a for a, o in keys if o == adversary]
            # one line per attack and series; with many series, one per series: its strongest attack
            per_attack = len(series) <= _MAX_SERIES_PER_ATTACK
            for si, (name, gs) in enumerate(series.items()):
                for ai, a in enumerate(names if per_attack else [None]):
                    pts = [(g.facts["epsilon_target"], _strongest(g, [a] if a else names, adversary, metric)) for g in gs]
                    pts = [(x, st) for x, st in pts if st is not None]
                    if pts:  # the same colour for an attack (or, for strongest attacks, a series) in every panel
                        ax.errorbar(
                            [x for x, _ in pts], [st[0] for _, st in pts], yerr=[0.0 if math.isnan(st[1]) else st[1] for _, st in pts],
                            marker="os^vD"[si % 5] if per_attack else "o", linestyle=("-", "--", ":", "-.")[si % 4] if per_attack else "-",
                            color=f"C{(all_attacks.index(a) if a else si) % 10}", capsize=3, label=f"{a or 'strongest attack'} ({name})",
                        )
            for g in nonprivate:
                for a in names if per_attack else [None]:
                    st = _strongest(g, [a] if a else names, adversary, metric)
                    if st is not None:
                        ax.axhline(st[0], linestyle="--", linewidth=1, color="black", alpha=0.6)
            if metric in ("auc", "tpr_at_fpr_0.01"):
                ax.axhline(0.5 if metric == "auc" else 0.01, color="grey", linestyle=":", linewidth=1)
            if series:
                _epsilon_axis(ax, series)
            ax.set_ylabel(title)
            ax.set_title(f"{adversary}: {title}", fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.suptitle("attack success against the privacy budget (mean ± std over seeds; dashed: non-private; dotted: chance)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out, "attacks_vs_epsilon")


def _plot_frontier(out: Path, groups: Sequence[Group], keys: Sequence[tuple[str, str]]) -> str:
    """Per adversary: the strongest attack's mean AUC against the mean NDCG@10, one point per configuration."""
    import matplotlib.pyplot as plt

    adversaries = sorted({o for _, o in keys})
    fig, axes = plt.subplots(1, len(adversaries), figsize=(5.5 * len(adversaries), 4.2), squeeze=False)
    for ax, adversary in zip(axes[0], adversaries, strict=True):
        by_series: dict[str, list[tuple[float, float, str]]] = {}
        for g in groups:
            aucs = [_mean_std(g.values(f"attack:{a}:{o}:auc"))[0] for a, o in keys if o == adversary and g.values(f"attack:{a}:{o}:auc")]
            if not aucs or not g.values("NDCG@10"):
                continue
            eps = g.facts["epsilon_target"]
            tag = "inf" if math.isinf(eps) else f"{eps:g}"
            by_series.setdefault(g.series if g.facts["mechanism"] != "none" else "non-private", []).append((_mean_std(g.values("NDCG@10"))[0], max(aucs), tag))
        for name, pts in by_series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            for x, y, tag in pts:
                ax.annotate(f"ε={tag}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("test NDCG@10")
        ax.set_ylabel("strongest attack AUC")
        ax.set_title(f"privacy-utility frontier: {adversary}", fontsize=9)
        ax.grid(True, alpha=0.3)
        if by_series:
            ax.legend(fontsize=7)
    return _save(fig, out, "frontier")


def _plot_cost(out: Path, groups: Sequence[Group]) -> str:
    import matplotlib.pyplot as plt

    rows = [r for g in groups for r in g.rows]
    backends = _by_backend(rows)
    names = list(backends)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, title) in zip(axes, (("s_per_round", "seconds per round"), ("bytes_up_per_client", "bytes uploaded per client per round")), strict=True):
        means, stds = [], []
        for n in names:
            values = [float(r[key]) for r in backends[n] if isinstance(r.get(key), (int, float))]
            m, s = _mean_std(values) if values else (math.nan, math.nan)
            means.append(m)
            stds.append(0.0 if math.isnan(s) else s)
        ax.bar(names, means, yerr=stds, capsize=3, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("aggregation backend")
    fig.suptitle("cost per backend (mean ± std over cells; plain DP runs withhold upload sizes)")
    fig.tight_layout()
    return _save(fig, out, "cost")
