"""Training samples: each user's training positives plus fresh uniform negatives.

Negatives are drawn exactly uniformly from the items a user may receive as a
negative, without rejection. For a user whose excluded items are
``e_0 < e_1 < ... < e_{m-1}`` the ``r``-th admissible item (``0 <= r < I - m``)
is ``r + #{i : e_i - i <= r}``, because ``e_i - i`` counts the admissible items
below ``e_i``. So one uniform integer ``r`` per draw and one
:func:`numpy.searchsorted` over the sorted keys ``user * (I + 1) + (e_i - i)``
place every negative of every user at once; a user who owns nearly every item
costs no more than one who owns few.

The uniform integer of :func:`sample_training`'s draws is keyed, not streamed: the
``k``-th negative of user ``u`` takes its uniform from a counter-based hash
(:func:`keyed_uniforms`, splitmix64) of ``(key, u, k)``, with ``key`` one 63-bit draw
from the round's generator. So a user's negatives do not depend on which other users
are sampled with it: a node hosting part of a cohort draws exactly those users' rows
of the draw for the whole cohort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gfmfr_secure.data._util import sorted_unique
from gfmfr_secure.data.split import Split, csr_rows
from gfmfr_secure.errors import ConfigError, DataError

__all__ = ["TrainingSamples", "keyed_uniforms", "sample_outside", "sample_training"]


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
    rng: np.random.Generator | None,
    uniforms: np.ndarray | None = None,
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
    rng : np.random.Generator or None
        Source of randomness (``D`` integers are drawn); unused with ``uniforms``.
    uniforms : np.ndarray, optional
        ``float64 [D]`` in ``[0, 1)``: draw ``j`` takes the admissible item of rank
        ``floor(uniforms[j] * n_admissible)`` instead of a draw from ``rng``.

    Returns
    -------
    np.ndarray
        ``int64 [D]`` items, each outside the excluded set of its row.
    """
    n_excluded = np.diff(excluded_indptr)
    n_admissible = n_items - n_excluded
    if draw_rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    if uniforms is None:
        if rng is None:
            raise ValueError("sample_outside needs rng or uniforms")
        rank = rng.integers(0, n_admissible[draw_rows], dtype=np.int64)
    else:
        n_adm = n_admissible[draw_rows]
        rank = np.minimum((uniforms * n_adm).astype(np.int64), n_adm - 1)
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
    future. Each call draws anew from ``rng``: one 63-bit key, from which the
    ``k``-th negative of user ``u`` is keyed (:func:`keyed_uniforms`), so sampling
    for a subset of users gives exactly those users' rows of sampling for all.

    Parameters
    ----------
    split : Split
        Source of the training positives (``U`` users, ``I`` items).
    n_neg : int
        Negatives per positive (``>= 0``).
    rng : np.random.Generator
        Randomness for this round; equal generator states give equal samples
        (one integer is drawn from it, whatever the users).
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
    key = int(rng.integers(0, 2**63, dtype=np.int64))
    index = np.arange(neg_local.size, dtype=np.int64) - np.repeat(np.cumsum(n_negs) - n_negs, n_negs)
    uniforms = keyed_uniforms(key, selected[neg_local], index)
    neg_items = sample_outside(excl_indptr, excl_items, neg_local, n_items, None, uniforms=uniforms)

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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 [N] (a bijection with full avalanche), modulo 2^64."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_uniforms(key: int, users: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Uniforms in ``[0, 1)`` keyed by ``(key, user, index)``: float64 [D].

    ``splitmix64(splitmix64(key ^ splitmix64(user)) + index)``, its top 53 bits scaled to
    ``[0, 1)``. Equal triples give equal values; the value of one triple does not depend on
    the others drawn with it.

    Parameters
    ----------
    key : a 63-bit key (one per round).
    users : int64 [D] user of each draw; index : int64 [D] the draw's index within its user.
    """
    with np.errstate(over="ignore"):
        user_key = _splitmix64(np.uint64(key) ^ _splitmix64(np.asarray(users, dtype=np.int64).astype(np.uint64)))
        bits = _splitmix64(user_key + np.asarray(index, dtype=np.int64).astype(np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
