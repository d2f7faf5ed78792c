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

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta as beta_dist

from attacks.base import as_array, finite_float

__all__ = [
    "AuditResult",
    "AuditViolation",
    "OneRunAudit",
    "check_audit",
    "empirical_epsilon",
    "one_run_attainable_epsilon",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]


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


# --------------------------------------------------------------------------- one-run audit


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """p-value of ``v`` correct guesses out of ``r`` under the hypothesis "(eps, delta)-DP".

    Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training
    Run", arXiv:2305.08846), main theorem: ``m`` canaries are each included
    independently with probability 1/2, the auditor guesses in / out for ``r`` of them
    (abstaining on the rest) from the output of one run of an (eps, delta)-DP
    mechanism, and ``W`` counts its correct guesses. Then for every ``v``::

        P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i,
        f(x) = P[Binomial(r, q) >= x],   q = e^eps / (1 + e^eps),

    ``q`` being the accuracy of eps-DP randomised response. With ``delta = 0`` the bound
    is the binomial tail ``f(v)`` alone. (The computation follows the paper's Appendix D.)

    Parameters
    ----------
    m : canaries (each in with probability 1/2); r : guesses made; v : correct guesses;
        ``0 <= v <= r <= m``.
    eps : the hypothesised epsilon (>= 0); delta : its delta, in ``[0, 1]``.

    Returns
    -------
    float in ``[0, 1]``: the bound on ``P[W >= v]`` (capped at 1).
    """
    from scipy.stats import binom

    m, r, v = int(m), int(r), int(v)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    eps = finite_float("eps", eps)
    if eps < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Bin >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= Bin <= v - 1] = sum_{j = v-i}^{v-1} pmf(j), for i = 1..v
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # pmf(v-1), pmf(v-2), ..., pmf(0)
    slope = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * slope, 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05, *, tol: float = 1e-6) -> float:
    """Largest epsilon rejected at level ``beta`` by :func:`one_run_p_value` (0 if none).

    A mechanism that is (eps, delta)-DP makes ``v`` or more correct guesses with
    probability at most ``one_run_p_value(m, r, v, eps, delta)``; every eps whose
    p-value is below ``beta`` is rejected, so with confidence ``1 - beta`` the mechanism
    is not (eps, delta)-DP for any eps below the returned value. Bisection on eps (the
    p-value grows with eps).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:
            raise ValueError(f"no finite epsilon explains m={m}, r={r}, v={v}, delta={delta} at beta={beta}")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_attainable_epsilon(m: int, r: int, delta: float, beta: float = 0.05) -> float:
    """The largest bound ``r`` guesses can give: every guess correct (``v = r``).

    With ``delta = 0`` it solves ``q^r = beta``, i.e. ``eps = log(q / (1 - q))`` with
    ``q = beta^(1/r)``; a claim above it can never be refuted by this many guesses.
    """
    return one_run_epsilon_lower_bound(m, r, r, delta, beta)


@dataclass(frozen=True)
class OneRunAudit:
    """Outcome of :func:`one_run_audit`.

    Attributes
    ----------
    eps_lb : the lower bound (confidence ``1 - beta``, Bonferroni over the ``k`` tried).
    k : guesses per side reaching it (top ``k`` guessed in, bottom ``k`` out); r = 2k.
    r, v : guesses and correct guesses at that ``k``.
    m : canaries; n_in : canaries included; beta, delta : settings.
    attainable : the largest bound any outcome could give with these ``k`` (all correct).
    """

    eps_lb: float
    k: int
    r: int
    v: int
    m: int
    n_in: int
    beta: float
    delta: float
    attainable: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain-dict form."""
        return asdict(self)


def one_run_audit(
    scores: np.ndarray | Sequence[float],
    included: np.ndarray | Sequence[bool],
    delta: float,
    *,
    beta: float = 0.05,
    k_fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
) -> OneRunAudit:
    """One-run audit (Steinke, Nasr and Jagielski 2023) from canary scores.

    For each ``k = round(f * m / 2)`` (``f`` in ``k_fractions``) the auditor guesses
    "in" for the ``k`` highest scores and "out" for the ``k`` lowest, abstaining on the
    rest, and :func:`one_run_epsilon_lower_bound` turns its correct guesses into a bound
    at level ``beta / len(k_fractions)`` (Bonferroni: the reported maximum over ``k``
    holds at confidence ``1 - beta``). The ``k`` are fixed before the scores are seen.

    Parameters
    ----------
    scores : float [m], higher = "included"; included : bool [m], the coin flips.
    delta : the audited delta; beta : 1 - confidence; k_fractions : in (0, 1].

    Returns
    -------
    OneRunAudit
    """
    s = as_array("scores", scores, ndim=1)
    inc = as_array("included", included, ndim=1, dtype=np.bool_, shape=(s.size,))
    m = s.size
    if m < 2:
        raise ValueError(f"need at least 2 canaries, got {m}")
    if not k_fractions or any(not 0.0 < f <= 1.0 for f in k_fractions):
        raise ValueError(f"k_fractions must be non-empty, each in (0, 1], got {list(k_fractions)}")
    level = beta / len(k_fractions)
    order = np.argsort(-s, kind="stable")
    best: OneRunAudit | None = None
    attainable = 0.0
    for f in k_fractions:
        k = min(max(int(round(f * m / 2)), 1), m // 2)
        v = int(inc[order[:k]].sum() + (~inc[order[m - k :]]).sum())
        eps = one_run_epsilon_lower_bound(m, 2 * k, v, delta, level)
        attainable = max(attainable, one_run_attainable_epsilon(m, 2 * k, delta, level))
        if best is None or eps > best.eps_lb:
            best = OneRunAudit(eps, k, 2 * k, v, m, int(inc.sum()), float(beta), float(delta), 0.0)
    assert best is not None
    return dataclasses.replace(best, attainable=attainable)
