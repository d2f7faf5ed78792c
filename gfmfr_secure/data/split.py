"""Per-user leave-one-out split by timestamp, stored as CSR training lists."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gfmfr_secure.data._util import preview
from gfmfr_secure.data.dataset import InteractionData
from gfmfr_secure.errors import ConfigError, DataError

__all__ = ["Split", "csr_rows", "leave_one_out"]


def csr_rows(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions of the entries of CSR ``rows`` (``int64 [R]``), concatenated row by row.

    ``indptr`` is ``int64 [U+1]``; returns ``int64 [sum of the rows' lengths]``.
    """
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    total = int(lengths.sum())
    # position = start of its row + offset within the row
    row_of = np.repeat(np.arange(rows.shape[0], dtype=np.int64), lengths)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts[row_of] + offsets


@dataclass(frozen=True, eq=False)
class Split:
    """Train / validation / test split with at most one held-out item per user and stage.

    Attributes
    ----------
    n_users, n_items : int
        ``U`` and ``I``.
    train_indptr : np.ndarray
        ``int64 [U+1]`` CSR row pointer into ``train_items``.
    train_items : np.ndarray
        ``int64 [N_train]``; the training items of user ``u`` are
        ``train_items[train_indptr[u]:train_indptr[u+1]]``, ascending and unique.
    val_items, test_items : np.ndarray
        ``int64 [U]`` held-out item per user, ``-1`` where the user has none.
    """

    n_users: int
    n_items: int
    train_indptr: np.ndarray
    train_items: np.ndarray
    val_items: np.ndarray
    test_items: np.ndarray

    def __post_init__(self) -> None:
        u = self.n_users
        for name in ("train_indptr", "val_items", "test_items", "train_items"):
            arr = getattr(self, name)
            if name == "train_items":
                shape: tuple[int, ...] = (int(self.train_indptr[-1]),)
            else:
                shape = (u + 1,) if name == "train_indptr" else (u,)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.int64 or arr.shape != shape:
                got = (arr.dtype, arr.shape) if isinstance(arr, np.ndarray) else type(arr).__name__
                raise DataError(f"Split.{name} must be int64 with shape {shape}, got {got}")
            if name == "train_indptr" and (arr[0] != 0 or np.any(np.diff(arr) < 0)):
                raise DataError("Split.train_indptr must start at 0 and be non-decreasing")
        for name in ("train_items", "val_items", "test_items"):
            arr = getattr(self, name)
            low = 0 if name == "train_items" else -1
            if arr.size and (arr.min() < low or arr.max() >= self.n_items):
                raise DataError(f"Split.{name} out of range [{low}, {self.n_items})")
        # within each user: strictly increasing (sorted, unique)
        step = np.diff(self.train_items)
        row_start = np.zeros(step.shape[0], dtype=bool)
        starts = self.train_indptr[1:-1]
        row_start[starts[(starts > 0) & (starts <= step.shape[0])] - 1] = True
        bad = np.flatnonzero((step <= 0) & ~row_start)
        if bad.size:
            user = int(np.searchsorted(self.train_indptr, bad[0], side="right") - 1)
            raise DataError(f"Split.train_items of user {user} are not sorted and unique")

    @property
    def train_users(self) -> np.ndarray:
        """``int64 [N_train]`` user of each entry of ``train_items``."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.train_counts())

    def train_counts(self) -> np.ndarray:
        """``int64 [U]`` number of training items per user."""
        return np.diff(self.train_indptr)

    def train_of(self, user: int) -> np.ndarray:
        """``int64 [n_u]`` training items of one user (a view)."""
        return self.train_items[self.train_indptr[user] : self.train_indptr[user + 1]]

    def heldout(self, which: str) -> np.ndarray:
        """``int64 [U]`` validation (``"val"``) or test (``"test"``) items, ``-1`` where none."""
        if which not in ("val", "test"):
            raise ConfigError(f"which must be 'val' or 'test', got {which!r}")
        return self.val_items if which == "val" else self.test_items


def _user_time_order(users: np.ndarray, timestamps: np.ndarray, n_users: int) -> np.ndarray:
    """Row order ``int64 [N]`` by user, then timestamp, then row (a stable sort)."""
    if users.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    t_min = int(timestamps.min())
    span = int(timestamps.max()) - t_min + 1
    if n_users * span < 2**62:
        # one packed int64 key sorts about twice as fast as np.lexsort on two keys
        return np.argsort(users * np.int64(span) + (timestamps - t_min), kind="stable")
    return np.lexsort((timestamps, users))  # also stable


def leave_one_out(data: InteractionData, min_interactions: int = 3) -> Split:
    """Split each user's history by time: latest -> test, second latest -> validation.

    Interactions of a user are ordered by timestamp; equal timestamps keep the
    order of the rows in ``data`` (the source file order). Rule for short
    histories, by a user's number of interactions ``n``:

    - ``n >= min_interactions``: train (``n - 2`` items), validation, test;
    - ``2 <= n < min_interactions``: train (``n - 1`` items) and test, no validation;
    - ``n == 1``: train only (no validation, no test).

    The loaders never produce users without interactions (``ml100k-mm`` raises
    on them, ``csv`` defines users by their interactions, :func:`to_implicit`
    and :func:`kcore` drop users they empty); a hand-built
    :class:`InteractionData` with such a user is rejected here.

    Parameters
    ----------
    data : InteractionData
        ``N`` interactions of ``U`` users on ``I`` items.
    min_interactions : int
        Smallest history that gets a validation item; at least 3.

    Returns
    -------
    Split
        ``train_items [N - #val - #test]`` in CSR form, ``val_items [U]``, ``test_items [U]``.

    Raises
    ------
    DataError
        A user with no interactions ("empty user").
    ConfigError
        ``min_interactions < 3``.
    """
    if min_interactions < 3:
        raise ConfigError(
            f"min_interactions must be at least 3 (one train item), got {min_interactions}"
        )
    n_users, n_items = data.n_users, data.n_items
    counts = np.bincount(data.users, minlength=n_users).astype(np.int64)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(
            f"{data.name}: {empty.size} empty user(s) with no interactions: "
            f"{preview(data.user_map.ids[empty])} (filter them out before splitting)"
        )
    order = _user_time_order(data.users, data.timestamps, n_users)
    ends = np.cumsum(counts)
    has_test = counts >= 2
    has_val = counts >= min_interactions
    test_pos = ends[has_test] - 1
    val_pos = ends[has_val] - 2
    test_items = np.full(n_users, -1, dtype=np.int64)
    val_items = np.full(n_users, -1, dtype=np.int64)
    test_items[has_test] = data.items[order[test_pos]]
    val_items[has_val] = data.items[order[val_pos]]

    train_mask = np.ones(order.shape[0], dtype=bool)
    train_mask[test_pos] = False
    train_mask[val_pos] = False
    train_rows = order[train_mask]
    keys = np.sort(data.users[train_rows] * np.int64(n_items) + data.items[train_rows])
    train_counts = counts - has_test - has_val
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(train_counts, out=indptr[1:])
    return Split(
        n_users=n_users,
        n_items=n_items,
        train_indptr=indptr,
        train_items=keys % np.int64(n_items),
        val_items=val_items,
        test_items=test_items,
    )
