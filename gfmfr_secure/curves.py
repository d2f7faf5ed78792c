"""Learning-curve plot of a training run (``curve.png`` in every run folder).

One figure, two panels sharing the round axis: validation NDCG@10 (top) and the
mean training loss of the round (bottom), from the per-round history that the
trainers write to ``history.json``. The validation-selected round is marked, so
a run that peaks early and then collapses is visible at a glance.

Drawn on matplotlib's Agg canvas directly (no pyplot, no display), written
through a temporary file and an atomic rename like every run-folder file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["curve_series", "plot_learning_curve"]


def curve_series(
    history: Sequence[Mapping[str, Any]], metric: str = "NDCG@10"
) -> tuple[list[int], list[float], list[int], list[float]]:
    """The points of the two curves.

    Parameters
    ----------
    history : sequence of mappings
        Per-round records: ``"round"`` (int), optional ``"loss"`` (float, the
        round's mean training loss), optional ``"val"`` (a metrics mapping).
    metric : str
        Validation metric to draw.

    Returns
    -------
    (val_rounds, val_values, loss_rounds, loss_values)
        Rounds with a validation ``metric`` and their values; rounds with a
        finite loss and their values. Rounds without one (not validated, an
        empty cohort) are left out.

    Raises
    ------
    ValueError
        A record has no ``"round"``.
    """
    val_rounds: list[int] = []
    val_values: list[float] = []
    loss_rounds: list[int] = []
    loss_values: list[float] = []
    for index, rec in enumerate(history):
        if "round" not in rec:
            raise ValueError(f"history record {index} has no 'round' key: {dict(rec)!r}")
        t = int(rec["round"])
        val = rec.get("val")
        if isinstance(val, Mapping) and isinstance(val.get(metric), (int, float)):
            val_rounds.append(t)
            val_values.append(float(val[metric]))
        loss = rec.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            loss_rounds.append(t)
            loss_values.append(float(loss))
    return val_rounds, val_values, loss_rounds, loss_values


def plot_learning_curve(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    best_round: int | None = None,
    title: str | None = None,
    metric: str = "NDCG@10",
) -> Path:
    """Write the learning curve of ``history`` as a PNG.

    Parameters
    ----------
    history : per-round records (see :func:`curve_series`).
    path : output file; its parent folder must exist.
    best_round : the validation-selected round, marked on both panels (None: no mark).
    title : figure title.
    metric : validation metric drawn in the top panel.

    Returns
    -------
    Path of the written file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    val_rounds, val_values, loss_rounds, loss_values = curve_series(history, metric)
    fig = Figure(figsize=(6.0, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax_val, ax_loss = fig.subplots(2, 1, sharex=True)
    ax_val.plot(val_rounds, val_values, marker="o", markersize=3, linewidth=1.5, color="tab:blue")
    ax_val.set_ylabel(f"validation {metric}")
    ax_loss.plot(loss_rounds, loss_values, marker="o", markersize=3, linewidth=1.5, color="tab:red")
    ax_loss.set_ylabel("mean training loss")
    ax_loss.set_xlabel("round")
    for ax, has in ((ax_val, val_values), (ax_loss, loss_values)):
        ax.grid(True, linewidth=0.5, alpha=0.5)
        if not has:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        if best_round is not None and best_round >= 0:
            ax.axvline(best_round, color="grey", linestyle="--", linewidth=1.0)
    if best_round is not None and best_round >= 0:
        ax_val.text(best_round, 1.0, f" selected: round {best_round}", transform=ax_val.get_xaxis_transform(), va="bottom", fontsize="small", color="grey")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
