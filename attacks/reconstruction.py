"""Exact reconstruction of each client's training set from its uploaded item rows.

Under ``plain`` the server receives, per client, the item-table rows the client
trained on this round: its training positives and the distinct items among its
sampled negatives (:func:`gfmfr_secure.data.negatives.sample_training` draws
``num_negatives`` negatives per positive, uniformly *with replacement* from the
items that are not training positives, so negatives never coincide with a positive
but may repeat). Interaction inference scores each uploaded row; reconstruction
turns the scores into a hard decision per client and is judged like a set
prediction: precision, recall, F1 over all (client, item) decisions and the
fraction of clients whose training set is recovered with no error.

Row scores (higher = positive)
------------------------------
``dot`` scorer
    one local step moves row ``i`` by ``-lr (p - y) v`` with ``v = e_u + w2``, so
    every row of a client lies near one line: :func:`attacks.interaction.dot_imia_row_scores`
    (power iteration per client, sign fixed by the class balance).
``mlp`` scorer
    a row moves along ``g = W1i^T (w2 * gate)``; with about half the ReLU gates open
    the expected direction is ``W1i^T w2`` whatever the user, so a fixed projection
    of each row on the broadcast ``W1i^T w2`` needs no fitting
    (:func:`fixed_direction_row_scores`). IMIA (Yuan et al. 2023) fits a user
    embedding instead (:func:`attacks.interaction.imia_row_scores`).

Decisions
---------
``count``
    the server knows ``num_negatives`` and the item count ``I``, so from the number
    of rows a client uploaded it estimates how many are positives
    (:func:`positives_from_row_count`, which accounts for repeated negatives) and
    labels that many of the client's top-scored rows positive.
``sign``
    a row is a positive when its score is above 0 (the scores above are signed
    projections, positive along the positives' direction).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attacks.base import as_array

__all__ = [
    "DECISIONS",
    "decide_by_count",
    "decide_by_sign",
    "expected_uploaded_rows",
    "fixed_direction_row_scores",
    "positives_from_row_count",
    "reconstruction_metrics",
]

DECISIONS: tuple[str, ...] = ("count", "sign")


def expected_uploaded_rows(n_pos: np.ndarray | int, num_negatives: int, n_items: int) -> np.ndarray:
    """Expected number of distinct rows a client with ``n_pos`` training positives uploads.

    ``n_pos`` positives plus the distinct items among ``n_pos * num_negatives``
    uniform draws with replacement from the ``N = I - n_pos`` other items:
    ``n_pos + N (1 - (1 - 1/N)^(n_pos * num_negatives))``.

    Parameters
    ----------
    n_pos : int or int64 [n], each in ``[0, I)``.
    num_negatives : negatives drawn per positive (``>= 0``).
    n_items : item universe ``I``.

    Returns
    -------
    float64 array of the shape of ``n_pos``.
    """
    n = np.asarray(n_pos, dtype=np.float64)
    if num_negatives < 0 or n_items < 1:
        raise ValueError(f"need num_negatives >= 0 and n_items >= 1, got {num_negatives}, {n_items}")
    if n.size and (n.min() < 0 or n.max() >= n_items):
        raise ValueError(f"n_pos must be in [0, {n_items}) (a client needs an admissible negative)")
    pool = n_items - n
    distinct = pool * -np.expm1(n * num_negatives * np.log1p(-1.0 / pool))
    return n + distinct


def positives_from_row_count(n_rows: np.ndarray | Sequence[int], num_negatives: int, n_items: int) -> np.ndarray:
    """Number of positives that best explains each client's count of uploaded rows.

    The integer ``n`` whose :func:`expected_uploaded_rows` is closest to ``n_rows``
    (the expectation increases with ``n``; ties go to the smaller ``n``). Without
    repeated negatives this would be ``n_rows / (1 + num_negatives)``; with them a
    client uploads fewer distinct negatives, most visibly for long histories.

    Parameters
    ----------
    n_rows : int64 [n] distinct rows uploaded per client.
    num_negatives, n_items : as in :func:`expected_uploaded_rows`.

    Returns
    -------
    int64 [n], each in ``[0, n_rows]``.
    """
    rows = as_array("n_rows", n_rows, ndim=1, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() > n_items):
        raise ValueError(f"n_rows must be in [0, {n_items}]")
    lo = np.zeros(rows.size, dtype=np.int64)  # expected(lo) <= rows holds at lo = 0
    hi = np.minimum(rows, n_items - 1)
    # largest n with expected(n) <= rows, by bisection on integers
    while np.any(lo < hi):
        mid = (lo + hi + 1) // 2
        ok = expected_uploaded_rows(mid, num_negatives, n_items) <= rows + 1e-9
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid - 1)
    up = np.minimum(lo + 1, np.minimum(rows, n_items - 1))
    closer_up = np.abs(expected_uploaded_rows(up, num_negatives, n_items) - rows) < np.abs(expected_uploaded_rows(lo, num_negatives, n_items) - rows)
    return np.where(closer_up, up, lo).astype(np.int64)


def fixed_direction_row_scores(item_delta: np.ndarray, w1_item: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Signed projection of each uploaded row on the broadcast ``W1i^T w2`` (``mlp`` scorer).

    Parameters
    ----------
    item_delta : float [R, d] uploaded row minus broadcast row.
    w1_item : float [h, d]; w2 : float [h] -- the broadcast head.

    Returns
    -------
    float64 [R]: ``<delta_r, u>`` with ``u = W1i^T w2 / |W1i^T w2|``.

    Raises
    ------
    ValueError
        ``W1i^T w2 = 0`` (e.g. the ``dot`` scorer, whose first layer is unused).
    """
    rows = as_array("item_delta", item_delta, ndim=2)
    wi = as_array("w1_item", w1_item, ndim=2, shape=(None, rows.shape[1]))
    ww = as_array("w2", w2, ndim=1, shape=(wi.shape[0],))
    u = wi.T @ ww
    norm = float(np.linalg.norm(u))
    if norm == 0.0:
        raise ValueError("W1_item^T w2 is zero: no fixed direction (is this the dot scorer?)")
    return rows @ (u / norm)


