"""Core data containers: :class:`IdMap` and :class:`InteractionData`.

An :class:`InteractionData` holds one interaction log in contiguous index space
(users ``0..U-1``, items ``0..I-1``) together with the maps back to the original
ids and the optional side information (user attributes, item table, item
features). Invariants are checked when the object is built, so every function
that receives one can rely on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gfmfr_secure.data._util import preview, sorted_unique
from gfmfr_secure.errors import DataError

__all__ = ["IdMap", "InteractionData"]


@dataclass(frozen=True)
class IdMap:
    """Bijection between original ids and contiguous indices ``0..n-1``.

    Attributes
    ----------
    ids : np.ndarray
        ``[n]`` original ids in index order: ``ids[k]`` is the original id of
        index ``k``. ``int64`` when every id is an integer, otherwise a numpy
        string array (dtype kind ``'U'``). Ids must be unique.
    """

    ids: np.ndarray
    _sorter: np.ndarray = field(init=False, repr=False, compare=False)
    _sorted: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.ndim != 1:
            raise DataError(f"IdMap ids must be 1-D, got shape {ids.shape}")
        if ids.dtype.kind in "iu":
            ids = ids.astype(np.int64, copy=False)
        elif ids.dtype.kind in "OU":
            ids = ids.astype(str)
        else:
            raise DataError(f"IdMap ids must be integers or strings, got dtype {ids.dtype}")
        sorter = np.argsort(ids, kind="stable")
        sorted_ids = ids[sorter]
        repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if repeated.size:
            raise DataError(
                f"IdMap ids must be unique; repeated: {preview(sorted_unique(repeated))}"
            )
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "_sorter", sorter.astype(np.int64))
        object.__setattr__(self, "_sorted", sorted_ids)

    @classmethod
    def from_sorted_unique(cls, original_ids: np.ndarray) -> IdMap:
        """Map built from the sorted unique values of ``original_ids`` (any shape)."""
        return cls(sorted_unique(np.asarray(original_ids).ravel()))

    def index_of(self, original_ids: object) -> np.ndarray:
        """Indices of ``original_ids``.

        Parameters
        ----------
        original_ids : array_like
            ``[m]`` (or scalar) original ids, of the same kind as :attr:`ids`.

        Returns
        -------
        np.ndarray
            ``int64 [m]`` indices (0-d for a scalar input).

        Raises
        ------
        DataError
            If any id is unknown to the map (the unknown ids are listed).
        """
        query = np.asarray(original_ids)
        if self.ids.dtype.kind == "i":
            if query.size and query.dtype.kind not in "iu":
                raise DataError(
                    f"this IdMap holds integer ids; got ids of dtype {query.dtype}: "
                    f"{preview(query.ravel())}"
                )
            query = query.astype(np.int64, copy=False)
        else:
            query = query.astype(str)
        if len(self.ids) == 0:
            if query.size:
                raise DataError(f"unknown ids (the map is empty): {preview(query.ravel())}")
            return np.zeros(query.shape, dtype=np.int64)
        pos = np.searchsorted(self._sorted, query)
        pos = np.minimum(pos, len(self._sorted) - 1)
        found = self._sorted[pos] == query
        if not np.all(found):
            unknown = sorted_unique(query[~found])
            raise DataError(f"{unknown.size} unknown id(s): {preview(unknown)}")
        return self._sorter[pos]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdMap):
            return NotImplemented
        return self.ids.dtype.kind == other.ids.dtype.kind and np.array_equal(self.ids, other.ids)

    def __hash__(self) -> int:
        return hash((self.ids.dtype.kind, len(self), self.ids.tobytes()))

    def take(self, indices: np.ndarray) -> IdMap:
        """Map restricted to ``indices`` (``int64 [k]``), re-indexed ``0..k-1`` in that order."""
        return IdMap(self.ids[np.asarray(indices, dtype=np.int64)])


@dataclass(frozen=True, eq=False)
class InteractionData:
    """One interaction log in contiguous index space, with optional side information.

    Rows keep the order of the source file (after the duplicates policy of the
    loader): the row order breaks timestamp ties in :func:`leave_one_out`.
    A ``(user, item)`` pair appears at most once.

    Attributes
    ----------
    name : str
        Short dataset name (``"ml-100k-mm"``, a file stem, ``"synthetic"``).
    n_users, n_items : int
        Sizes of the user and item universes ``U`` and ``I``.
    users, items : np.ndarray
        ``int64 [N]`` user indices in ``0..U-1`` and item indices in ``0..I-1``.
    ratings : np.ndarray
        ``float32 [N]`` finite ratings (1.0 for implicit data).
    timestamps : np.ndarray
        ``int64 [N]`` interaction times.
    user_map, item_map : IdMap
        Original ids of the ``U`` users and ``I`` items, in index order.
    user_attributes : pd.DataFrame or None
        ``U`` rows in index order (``RangeIndex``); one column per attribute.
    item_table : pd.DataFrame or None
        ``I`` rows in index order (``RangeIndex``); item metadata (title, genres, ...).
    image_paths : tuple of (Path or None) or None
        ``I`` entries; ``None`` where the item has no image file.
    text_features, image_features : np.ndarray or None
        ``float32 [I, Dt]`` and ``float32 [I, Dv]`` item features, finite.
    source : Path or None
        File or folder the data was loaded from.
    feature_files : dict of str to Path
        ``.npy`` file each of ``text_features`` / ``image_features`` was read
        from (keys are those field names; absent for features not read from a file).
    """

    name: str
    n_users: int
    n_items: int
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    user_map: IdMap
    item_map: IdMap
    user_attributes: pd.DataFrame | None = None
    item_table: pd.DataFrame | None = None
    image_paths: tuple[Path | None, ...] | None = None
    text_features: np.ndarray | None = None
    image_features: np.ndarray | None = None
    source: Path | None = None
    feature_files: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.users.shape[0] if isinstance(self.users, np.ndarray) else -1
        for attr, dtype in (
            ("users", np.int64),
            ("items", np.int64),
            ("ratings", np.float32),
            ("timestamps", np.int64),
        ):
            arr = getattr(self, attr)
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
                got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                raise DataError(
                    f"InteractionData.{attr} must be a {np.dtype(dtype)} array, got {got}"
                )
            if arr.shape != (n,):
                raise DataError(f"InteractionData.{attr} has shape {arr.shape}, expected ({n},)")
        if len(self.user_map) != self.n_users:
            raise DataError(f"user_map has {len(self.user_map)} ids but n_users = {self.n_users}")
        if len(self.item_map) != self.n_items:
            raise DataError(f"item_map has {len(self.item_map)} ids but n_items = {self.n_items}")
        if n:
            for attr, bound in (("users", self.n_users), ("items", self.n_items)):
                arr = getattr(self, attr)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < 0 or hi >= bound:
                    raise DataError(
                        f"InteractionData.{attr} out of range [0, {bound}): min {lo}, max {hi}"
                    )
            if not np.all(np.isfinite(self.ratings)):
                bad = int(np.flatnonzero(~np.isfinite(self.ratings))[0])
                raise DataError(
                    f"InteractionData.ratings not finite at row {bad}: {self.ratings[bad]}"
                )
            keys = np.sort(self.users * np.int64(self.n_items) + self.items)
            same = np.flatnonzero(keys[1:] == keys[:-1])
            if same.size:
                k = int(keys[same[0]])
                raise DataError(
                    f"InteractionData has {same.size} repeated (user, item) pair(s), first: "
                    f"user index {k // self.n_items}, item index {k % self.n_items}"
                )
        for attr, rows in (("user_attributes", self.n_users), ("item_table", self.n_items)):
            frame = getattr(self, attr)
            if frame is not None and len(frame) != rows:
                raise DataError(f"InteractionData.{attr} has {len(frame)} rows, expected {rows}")
        if self.image_paths is not None and len(self.image_paths) != self.n_items:
            raise DataError(
                f"InteractionData.image_paths has {len(self.image_paths)} entries, "
                f"expected {self.n_items}"
            )
        for attr in ("text_features", "image_features"):
            feats = getattr(self, attr)
            if feats is None:
                continue
            if not isinstance(feats, np.ndarray) or feats.dtype != np.float32 or feats.ndim != 2:
                raise DataError(f"InteractionData.{attr} must be a 2-D float32 array")
            if feats.shape[0] != self.n_items:
                raise DataError(
                    f"InteractionData.{attr} has {feats.shape[0]} rows "
                    f"but there are {self.n_items} items"
                )

    @property
    def n_interactions(self) -> int:
        """Number of interaction rows ``N``."""
        return int(self.users.shape[0])

    def __repr__(self) -> str:
        return (
            f"InteractionData(name={self.name!r}, n_users={self.n_users}, n_items={self.n_items}, "
            f"n_interactions={self.n_interactions}, source={self.source!r})"
        )
