"""User-level membership inference: the likelihood-ratio attack (LiRA) and a loss baseline.

LiRA (Carlini et al., IEEE S&P 2022, "Membership Inference Attacks From First
Principles"): the attacker trains ``S`` shadow models, each on a random subset of
the users, and records a per-user statistic of every shadow model (for a
recommender: e.g. the logit-scaled mean predicted score of the user's held items,
or minus the user's loss). For each user it fits one Gaussian to the statistic
of shadows that trained on the user ("in") and one to those that did not ("out"),
and scores the target model's statistic by the likelihood ratio.

Assumptions
-----------
- Statistics are oriented so that **higher means member** (use minus a loss) and
  are roughly Gaussian over shadows; logit-scaling a confidence in (0, 1), as in
  Carlini et al., usually makes them so (:func:`logit_scale`).
- ``target_stats[u]`` and ``shadow_stats[:, u]`` are computed the same way.

Variants
--------
online
    ``log N(t; mu_in, s_in^2) - log N(t; mu_out, s_out^2)``.
offline
    only the "out" Gaussian is used: the one-sided statistic ``(t - mu_out) / s_out``.
    Carlini et al.'s offline score ``Phi((t - mu_out) / s_out)`` is a monotone
    function of it, so both rank users identically; the z-value does not saturate.

Few shadows
-----------
A user with fewer than ``min_count`` in (or out) shadows gets the global pooled
variance of that side instead of its own; a user with no shadows on one side gets
that side's mean from the other side's mean plus the average in-minus-out shift of
users that have both. ``fix_variance=True`` uses the pooled variances for every
user (Carlini et al.'s "fixed variance" variant, better with few shadows).

Every run a target in turn
--------------------------
Carlini et al. evaluate with ``M`` models, each user a member of half of them, and
attack each model in turn with the other ``M - 1`` as its shadows
(:func:`balanced_membership`, :func:`lira_leave_one_out`). The scores of all
target models are pooled into one ROC: ``M`` times as many non-members as a single
target, which is what makes a TPR at a low FPR measurable at all
(:func:`membership_figures`, :func:`min_negatives`). The intervals come from the
pigeonhole bootstrap (Owen 2007) over the crossed (model, user) layout: users and
models are resampled independently, since a user's scores under different models
are not independent.

Statistics of a released item table
-----------------------------------
:func:`fold_in_statistic`: an outsider who knows a user's training items fits a
user vector to them on the released item table (as a recommender folds in a new
user) and takes the fit's margin: the table was trained on members' items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_curve

from attacks.base import as_array, make_rng
from attacks.metrics import tpr_key

__all__ = [
    "balanced_membership",
    "fold_in_statistic",
    "lira_leave_one_out",
    "lira_scores",
    "logit_scale",
    "loss_threshold_scores",
    "membership_figures",
    "min_negatives",
]

_VAR_FLOOR = 1e-12


def logit_scale(p: np.ndarray | Sequence[float], eps: float = 1e-6) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]``; any shape."""
    arr = as_array("p", p)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError("logit_scale expects values in [0, 1]")
    q = np.clip(arr, eps, 1.0 - eps)
    return np.log(q) - np.log1p(-q)


