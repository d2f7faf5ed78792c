"""Training samples: each user's training positives plus fresh uniform negatives.

Negatives are drawn exactly uniformly from the items a user may receive as a
negative, without rejection. For a user whose excluded items are
``e_0 < e_1 < ... < e_{m-1}`` the ``r``-th admissible item (``0 <= r < I - m``)
is ``r + #{i : e_i - i <= r}``, because ``e_i - i`` counts the admissible items
below ``e_i``. So one uniform integer ``r`` per draw and one
:func:`numpy.searchsorted` over the sorted keys ``user * (I + 1) + (e_i - i)``
place every negative of every user at once; a user who owns nearly every item
costs no more than one who owns few.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gfmfr_secure.data._util import sorted_unique
from gfmfr_secure.data.split import Split, csr_rows
from gfmfr_secure.errors import ConfigError, DataError

__all__ = ["TrainingSamples", "sample_outside", "sample_training"]


@dataclass(frozen=True, eq=False)
class TrainingSamples:
    """Labelled ``(user, item)`` pairs grouped by user.

    Attributes
    ----------
    users : np.ndarray
        ``int64 [M]`` ascending; each user's rows are contiguous, positives first,
        then its negatives.
    items : np.ndarray
        ``int64 [M]``.
    labels : np.ndarray
        ``float32 [M]``: 1 for a positive, 0 for a negative.
    indptr : np.ndarray
        ``int64 [U+1]``: rows of user ``u`` are ``[indptr[u], indptr[u+1])``
        (empty for users that were not selected).
    """

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    indptr: np.ndarray

    def __len__(self) -> int:
        return int(self.users.shape[0])


def sample_outside(
    excluded_indptr: np.ndarray,
    excluded_items: np.ndarray,
    draw_rows: np.ndarray,
    n_items: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw one item per entry of ``draw_rows``, uniformly from outside that row's excluded set.

    Parameters
    ----------
    excluded_indptr : np.ndarray
        ``int64 [R+1]`` CSR pointer of the excluded sets of ``R`` rows.
    excluded_items : np.ndarray
        ``int64 [E]`` excluded items, ascending and unique within each row.
    draw_rows : np.ndarray
        ``int64 [D]`` row of each draw, values in ``0..R-1``; every such row must
        leave at least one admissible item.
    n_items : int
        Item universe size ``I``.
    rng : np.random.Generator
        Source of randomness (``D`` integers are drawn).

    Returns
    -------
    np.ndarray
        ``int64 [D]`` items, each outside the excluded set of its row.
    """
    n_excluded = np.diff(excluded_indptr)
    n_admissible = n_items - n_excluded
    if draw_rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    rank = rng.integers(0, n_admissible[draw_rows], dtype=np.int64)
    row_of_excluded = np.repeat(np.arange(n_excluded.shape[0], dtype=np.int64), n_excluded)
    below = excluded_items - (
        np.arange(excluded_items.shape[0], dtype=np.int64) - excluded_indptr[row_of_excluded]
    )
    stride = np.int64(n_items + 1)
    keys = row_of_excluded * stride + below
    skipped = (
        np.searchsorted(keys, draw_rows * stride + rank, side="right") - excluded_indptr[draw_rows]
    )
    return rank + skipped


