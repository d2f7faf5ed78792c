"""Empirical lower bounds on differential-privacy epsilon from canary experiments.

Following Jagielski et al. (NeurIPS 2020, "Auditing Differentially Private Machine
Learning: How Private is Private SGD?") and Nasr et al. (IEEE S&P 2021, "Adversary
Instantiation: Lower Bounds for Differentially Private Machine Learning"): train
many times with a canary IN and many times with it OUT, score each trained model
with a distinguishing test (higher = "canary was in"), and turn the test's error
rates into a bound. For an (epsilon, delta)-DP mechanism every test satisfies

    1 - delta - FNR <= e^eps * FPR        and        1 - delta - FPR <= e^eps * FNR,

so ``eps >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR))``.

The rates are replaced by Clopper-Pearson upper confidence bounds ``FPR_hi``,
``FNR_hi`` (:func:`attacks.metrics.clopper_pearson`), so the reported number is a
lower bound at confidence ``1 - alpha`` per bound for one pre-chosen threshold.

Confidence conventions
----------------------
``two_sided=True`` (default): each upper bound is the upper end of the two-sided
``1 - alpha`` interval (level ``alpha / 2`` per bound) -- the conservative
convention of Nasr et al.'s code. ``two_sided=False``: each bound is a one-sided
``1 - alpha`` upper bound (Jagielski et al.).

Threshold selection caveat: when ``threshold`` is not given, every distinct score
is tried and the largest bound is returned. Taking the maximum over thresholds
chosen on the same samples makes the bound optimistic (the confidence statement
holds for a fixed threshold); for a rigorous audit pick the threshold on separate
runs and pass it in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta as beta_dist

from attacks.base import as_array, finite_float

__all__ = ["AuditResult", "AuditViolation", "check_audit", "empirical_epsilon"]


class AuditViolation(AssertionError):
    """The empirical epsilon lower bound exceeds the claimed epsilon."""


@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`empirical_epsilon`.

    Attributes
    ----------
    eps_lb : the lower bound (>= 0; 0 when no threshold gives a positive bound).
    threshold : the score threshold reaching it ("in" predicted for ``score >= threshold``);
        NaN when ``eps_lb`` is 0.
    direction : ``"fpr"`` when the bound came from ``(1 - delta - FNR_hi) / FPR_hi``,
        ``"fnr"`` for the other inequality, ``""`` when ``eps_lb`` is 0.
    fp, fn : false positives (OUT runs scored >= threshold) and false negatives
        (IN runs scored below it) at that threshold.
    fpr_hi, fnr_hi : their Clopper-Pearson upper bounds.
    n_in, n_out : number of IN and OUT runs.
    delta, alpha, two_sided : the settings used.
    """

    eps_lb: float
    threshold: float
    direction: str
    fp: int
    fn: int
    fpr_hi: float
    fnr_hi: float
    n_in: int
    n_out: int
    delta: float
    alpha: float
    two_sided: bool

    def to_dict(self) -> dict[str, float | int | str | bool]:
        """Plain-dict form."""
        return asdict(self)


def _cp_upper(k: np.ndarray, n: int, level: float) -> np.ndarray:
    """Vectorised Clopper-Pearson upper bound ``Beta.ppf(level, k + 1, n - k)``, 1 at ``k = n``."""
    k = np.asarray(k, dtype=np.float64)
    out = np.ones_like(k)
    inner = k < n
    out[inner] = beta_dist.ppf(level, k[inner] + 1.0, n - k[inner])
    return out


