"""Interaction filters: implicit feedback and k-core, with consistent re-indexing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from gfmfr_secure.data.dataset import InteractionData
from gfmfr_secure.errors import ConfigError

__all__ = ["kcore", "restrict", "to_implicit"]


def restrict(
    data: InteractionData,
    rows: np.ndarray,
    keep_users: np.ndarray | None = None,
    keep_items: np.ndarray | None = None,
) -> InteractionData:
    """Keep some rows, users and items, re-indexing users and items contiguously.

    Parameters
    ----------
    data : InteractionData
        Source data.
    rows : np.ndarray
        ``bool [N]`` rows to keep (their order is preserved).
    keep_users, keep_items : np.ndarray, optional
        ``bool [U]`` / ``bool [I]`` users and items to keep (default: all). Every
        kept row must refer to a kept user and item.

    Returns
    -------
    InteractionData
        Users and items renumbered in their original index order; maps, user
        attributes, item table, image paths and features restricted alike.
    """
    keep_users = np.ones(data.n_users, dtype=bool) if keep_users is None else keep_users
    keep_items = np.ones(data.n_items, dtype=bool) if keep_items is None else keep_items
    user_new = np.cumsum(keep_users, dtype=np.int64) - 1
    item_new = np.cumsum(keep_items, dtype=np.int64) - 1
    kept_users = np.flatnonzero(keep_users)
    kept_items = np.flatnonzero(keep_items)

    def take_rows(frame: pd.DataFrame | None, kept: np.ndarray) -> pd.DataFrame | None:
        return None if frame is None else frame.iloc[kept].reset_index(drop=True)

    def take_feats(feats: np.ndarray | None) -> np.ndarray | None:
        return None if feats is None else np.ascontiguousarray(feats[kept_items])

    return dataclasses.replace(
        data,
        n_users=int(kept_users.size),
        n_items=int(kept_items.size),
        users=user_new[data.users[rows]],
        items=item_new[data.items[rows]],
        ratings=data.ratings[rows],
        timestamps=data.timestamps[rows],
        user_map=data.user_map.take(kept_users),
        item_map=data.item_map.take(kept_items),
        user_attributes=take_rows(data.user_attributes, kept_users),
        item_table=take_rows(data.item_table, kept_items),
        image_paths=None
        if data.image_paths is None
        else tuple(data.image_paths[i] for i in kept_items.tolist()),
        text_features=take_feats(data.text_features),
        image_features=take_feats(data.image_features),
    )


def to_implicit(data: InteractionData, threshold: float = 0.0) -> InteractionData:
    """Implicit feedback: rows with ``rating >= threshold`` become positives with rating 1.

    Parameters
    ----------
    data : InteractionData
        Explicit ratings ``[N]``.
    threshold : float
        Smallest rating counted as a positive (0 keeps every non-negative rating).

    Returns
    -------
    InteractionData
        The kept rows in their original order, ``ratings`` all 1.0. Users left
        without any positive are dropped (users re-indexed, maps and attributes
        kept consistent); the item universe is unchanged.
    """
    rows = data.ratings >= threshold
    keep_users = np.bincount(data.users[rows], minlength=data.n_users) > 0
    out = restrict(data, rows, keep_users=keep_users)
    return dataclasses.replace(out, ratings=np.ones(out.n_interactions, dtype=np.float32))


def kcore(data: InteractionData, k: int) -> InteractionData:
    """Iterative k-core: drop users and items with fewer than ``k`` interactions until none remain.

    Parameters
    ----------
    data : InteractionData
        Source data ``[N]``.
    k : int
        Minimum interactions per user and per item. ``k <= 1`` returns ``data``
        itself, unchanged.

    Returns
    -------
    InteractionData
        Rows whose user and item both survive, in original order; users and
        items without surviving rows are removed and both are re-indexed with
        maps, attributes, item table, image paths and features kept consistent.
        May be empty (0 users, 0 items) when no k-core exists.
    """
    if not isinstance(k, (int, np.integer)):
        raise ConfigError(f"kcore: k must be an integer, got {k!r}")
    if k <= 1:
        return data
    rows = np.ones(data.n_interactions, dtype=bool)
    while True:
        user_counts = np.bincount(data.users[rows], minlength=data.n_users)
        item_counts = np.bincount(data.items[rows], minlength=data.n_items)
        still = rows & (user_counts[data.users] >= k) & (item_counts[data.items] >= k)
        if np.array_equal(still, rows):
            break
        rows = still
    keep_users = np.bincount(data.users[rows], minlength=data.n_users) > 0
    keep_items = np.bincount(data.items[rows], minlength=data.n_items) > 0
    return restrict(data, rows, keep_users=keep_users, keep_items=keep_items)
