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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attacks.base import as_array

__all__ = ["lira_scores", "logit_scale", "loss_threshold_scores"]

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
