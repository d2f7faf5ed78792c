"""Metrics for attacks: ROC AUC, TPR at low FPR, best accuracy / F1, confidence intervals, plots.

Scores follow one convention throughout :mod:`attacks`: **higher means "member"**
(interacted, in the training set, canary present). Every metric comes with the value
a random or trivial attacker gets on the same targets, so that a number is never
reported without its baseline:

=========================  =============================================
metric                     random / trivial baseline
=========================  =============================================
``auc``                    0.5
``tpr_at_fpr_<t>``         ``t`` (a random score has TPR = FPR)
``best_accuracy``          majority-class rate ``max(pi, 1 - pi)``
``best_f1``                ``2 pi / (1 + pi)`` (predict everyone a member)
=========================  =============================================

with ``pi`` the fraction of members among the targets.

TPR at a fixed FPR is read off the empirical ROC curve without interpolation: the
largest TPR among the thresholds whose FPR is at most the target (Carlini et al.,
2022). With fewer than ``1 / t`` non-members the only such thresholds have FPR 0,
so the number is a TPR at zero false positives; ``n_neg`` is reported to make that
visible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import beta as beta_dist
from sklearn.metrics import roc_auc_score, roc_curve

from attacks.base import as_array, make_rng

__all__ = [
    "DEFAULT_FPR_TARGETS",
    "aggregate_runs",
    "attack_metrics",
    "bootstrap_metric",
    "clopper_pearson",
    "plot_roc",
    "roc_points",
    "tpr_at_fpr",
    "tpr_key",
]

DEFAULT_FPR_TARGETS: tuple[float, ...] = (0.01, 0.001)


def tpr_key(target: float) -> str:
    """Metric name of the TPR at FPR ``target``: ``0.01 -> "tpr_at_fpr_0.01"``."""
    return f"tpr_at_fpr_{target:g}"


def _check_binary(y_true: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = as_array("y_true", y_true, ndim=1, dtype=np.float64)
    s = as_array("scores", scores, ndim=1, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"y_true and scores must have the same length, got {y.size} and {s.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0/1 (or False/True)")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"y_true needs both members and non-members, got {n_pos} of {y.size} positive")
    return y.astype(np.int64), s


def roc_points(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every point of the empirical ROC curve.

    Parameters
    ----------
    y_true : [N] 0/1 membership.
    scores : [N] attack scores, higher = member.

    Returns
    -------
    fpr, tpr, thresholds : [T] each; point ``k`` predicts "member" for
        ``scores >= thresholds[k]``. The first point is ``(0, 0)`` (threshold ``+inf``)
        and the last ``(1, 1)``; no intermediate point is dropped.
    """
    y, s = _check_binary(y_true, scores)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def tpr_at_fpr(y_true: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Largest TPR among thresholds with FPR <= ``target`` (no interpolation).

    Parameters
    ----------
    y_true : [N] 0/1 membership.
    scores : [N] attack scores, higher = member.
    target : FPR in ``[0, 1]``.

    Returns
    -------
    float in ``[0, 1]``.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target FPR must be in [0, 1], got {target}")
    fpr, tpr, _ = roc_points(y_true, scores)
    return float(tpr[fpr <= target + 1e-12].max())


def attack_metrics(
    y_true: np.ndarray | Sequence[int],
    scores: np.ndarray | Sequence[float],
    *,
    fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS,
) -> dict[str, float]:
    """Standard membership-style metrics of one attack, with their random baselines.

    Parameters
    ----------
    y_true : [N] 0/1 ground truth (1 = member / interacted).
    scores : [N] attack scores, higher = member. Ties are handled as by
        :func:`sklearn.metrics.roc_curve` (tied scores share one threshold).
    fpr_targets : FPRs at which to report the TPR (default 1% and 0.1%).

    Returns
    -------
    dict with

    - ``auc`` : ROC AUC (:func:`sklearn.metrics.roc_auc_score`).
    - ``tpr_at_fpr_<t>`` : for each target ``t`` (see :func:`tpr_at_fpr`).
    - ``best_accuracy`` / ``best_threshold_accuracy`` : maximum accuracy over all
      thresholds (including "nobody" and "everybody") and a threshold reaching it
      (``+inf`` when predicting nobody is best).
    - ``best_f1`` : maximum F1 of the "member" class over all thresholds.
    - ``baseline_auc``, ``baseline_tpr_at_fpr_<t>``, ``baseline_accuracy``,
      ``baseline_f1`` : what a random / trivial attacker gets (module docstring).
    - ``n``, ``n_pos``, ``n_neg`` : counts (as floats, so the dict is all-float).

    Raises
    ------
    ValueError
        Shapes differ, NaN/inf, non-binary labels, or only one class present.
    """
    y, s = _check_binary(y_true, scores)
    n = y.size
    n_pos = int(y.sum())
    n_neg = n - n_pos
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    tp = tpr * n_pos
    fp = fpr * n_neg
    acc = (tp + (n_neg - fp)) / n
    k_acc = int(np.argmax(acc))
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(tp > 0, 2.0 * tp / (2.0 * tp + fp + (n_pos - tp)), 0.0)
    pi = n_pos / n
    out: dict[str, float] = {"auc": float(roc_auc_score(y, s))}
    for t in fpr_targets:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"FPR targets must be in [0, 1], got {t}")
        out[tpr_key(t)] = float(tpr[fpr <= t + 1e-12].max())
    out["best_accuracy"] = float(acc[k_acc])
    out["best_threshold_accuracy"] = float(thr[k_acc])
    out["best_f1"] = float(f1.max())
    out["baseline_auc"] = 0.5
    for t in fpr_targets:
        out["baseline_" + tpr_key(t)] = float(t)
    out["baseline_accuracy"] = float(max(pi, 1.0 - pi))
    out["baseline_f1"] = float(2.0 * pi / (1.0 + pi))
    out["n"] = float(n)
    out["n_pos"] = float(n_pos)
    out["n_neg"] = float(n_neg)
    return out


