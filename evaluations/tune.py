"""Equal-budget hyperparameter selection on the validation split.

Every config gets the same grid (the same number of training runs, the same seed and
round budget); the setting with the best validation NDCG@10 is written out as a full,
resolved config for the final multi-seed comparison. The test split is never read
for selection (each run scores test once, for its own validation-selected round, and
that figure is not used here).

A setting whose training diverges (the run raises ``FloatingPointError``, e.g. a
learning rate too large) is listed as diverged and cannot be selected; the grid goes
on. A config for which every setting diverges is an error.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from gfmfr_secure.config import config_to_yaml, load_config, resolve_data_path, with_overrides
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.simulation.record import train_and_record

__all__ = ["parse_grid", "tune"]


def parse_grid(specs: Sequence[str]) -> list[list[str]]:
    """``["train.lr=0.002,0.01", "fusion.operator=sum,moe"]`` -> every combination as override lists."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values or not key.strip():
            raise ConfigError(f"grid entry {spec!r} must look like key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def tune(
    configs: Sequence[str | Path],
    grid: Sequence[str],
    *,
    out_dir: str | Path,
    data: str | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Run the grid for every config; write ``OUT/tuned/<config>.yaml`` and ``OUT/tuning.md``.

    Raises
    ------
    ConfigError
        A malformed grid entry, or a config for which every setting diverged.
    """
    out = Path(out_dir)
    (out / "tuned").mkdir(parents=True, exist_ok=True)
    combos = parse_grid(grid)
    lines = ["| config | setting | val NDCG@10 | val HR@10 | best round | selected |", "|---|---|---|---|---|---|"]
    for path in configs:
        label = Path(path).stem
        base = resolve_data_path(load_config(path, overrides), data)
        results, diverged = [], []
        for i, combo in enumerate(combos):
            cfg = with_overrides(base, [*combo, f"seed={seed}"])
            try:
                metrics, _ = train_and_record(cfg, out / "runs", name=f"{label}-grid{i}", console=False, progress=progress)
            except FloatingPointError as err:  # this setting diverged; the others still count
                diverged.append((combo, str(err)))
                continue
            results.append((metrics["val"]["NDCG@10"], metrics["val"]["HR@10"], metrics["best_round"], combo, cfg))
        if not results:
            raise ConfigError(f"{label}: every grid setting diverged ({'; '.join(msg for _, msg in diverged)})")
        best = max(results, key=lambda r: r[0])
        for ndcg, hr, rnd, combo, _ in results:
            lines.append(f"| {label} | {' '.join(combo) or '(defaults)'} | {ndcg:.4f} | {hr:.4f} | {rnd} | {'yes' if combo is best[3] else ''} |")
        for combo, msg in diverged:
            lines.append(f"| {label} | {' '.join(combo) or '(defaults)'} | diverged | | | |")
        tuned = out / "tuned" / f"{label}.yaml"
        tmp = tuned.with_suffix(".yaml.tmp")
        tmp.write_text(f"# selected on validation NDCG@10 from: {' | '.join(' '.join(c) for c in combos)}\n" + config_to_yaml(best[4]), encoding="utf-8")
        tmp.replace(tuned)
    report = out / "tuning.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