def empirical_epsilon(
    scores_in: np.ndarray | Sequence[float],
    scores_out: np.ndarray | Sequence[float],
    delta: float,
    *,
    alpha: float = 0.05,
    two_sided: bool = True,
    threshold: float | None = None,
) -> AuditResult:
    """Empirical epsilon lower bound from canary scores.

    Parameters
    ----------
    scores_in : [a] test scores of the runs trained WITH the canary (higher = "in").
    scores_out : [b] test scores of the runs trained WITHOUT it.
    delta : the DP delta of the audited mechanism, ``0 <= delta < 1``.
    alpha : confidence parameter of the Clopper-Pearson bounds (module docstring).
    two_sided : which confidence convention (module docstring).
    threshold : evaluate only this threshold; default: every distinct score.

    Returns
    -------
    AuditResult
        ``eps_lb = max over thresholds of max(log((1 - delta - FNR_hi) / FPR_hi),
        log((1 - delta - FPR_hi) / FNR_hi))``, clamped at 0; log of a non-positive
        numerator counts as ``-inf``.

    Raises
    ------
    ValueError
        Empty or non-1-D inputs, NaN/inf, delta or alpha out of range.
    """
    s_in = as_array("scores_in", scores_in, ndim=1)
    s_out = as_array("scores_out", scores_out, ndim=1)
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError(f"need at least one IN and one OUT score, got {s_in.size} and {s_out.size}")
    delta = finite_float("delta", delta)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    a, b = s_in.size, s_out.size
    if threshold is None:
        thr = np.unique(np.concatenate([s_in, s_out]))
    else:
        thr = np.asarray([finite_float("threshold", threshold)])
    sorted_in = np.sort(s_in)
    sorted_out = np.sort(s_out)
    fn = np.searchsorted(sorted_in, thr, side="left")  # IN runs below the threshold
    fp = b - np.searchsorted(sorted_out, thr, side="left")  # OUT runs at or above it
    level = 1.0 - (alpha / 2.0 if two_sided else alpha)
    fpr_hi = _cp_upper(fp, b, level)
    fnr_hi = _cp_upper(fn, a, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        num1 = 1.0 - delta - fnr_hi
        num2 = 1.0 - delta - fpr_hi
        e1 = np.where(num1 > 0, np.log(np.maximum(num1, 1e-300)) - np.log(fpr_hi), -np.inf)
        e2 = np.where(num2 > 0, np.log(np.maximum(num2, 1e-300)) - np.log(fnr_hi), -np.inf)
    best = np.maximum(e1, e2)
    k = int(np.argmax(best))
    eps = float(best[k])
    common = {"n_in": a, "n_out": b, "delta": delta, "alpha": float(alpha), "two_sided": bool(two_sided)}
    if not eps > 0.0:
        return AuditResult(
            eps_lb=0.0, threshold=math.nan, direction="", fp=int(fp[k]), fn=int(fn[k]),
            fpr_hi=float(fpr_hi[k]), fnr_hi=float(fnr_hi[k]), **common,
        )
    return AuditResult(
        eps_lb=eps,
        threshold=float(thr[k]),
        direction="fpr" if e1[k] >= e2[k] else "fnr",
        fp=int(fp[k]),
        fn=int(fn[k]),
        fpr_hi=float(fpr_hi[k]),
        fnr_hi=float(fnr_hi[k]),
        **common,
    )


def check_audit(eps_lb: float | AuditResult, eps_claimed: float, *, tol: float = 0.0) -> None:
    """Raise :class:`AuditViolation` when the empirical bound exceeds the claimed epsilon.

    Parameters
    ----------
    eps_lb : a lower bound (float) or an :class:`AuditResult`.
    eps_claimed : the epsilon the accountant reports for the same mechanism
        (``math.inf`` for a non-private run never raises).
    tol : slack added to ``eps_claimed`` before comparing (default 0).

    Raises
    ------
    AuditViolation
        ``eps_lb > eps_claimed + tol``: the mechanism leaks more than claimed (or the
        accountant / implementation is wrong).
    ValueError
        NaN inputs or a negative claim.
    """
    lb = eps_lb.eps_lb if isinstance(eps_lb, AuditResult) else float(eps_lb)
    claimed = float(eps_claimed)
    if math.isnan(lb) or math.isnan(claimed) or math.isnan(tol):
        raise ValueError(f"check_audit got NaN: eps_lb={lb}, eps_claimed={claimed}, tol={tol}")
    if claimed < 0:
        raise ValueError(f"eps_claimed must be >= 0, got {claimed}")
    if lb > claimed + tol:
        raise AuditViolation(
            f"DP audit failed: empirical epsilon lower bound {lb:.4f} exceeds the claimed epsilon "
            f"{claimed:.4f} (tolerance {tol:g}); the mechanism leaks more than its accounting says"
        )
