"""Group membership inference: which server-side group does a user belong to?

GFMFR broadcasts a teacher ``q [G, I]``: each group's preference for every item
(:mod:`gfmfr_secure.server.teacher`). An adversary who knows (some of) a user's
items -- an outsider with auxiliary knowledge, or the output of an
interaction-level attack -- can guess the user's group as the one whose
preferences best explain those items. Group ids are the server's own, so no label
permutation is needed.

Scoring rules (``scores [U, G]``, prediction = argmax over groups):

``"mean"``
    the mean teacher preference over the user's known items, ``mean_i q[g, i]``.
``"loglik"``
    the mean multinomial log-likelihood of the items when group ``g`` picks item
    ``i`` with probability ``q[g, i] / sum_j q[g, j]`` (needs ``q > 0``; it
    discounts groups that like everything).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import f1_score

from attacks.base import as_array

__all__ = ["GROUP_METHODS", "group_inference", "group_scores", "partition_match"]

GROUP_METHODS: tuple[str, ...] = ("mean", "loglik")


def _check_csr(indptr: np.ndarray | Sequence[int], items: np.ndarray | Sequence[int], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    ptr = as_array("indptr", indptr, ndim=1, dtype=np.int64)
    it = as_array("items", items, ndim=1, dtype=np.int64)
    if ptr.size < 1 or ptr[0] != 0 or ptr[-1] != it.size or np.any(np.diff(ptr) < 0):
        raise ValueError(f"indptr must start at 0, be non-decreasing and end at len(items)={it.size}")
    if it.size and (it.min() < 0 or it.max() >= n_items):
        raise ValueError(f"items must be in [0, {n_items}), got range [{it.min()}, {it.max()}]")
    return ptr, it


def group_scores(
    teacher: np.ndarray,
    indptr: np.ndarray | Sequence[int],
    items: np.ndarray | Sequence[int],
    *,
    method: str = "mean",
) -> np.ndarray:
    """Score every (user, group) pair from the user's known items.

    Parameters
    ----------
    teacher : [G, I] group preference scores.
    indptr : [U + 1] CSR row pointer: user ``u``'s items are ``items[indptr[u]:indptr[u + 1]]``.
    items : [nnz] item ids.
    method : ``"mean"`` or ``"loglik"`` (module docstring).

    Returns
    -------
    np.ndarray [U, G]; rows of users without items are NaN.
    """
    q = as_array("teacher", teacher, ndim=2)
    n_groups, n_items = q.shape
    if n_groups < 1:
        raise ValueError("teacher needs at least one group")
    ptr, it = _check_csr(indptr, items, n_items)
    if method == "mean":
        table = q
    elif method == "loglik":
        if q.size and q.min() <= 0:
            raise ValueError("method 'loglik' needs strictly positive teacher scores")
        table = np.log(q) - np.log(q.sum(axis=1, keepdims=True))
    else:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(GROUP_METHODS)}")
    n_users = ptr.size - 1
    counts = np.diff(ptr).astype(np.float64)
    weights = np.repeat(1.0 / np.maximum(counts, 1.0), np.diff(ptr))
    a = sp.csr_matrix((weights, it, ptr), shape=(n_users, n_items))
    scores = np.asarray(a @ table.T)
    scores[counts == 0] = np.nan
    return scores


def group_inference(
    teacher: np.ndarray,
    user_items: tuple[np.ndarray, np.ndarray],
    true_groups: np.ndarray | Sequence[int],
    *,
    method: str = "mean",
) -> dict[str, Any]:
    """Predict each user's group from the teacher and the user's known items.

    Parameters
    ----------
    teacher : [G, I] group preference scores (the broadcast teacher).
    user_items : ``(indptr [U + 1], items [nnz])`` CSR of the items the adversary
        knows per user.
    true_groups : [U] the server's group id of each user, in ``[0, G)``.
    method : ``"mean"`` or ``"loglik"`` (module docstring).

    Returns
    -------
    dict with

    - ``accuracy``, ``macro_f1`` : over users with at least one known item.
    - ``baseline_chance`` : ``1 / G``.
    - ``baseline_accuracy`` : rate of the most frequent true group (always guessing it).
    - ``baseline_macro_f1`` : macro F1 of that constant guess.
    - ``n_evaluated``, ``n_no_items``, ``n_groups`` : counts.
    - ``pred`` : [U] predicted group (-1 for users without items); ``scores`` : [U, G].

    Macro F1 averages over the groups present among the evaluated users' true groups.
    """
    if not isinstance(user_items, tuple) or len(user_items) != 2:
        raise ValueError("user_items must be a tuple (indptr, items)")
    scores = group_scores(teacher, user_items[0], user_items[1], method=method)
    n_users, n_groups = scores.shape
    truth = as_array("true_groups", true_groups, ndim=1, dtype=np.int64)
    if truth.size != n_users:
        raise ValueError(f"true_groups has {truth.size} entries but user_items describes {n_users} users")
    if truth.size and (truth.min() < 0 or truth.max() >= n_groups):
        raise ValueError(f"true_groups must be in [0, {n_groups}), got range [{truth.min()}, {truth.max()}]")
    has = ~np.isnan(scores[:, 0]) if n_users else np.zeros(0, dtype=bool)
    if not has.any():
        raise ValueError("no user has a known item; nothing to evaluate")
    pred = np.full(n_users, -1, dtype=np.int64)
    pred[has] = np.argmax(scores[has], axis=1)
    t, p = truth[has], pred[has]
    present = np.unique(t)
    vals, counts = np.unique(t, return_counts=True)
    majority = vals[np.argmax(counts)]
    return {
        "accuracy": float(np.mean(p == t)),
        "macro_f1": float(f1_score(t, p, average="macro", labels=present, zero_division=0)),
        "baseline_chance": 1.0 / n_groups,
        "baseline_accuracy": float(counts.max() / t.size),
        "baseline_macro_f1": float(f1_score(t, np.full(t.size, majority), average="macro", labels=present, zero_division=0)),
        "n_evaluated": int(has.sum()),
        "n_no_items": int((~has).sum()),
        "n_groups": int(n_groups),
        "pred": pred,
        "scores": scores,
    }


def partition_match(found: np.ndarray | Sequence[int], truth: np.ndarray | Sequence[int]) -> dict[str, float]:
    """How well one grouping of the same users reproduces another.

    Parameters
    ----------
    found : [U] group ids the adversary holds (any non-negative integer coding).
    truth : [U] the true group ids.

    Returns
    -------
    dict with ``match_rate`` (fraction of users whose found id equals the true id),
    ``relabelled_match_rate`` (the same after the one-to-one relabelling of found ids
    that maximises it, :func:`scipy.optimize.linear_sum_assignment`: group names are
    arbitrary, the partition is what matters), ``n_matched`` (users matched after
    relabelling) and ``n_users``.
    """
    from scipy.optimize import linear_sum_assignment

    f = as_array("found", found, ndim=1, dtype=np.int64)
    t = as_array("truth", truth, ndim=1, dtype=np.int64)
    if f.size != t.size:
        raise ValueError(f"found has {f.size} entries but truth has {t.size}")
    if f.size == 0:
        raise ValueError("no users to compare")
    if f.min() < 0 or t.min() < 0:
        raise ValueError("group ids must be non-negative")
    overlap = np.zeros((int(f.max()) + 1, int(t.max()) + 1), dtype=np.int64)
    np.add.at(overlap, (f, t), 1)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    matched = int(overlap[rows, cols].sum())
    return {
        "match_rate": float(np.mean(f == t)),
        "relabelled_match_rate": matched / f.size,
        "n_matched": float(matched),
        "n_users": float(f.size),
    }