def sample_training(
    split: Split,
    n_neg: int,
    rng: np.random.Generator,
    users: np.ndarray | None = None,
    exclude_heldout: bool = False,
) -> TrainingSamples:
    """Training positives of the selected users, each followed by ``n_neg`` fresh negatives.

    Every training positive ``(u, i)`` contributes one positive row and ``n_neg``
    negative rows for ``u``. Negatives are drawn uniformly, with replacement,
    from the items that are not among ``u``'s training positives: validation and
    test items may be drawn, as for a deployed model that cannot know the
    future. Each call draws anew from ``rng``.

    Parameters
    ----------
    split : Split
        Source of the training positives (``U`` users, ``I`` items).
    n_neg : int
        Negatives per positive (``>= 0``).
    rng : np.random.Generator
        Randomness for this round; equal generator states give equal samples.
    users : np.ndarray, optional
        ``int64 [S]`` user indices to sample for (duplicates ignored); default all.
    exclude_heldout : bool
        Compatibility option reproducing the original GFMFR protocol: negatives
        also avoid the user's validation and test items.

    Returns
    -------
    TrainingSamples
        ``M = sum_u n_u * (1 + n_neg)`` rows over the selected users.

    Raises
    ------
    DataError
        A selected user with training positives has no admissible negative
        item (owns every item); a user index out of range.
    ConfigError
        ``n_neg`` negative or not an integer.
    """
    if isinstance(n_neg, bool) or not isinstance(n_neg, (int, np.integer)) or n_neg < 0:
        raise ConfigError(f"n_neg must be a non-negative integer, got {n_neg!r}")
    n_users, n_items = split.n_users, split.n_items
    if users is None:
        selected = np.arange(n_users, dtype=np.int64)
    else:
        selected = sorted_unique(np.asarray(users, dtype=np.int64))
        if selected.size and (selected[0] < 0 or selected[-1] >= n_users):
            bad = selected[(selected < 0) | (selected >= n_users)]
            raise DataError(
                f"sample_training: user indices out of range [0, {n_users}): {bad[:10].tolist()}"
            )
    n_sel = selected.shape[0]
    positions = csr_rows(split.train_indptr, selected)
    pos_items = split.train_items[positions]
    n_pos = split.train_counts()[selected]
    pos_local = np.repeat(np.arange(n_sel, dtype=np.int64), n_pos)

    if exclude_heldout:
        extra_local, extra_items = [], []
        for heldout in (split.val_items, split.test_items):
            h = heldout[selected]
            has = h >= 0
            extra_local.append(np.flatnonzero(has).astype(np.int64))
            extra_items.append(h[has])
        keys = sorted_unique(
            np.concatenate(
                [pos_local * np.int64(n_items) + pos_items]
                + [u * np.int64(n_items) + i for u, i in zip(extra_local, extra_items, strict=True)]
            )
        )
        excl_local, excl_items = keys // n_items, keys % n_items
    else:
        excl_local, excl_items = pos_local, pos_items
    excl_indptr = np.zeros(n_sel + 1, dtype=np.int64)
    np.cumsum(np.bincount(excl_local, minlength=n_sel), out=excl_indptr[1:])

    n_negs = n_pos * n_neg
    full = (n_negs > 0) & (np.diff(excl_indptr) >= n_items)
    if full.any():
        u = int(selected[np.flatnonzero(full)[0]])
        owned = "training positives and held-out items" if exclude_heldout else "training positives"
        raise DataError(
            f"sample_training: user {u} has no admissible negative item: all {n_items} items "
            f"are among its {owned}"
        )
    neg_local = np.repeat(np.arange(n_sel, dtype=np.int64), n_negs)
    neg_items = sample_outside(excl_indptr, excl_items, neg_local, n_items, rng)

    # user u's block starts at (positives before u) + (negatives before u): positives go
    # there, then its negatives; so a positive moves by the negatives before its user
    # and a negative by the positives up to and including its user.
    sizes = n_pos + n_negs
    total = int(sizes.sum())
    pos_dest = (
        np.arange(pos_local.shape[0], dtype=np.int64) + (np.cumsum(n_negs) - n_negs)[pos_local]
    )
    neg_dest = np.arange(neg_local.shape[0], dtype=np.int64) + np.cumsum(n_pos)[neg_local]
    out_items = np.empty(total, dtype=np.int64)
    out_items[pos_dest] = pos_items
    out_items[neg_dest] = neg_items
    labels = np.zeros(total, dtype=np.float32)
    labels[pos_dest] = 1.0
    all_sizes = np.zeros(n_users, dtype=np.int64)
    all_sizes[selected] = sizes
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(all_sizes, out=indptr[1:])
    return TrainingSamples(
        users=np.repeat(selected, sizes),
        items=out_items,
        labels=labels,
        indptr=indptr,
    )