def clopper_pearson(k: int, n: int, alpha: float = 0.05, *, two_sided: bool = True) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) confidence interval for a proportion ``k / n``.

    Parameters
    ----------
    k : successes, ``0 <= k <= n``.
    n : trials, ``n >= 1``.
    alpha : 1 - confidence level.
    two_sided : True: each bound at level ``alpha / 2`` (the usual two-sided
        interval); False: each bound is a one-sided ``1 - alpha`` bound.

    Returns
    -------
    (lo, hi) : ``lo = Beta.ppf(a, k, n - k + 1)`` (0 when ``k = 0``) and
        ``hi = Beta.ppf(1 - a, k + 1, n - k)`` (1 when ``k = n``) with ``a = alpha / 2``
        or ``alpha``.
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be integers, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    a = alpha / 2.0 if two_sided else alpha
    lo = 0.0 if k == 0 else float(beta_dist.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta_dist.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def aggregate_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and spread of metric dicts over seeds (or folds).

    Parameters
    ----------
    runs : one metric dict per seed; only keys present in every run with a finite
        numeric value in every run are aggregated.

    Returns
    -------
    dict key -> ``{"mean", "std", "sem", "min", "max", "n"}``; ``std`` uses ``ddof=1``
    (0 when there is a single run) and ``sem = std / sqrt(n)``.
    """
    if len(runs) == 0:
        raise ValueError("aggregate_runs needs at least one run")
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        vals = []
        for r in runs:
            v = r[k]
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                break
            vals.append(float(v))
        if len(vals) != len(runs) or not all(math.isfinite(v) for v in vals):
            continue
        arr = np.asarray(vals)
        std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
        out[k] = {
            "mean": float(arr.mean()),
            "std": std,
            "sem": std / math.sqrt(arr.size),
            "min": float(arr.min()),
            "max": float(arr.max()),
            "n": float(arr.size),
        }
    return out


def bootstrap_metric(
    y_true: np.ndarray | Sequence[int],
    scores: np.ndarray | Sequence[float],
    *,
    metric: str = "auc",
    n_boot: int = 200,
    seed: int | np.random.Generator,
    alpha: float = 0.05,
    stratified: bool = True,
) -> dict[str, float]:
    """Bootstrap spread of one :func:`attack_metrics` entry over resampled targets.

    Parameters
    ----------
    y_true, scores : [N] as in :func:`attack_metrics`.
    metric : key of :func:`attack_metrics` to resample (``"auc"``, ``"tpr_at_fpr_0.01"``, ...).
    n_boot : number of bootstrap resamples.
    seed : int or :class:`numpy.random.Generator`.
    alpha : the percentile interval is ``[alpha/2, 1 - alpha/2]``.
    stratified : resample members and non-members separately (keeps ``n_pos`` fixed,
        so every resample has both classes).

    Returns
    -------
    dict ``{"value", "mean", "std", "lo", "hi", "n_boot"}``; ``value`` is the metric on
    the original targets.
    """
    y, s = _check_binary(y_true, scores)
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    rng = make_rng(seed)
    base = attack_metrics(y, s)
    if metric not in base:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(base))}")
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    vals = []
    while len(vals) < n_boot:
        if stratified:
            idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        else:
            idx = rng.integers(0, y.size, y.size)
            if y[idx].min() == y[idx].max():
                continue
        vals.append(attack_metrics(y[idx], s[idx])[metric])
    arr = np.asarray(vals)
    return {
        "value": float(base[metric]),
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)),
        "lo": float(np.quantile(arr, alpha / 2.0)),
        "hi": float(np.quantile(arr, 1.0 - alpha / 2.0)),
        "n_boot": float(n_boot),
    }


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "",
    *,
    floor: float | None = None,
) -> Path:
    """Write a log-log ROC plot (one curve per attack plus the random diagonal) as PNG.

    Parameters
    ----------
    curves : label -> ``(y_true [N], scores [N])``; the legend shows each AUC.
    path : output file (parent folders are created).
    title : figure title.
    floor : smallest rate shown on both axes (zero rates are drawn at ``floor``);
        default ``1 / (largest number of non-members)`` halved, capped at ``1e-5``.

    Returns
    -------
    Path of the written file.

    Notes
    -----
    Uses the Agg canvas directly; pyplot (and any display) is never touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    points = {}
    n_neg_max = 1
    for label, (y_true, scores) in curves.items():
        y, s = _check_binary(y_true, scores)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        points[label] = (fpr, tpr, float(roc_auc_score(y, s)))
        n_neg_max = max(n_neg_max, int((y == 0).sum()))
    lo = floor if floor is not None else max(0.5 / n_neg_max, 1e-5)
    if not 0.0 < lo < 1.0:
        raise ValueError(f"floor must be in (0, 1), got {lo}")
    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([lo, 1.0], [lo, 1.0], linestyle="--", color="grey", linewidth=1.0, label="random (AUC 0.5)")
    for label, (fpr, tpr, auc) in points.items():
        ax.plot(np.maximum(fpr, lo), np.maximum(tpr, lo), linewidth=1.5, label=f"{label} (AUC {auc:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