def decide_by_count(row_ptr: np.ndarray, scores: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """Label the ``n_pos[c]`` top-scored rows of each client ``c`` positive.

    Parameters
    ----------
    row_ptr : int64 [n + 1]; scores : float [R]; n_pos : int64 [n].

    Returns
    -------
    bool [R].
    """
    ptr = as_array("row_ptr", row_ptr, ndim=1, dtype=np.int64)
    s = as_array("scores", scores, ndim=1, shape=(int(ptr[-1]),))
    k = as_array("n_pos", n_pos, ndim=1, dtype=np.int64, shape=(ptr.size - 1,))
    n = ptr.size - 1
    owner = np.repeat(np.arange(n), np.diff(ptr))
    # rank of each row within its client, by decreasing score (stable: ties to the earlier row)
    order = np.lexsort((-s, owner))
    rank = np.empty(s.size, dtype=np.int64)
    rank[order] = np.arange(s.size) - ptr[owner[order]]
    return rank < k[owner]


def decide_by_sign(scores: np.ndarray) -> np.ndarray:
    """bool [R]: a row is a positive when its score is above 0."""
    return as_array("scores", scores, ndim=1) > 0.0


def reconstruction_metrics(row_ptr: np.ndarray, predicted: np.ndarray, truth: np.ndarray, missed: np.ndarray | None = None) -> dict[str, float]:
    """Set-prediction metrics of a per-client reconstruction.

    Parameters
    ----------
    row_ptr : int64 [n + 1] each client's uploaded rows.
    predicted : bool [R] rows labelled positive.
    truth : bool [R] rows that are the client's training positives.
    missed : int64 [n] training positives of each client that were *not* uploaded
        (counted as false negatives; default none).

    Returns
    -------
    dict: ``precision``, ``recall``, ``f1`` (micro over all decisions; precision is 1
    when nothing is predicted), ``exact_recovery`` (fraction of clients with no false
    positive and no false negative), ``tp``, ``fp``, ``fn``, ``clients``.
    """
    ptr = as_array("row_ptr", row_ptr, ndim=1, dtype=np.int64)
    pred = as_array("predicted", predicted, ndim=1, dtype=np.bool_, shape=(int(ptr[-1]),))
    true = as_array("truth", truth, ndim=1, dtype=np.bool_, shape=(int(ptr[-1]),))
    n = ptr.size - 1
    miss = np.zeros(n, np.int64) if missed is None else as_array("missed", missed, ndim=1, dtype=np.int64, shape=(n,))
    owner = np.repeat(np.arange(n), np.diff(ptr))
    fp_c = np.bincount(owner, pred & ~true, minlength=n)
    fn_c = np.bincount(owner, ~pred & true, minlength=n) + miss
    tp = int((pred & true).sum())
    fp, fn = int(fp_c.sum()), int(fn_c.sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    exact = float(np.mean((fp_c == 0) & (fn_c == 0))) if n else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "exact_recovery": exact, "tp": tp, "fp": fp, "fn": fn, "clients": n}