def _side_stats(stats: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user count, mean and sum of squared deviations of ``stats`` where ``mask``."""
    count = mask.sum(axis=0).astype(np.float64)
    total = np.where(mask, stats, 0.0).sum(axis=0)
    mean = np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)
    dev = np.where(mask, stats - np.where(np.isnan(mean), 0.0, mean)[None, :], 0.0)
    ss = (dev**2).sum(axis=0)
    return count, mean, ss


def _pooled_var(count: np.ndarray, ss: np.ndarray) -> float:
    dof = float(np.maximum(count - 1.0, 0.0).sum())
    if dof <= 0:
        return float("nan")
    return float(ss.sum() / dof)


def lira_scores(
    target_stats: np.ndarray | Sequence[float],
    shadow_stats: np.ndarray,
    shadow_in: np.ndarray,
    *,
    online: bool = True,
    fix_variance: bool = False,
    min_count: int = 2,
) -> np.ndarray:
    """LiRA membership scores of every user (higher = more likely a member).

    Parameters
    ----------
    target_stats : [U] the statistic of each user on the attacked model.
    shadow_stats : [S, U] the same statistic on each shadow model.
    shadow_in : [S, U] bool, ``True`` where shadow ``s`` trained on user ``u``.
    online : likelihood ratio of the in and out Gaussians (True) or the offline
        one-sided test against the out Gaussian (False); see the module docstring.
    fix_variance : use the pooled (global) in / out variances for every user.
    min_count : users with fewer shadows than this on one side use that side's
        pooled variance.

    Returns
    -------
    np.ndarray, shape [U], float64.

    Raises
    ------
    ValueError
        Shape mismatches, NaN/inf, no shadow model, or no user with ``>= 2``
        shadows on either side (no variance can be estimated).
    """
    t = as_array("target_stats", target_stats, ndim=1)
    n_users = t.size
    st = as_array("shadow_stats", shadow_stats, ndim=2, shape=(None, n_users))
    inn = as_array("shadow_in", shadow_in, ndim=2, dtype=np.bool_, shape=st.shape)
    if st.shape[0] < 1:
        raise ValueError("need at least one shadow model")
    if min_count < 2:
        raise ValueError(f"min_count must be >= 2 (a variance needs two samples), got {min_count}")
    out = ~inn
    c_in, mu_in, ss_in = _side_stats(st, inn)
    c_out, mu_out, ss_out = _side_stats(st, out)
    both = (c_in > 0) & (c_out > 0)
    shift = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_in = np.where(c_in > 0, mu_in, mu_out + shift)
    mu_out = np.where(c_out > 0, mu_out, mu_in - shift)

    var_in_g = _pooled_var(c_in, ss_in)
    var_out_g = _pooled_var(c_out, ss_out)
    if np.isnan(var_in_g) and np.isnan(var_out_g):
        raise ValueError("too few shadows to estimate any variance (need a user with >= 2 shadows on one side)")
    if np.isnan(var_in_g):
        var_in_g = var_out_g
    if np.isnan(var_out_g):
        var_out_g = var_in_g
    var_in_g = max(var_in_g, _VAR_FLOOR)
    var_out_g = max(var_out_g, _VAR_FLOOR)

    if fix_variance:
        var_in = np.full(n_users, var_in_g)
        var_out = np.full(n_users, var_out_g)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            var_in = np.where(c_in >= min_count, ss_in / np.maximum(c_in - 1.0, 1.0), var_in_g)
            var_out = np.where(c_out >= min_count, ss_out / np.maximum(c_out - 1.0, 1.0), var_out_g)
        var_in = np.maximum(var_in, _VAR_FLOOR)
        var_out = np.maximum(var_out, _VAR_FLOOR)

    if not online:
        return (t - mu_out) / np.sqrt(var_out)
    log_in = -0.5 * ((t - mu_in) ** 2 / var_in + np.log(var_in))
    log_out = -0.5 * ((t - mu_out) ** 2 / var_out + np.log(var_out))
    return log_in - log_out


def loss_threshold_scores(
    target_losses: np.ndarray | Sequence[float],
    reference_losses: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """Loss-threshold baseline (Yeom et al., CSF 2018): low loss => member.

    Parameters
    ----------
    target_losses : [U] each user's loss on the attacked model.
    reference_losses : [U] optional per-user reference (e.g. mean loss over out
        shadows, Watson et al. 2022 difficulty calibration), subtracted first.

    Returns
    -------
    np.ndarray [U]: ``-(loss - reference)`` (higher = member).
    """
    loss = as_array("target_losses", target_losses, ndim=1)
    if reference_losses is None:
        return -loss
    ref = as_array("reference_losses", reference_losses, ndim=1, shape=loss.shape)
    return -(loss - ref)


# --------------------------------------------------------------------------- every run a target


def balanced_membership(n_models: int, n_users: int, seed: int | np.random.Generator) -> np.ndarray:
    """Which users each of ``n_models`` runs trains on: every user in exactly ``ceil(M / 2)`` runs.

    As Carlini et al. (2022): per user, a random order of the models, and the user is
    a member of the models ranked below ``M / 2``. Each user then has in and out
    shadows in (almost) equal numbers whichever model is the target.

    Returns
    -------
    bool [M, U].
    """
    if isinstance(n_models, bool) or int(n_models) != n_models or n_models < 2:
        raise ValueError(f"n_models must be an integer >= 2, got {n_models!r}")
    rank = make_rng(seed).random((int(n_models), int(n_users))).argsort(axis=0).argsort(axis=0)
    return rank < n_models / 2.0


def lira_leave_one_out(stats: np.ndarray, keep: np.ndarray, **options: Any) -> np.ndarray:
    """LiRA scores of every model attacked in turn, the other models its shadows.

    Parameters
    ----------
    stats : [M, U] the per-user statistic of each model (higher = member).
    keep : [M, U] bool, whether model ``m`` trained on user ``u``.
    options : passed to :func:`lira_scores` (``online``, ``fix_variance``, ``min_count``);
        by default online LiRA with per-user Gaussian fits.

    Returns
    -------
    float64 [M, U]: row ``m`` scores model ``m``'s users against the other ``M - 1`` models.
    """
    st = as_array("stats", stats, ndim=2)
    kp = as_array("keep", keep, ndim=2, dtype=np.bool_, shape=st.shape)
    n_models = st.shape[0]
    if n_models < 3:
        raise ValueError(f"need at least 3 models (a target and two shadows), got {n_models}")
    out = np.empty_like(st)
    for m in range(n_models):  # one call per target model; each is vectorised over users
        others = np.arange(n_models) != m
        out[m] = lira_scores(st[m], st[others], kp[others], **options)
    return out


def min_negatives(fpr: float, false_positives: int = 100) -> int:
    """Non-members needed before a TPR at ``fpr`` is reported: ``ceil(false_positives / fpr)``.

    With ``n`` non-members the threshold of a TPR at FPR ``t`` passes about ``t n`` of
    them; below 100 the FPR actually reached is itself poorly determined (its
    relative standard error exceeds 10%), and below ``1 / t`` it is 0: the figure
    would be a TPR at no false positive at all.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return math.ceil(false_positives / fpr - 1e-9)


def _roc_figures(y: np.ndarray, s: np.ndarray, fprs: Sequence[float]) -> list[float]:
    """``[auc, tpr at each fpr]`` from one empirical ROC (no interpolation for the TPRs)."""
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return [auc, *(float(tpr[fpr <= t + 1e-12].max()) for t in fprs)]


def membership_figures(
    layouts: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    fpr_targets: Sequence[float] = (0.01, 0.001),
    n_boot: int = 500,
    seed: int | np.random.Generator = 0,
    alpha: float = 0.05,
    min_false_positives: int = 100,
) -> dict[str, Any]:
    """AUC and TPR at low FPR of pooled (model x user) membership scores, with bootstrap intervals.

    Parameters
    ----------
    layouts : one ``(scores [M_k, U], keep [M_k, U])`` per seed (the same ``U`` users in
        every seed); all scores are pooled into one ROC.
    fpr_targets : FPRs at which a TPR is asked for.
    n_boot : pigeonhole-bootstrap resamples: each draws ``U`` users with replacement
        (shared by the seeds) and, per seed, ``M_k`` models with replacement.
    seed : the bootstrap's randomness.
    alpha : the intervals are the ``[alpha/2, 1 - alpha/2]`` percentiles.
    min_false_positives : a TPR at FPR ``t`` is reported only with at least
        :func:`min_negatives` ``(t, min_false_positives)`` non-members; otherwise its entry
        says ``"not estimable"`` and why.

    Returns
    -------
    dict: ``n_pos``, ``n_neg``, ``n_models``, ``n_users``; ``auc`` ``{"value", "lo", "hi"}``;
    per target ``tpr_at_fpr_<t>``: ``{"value", "lo", "hi", "estimable": True}`` or
    ``{"estimable": False, "reason": ...}``; ``n_boot``, ``interval``.
    """
    if not layouts:
        raise ValueError("membership_figures needs at least one (scores, keep) layout")
    pairs = []
    for k, (scores, keep) in enumerate(layouts):
        sc = as_array(f"scores[{k}]", scores, ndim=2)
        kp = as_array(f"keep[{k}]", keep, ndim=2, dtype=np.bool_, shape=sc.shape)
        pairs.append((sc, kp))
    n_users = pairs[0][0].shape[1]
    if any(sc.shape[1] != n_users for sc, _ in pairs):
        raise ValueError("every layout must score the same users (same number of columns)")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    y = np.concatenate([kp.ravel() for _, kp in pairs]).astype(np.int64)
    s = np.concatenate([sc.ravel() for sc, _ in pairs])
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need members and non-members, got {n_pos} and {n_neg}")
    fprs = [float(t) for t in fpr_targets]
    point = _roc_figures(y, s, fprs)
    rng = make_rng(seed)
    boot = []
    while len(boot) < n_boot:
        users = rng.integers(0, n_users, n_users)
        idx = [rng.integers(0, kp.shape[0], kp.shape[0]) for _, kp in pairs]
        yb = np.concatenate([kp[m][:, users].ravel() for (_, kp), m in zip(pairs, idx)]).astype(np.int64)
        sb = np.concatenate([sc[m][:, users].ravel() for (sc, _), m in zip(pairs, idx)])
        if yb.min() == yb.max():
            continue
        boot.append(_roc_figures(yb, sb, fprs))
    arr = np.asarray(boot)
    lo_q, hi_q = alpha / 2.0, 1.0 - alpha / 2.0

    def entry(j: int) -> dict[str, Any]:
        return {"value": point[j], "lo": float(np.quantile(arr[:, j], lo_q)), "hi": float(np.quantile(arr[:, j], hi_q))}

    out: dict[str, Any] = {
        "n_pos": n_pos, "n_neg": n_neg, "n_models": int(sum(kp.shape[0] for _, kp in pairs)), "n_users": int(n_users),
        "auc": entry(0),
    }
    for j, t in enumerate(fprs, start=1):
        need = min_negatives(t, min_false_positives)
        if n_neg >= need:
            out[tpr_key(t)] = {**entry(j), "estimable": True}
        else:
            out[tpr_key(t)] = {"estimable": False, "reason": f"not estimable: {n_neg} non-members, {need} needed ({min_false_positives} / FPR)"}
    out["n_boot"] = int(n_boot)
    out["interval"] = f"{100 * (1 - alpha):g}% pigeonhole bootstrap over users and models"
    return out


# --------------------------------------------------------------------------- statistics


def fold_in_statistic(
    indptr: np.ndarray,
    items: np.ndarray,
    item_table: np.ndarray,
    *,
    l2: float = 1e-2,
    steps: int = 100,
    lr: float = 0.1,
) -> np.ndarray:
    """How well a user vector fitted on the released item table separates the user's items.

    For every user ``u`` (all at once, full batch): ``z_ui = v_u . C_i + c_u`` fitted by
    Adam on the class-balanced logistic loss
    ``mean_{i in T_u} softplus(-z_ui) + mean_{i not in T_u} softplus(z_ui) + l2 |v_u|^2``
    (features scaled by the table's overall RMS), starting from zero. The statistic is
    minus that loss without the penalty: higher means the released table explains the
    user's items better, as it does for users it was trained on.

    Parameters
    ----------
    indptr : int64 [U + 1], items : int64 [N]: each user's training items (CSR).
    item_table : [I, d] released shared item table.
    l2, steps, lr : penalty, Adam steps and learning rate.

    Returns
    -------
    float64 [U] (0 for users without items).
    """
    ptr = as_array("indptr", indptr, ndim=1, dtype=np.int64)
    cols = as_array("items", items, ndim=1, dtype=np.int64, shape=(int(ptr[-1]),))
    table = as_array("item_table", item_table, ndim=2)
    n_users, n_items = ptr.size - 1, table.shape[0]
    if cols.size and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError(f"items must lie in [0, {n_items})")
    counts = np.diff(ptr)
    x = torch.from_numpy(table / max(float(np.sqrt(np.mean(table**2))), 1e-12))  # [I, d]
    y = torch.zeros(n_users, n_items, dtype=torch.float64)
    y[torch.from_numpy(np.repeat(np.arange(n_users), counts)), torch.from_numpy(cols)] = 1.0
    n_pos = y.sum(1, keepdim=True)
    w_pos = 1.0 / n_pos.clamp(min=1.0)
    w_neg = 1.0 / (n_items - n_pos).clamp(min=1.0)
    v = torch.zeros(n_users, x.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros(n_users, 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([v, c], lr=lr)

    def loss_terms() -> torch.Tensor:
        z = v @ x.T + c  # [U, I]
        return (y * torch.nn.functional.softplus(-z) * w_pos + (1.0 - y) * torch.nn.functional.softplus(z) * w_neg).sum(1)

    for _ in range(int(steps)):
        opt.zero_grad()
        (loss_terms() + l2 * (v**2).sum(1)).sum().backward()
        opt.step()
    with torch.no_grad():
        stat = -loss_terms().numpy()
    return np.where(counts > 0, stat, 0.0)
