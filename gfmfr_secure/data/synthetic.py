"""Synthetic interactions with planted user groups and feature-bearing item clusters.

Generative story (all vectorised, randomness from ``numpy_rng(seed, "synthetic")``):

1. Items fall into ``C = min(2 G, I)`` clusters of near-equal size; cluster ``c``
   has a latent centre ``z_c`` (``L = 16``). Item latent ``h_i = z_{c(i)} + noise``;
   text features ``h_i A_t + noise`` and image features ``h_i A_v + noise``, so
   features reveal the cluster. Within a cluster (items in random order)
   popularity follows a power law: position ``floor(size * u**3)``, ``u ~ U(0, 1)``.
2. Users fall into ``G`` groups; group ``g`` prefers clusters ``2g mod C`` and
   ``(2g + 1) mod C``. A user's history length is ``min_interactions`` plus a
   geometric excess with mean ``mean_interactions - min_interactions``
   (capped at ``max(min_interactions, I // 2)``).
3. Each interaction comes, with probability 0.8, from one of the group's
   preferred clusters, otherwise from a uniformly chosen cluster; repeats are
   redrawn uniformly from the items the user has not got yet.
4. Ratings 1..5 are higher inside preferred clusters; timestamps increase
   along each user's rows, which are in draw (random) order.
5. User attributes: ``group`` (the planted label), ``gender`` whose share of
   ``'M'`` varies with the group, ``age`` whose mean varies with the group.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gfmfr_secure.data.dataset import IdMap, InteractionData
from gfmfr_secure.data.negatives import sample_outside
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.rng import numpy_rng

__all__ = ["make_synthetic"]

_LATENT = 16
_P_PREFERRED = 0.8
_POPULARITY_POWER = 3.0  # position = size * u**3: the first items of a cluster are the popular ones


def _make_distinct(
    users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Replace repeated items of a user by fresh ones, keeping every user's row count.

    ``users`` (``int64 [N]``, ascending) and ``items`` (``int64 [N]``) are the draws;
    a repeat of an earlier draw of the same user is dropped and replaced, at the
    end of that user's rows, by an item drawn uniformly from those the user has
    not got yet. Row order within a user is otherwise preserved.
    """
    counts = np.bincount(users, minlength=n_users)
    while True:
        keys = users * np.int64(n_items) + items
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        repeat = np.zeros(keys.shape[0], dtype=bool)
        repeat[order[1:]] = sorted_keys[1:] == sorted_keys[:-1]
        if not repeat.any():
            return users, items
        first = np.ones(keys.shape[0], dtype=bool)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        distinct = sorted_keys[first]
        have = np.bincount(distinct // n_items, minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(have, out=indptr[1:])
        redraw_user = np.repeat(np.arange(n_users, dtype=np.int64), counts - have)
        fresh = sample_outside(indptr, distinct % n_items, redraw_user, n_items, rng)
        users = np.concatenate([users[~repeat], redraw_user])
        items = np.concatenate([items[~repeat], fresh])
        regroup = np.argsort(users, kind="stable")
        users, items = users[regroup], items[regroup]


def make_synthetic(
    n_users: int,
    n_items: int,
    *,
    n_groups: int = 5,
    mean_interactions: float = 30,
    text_dim: int = 32,
    image_dim: int = 48,
    seed: int = 0,
    min_interactions: int = 3,
) -> InteractionData:
    """Generate a synthetic dataset with planted group structure.

    Parameters
    ----------
    n_users, n_items : int
        ``U`` and ``I``; ``I`` must exceed ``min_interactions``.
    n_groups : int
        Number of planted user groups ``G``.
    mean_interactions : float
        Mean history length (before the cap), at least ``min_interactions``.
    text_dim, image_dim : int
        Feature widths ``Dt`` and ``Dv``.
    seed : int
        Root seed; equal arguments give identical datasets.
    min_interactions : int
        Every user gets at least this many distinct items.

    Returns
    -------
    InteractionData
        ``user_attributes`` columns ``group`` (int), ``gender`` ('M'/'F'),
        ``age`` (int); ``item_table`` columns ``title``, ``genres``, ``cluster``;
        ``text_features [I, Dt]``, ``image_features [I, Dv]``; ids ``0..U-1`` and
        ``0..I-1``. 100k users x 50k items (~3M rows) take a few seconds.
    """
    if n_users < 1 or n_groups < 1 or text_dim < 1 or image_dim < 1 or min_interactions < 1:
        raise ConfigError(
            "make_synthetic: n_users, n_groups, text_dim, image_dim, min_interactions must be >= 1"
        )
    if n_items <= min_interactions:
        raise ConfigError(
            f"make_synthetic: n_items ({n_items}) must exceed min_interactions ({min_interactions})"
        )
    if mean_interactions < min_interactions:
        raise ConfigError(
            f"make_synthetic: mean_interactions ({mean_interactions}) must be >= "
            f"min_interactions ({min_interactions})"
        )
    rng = numpy_rng(seed, "synthetic")
    n_clusters = min(2 * n_groups, n_items)

    # items: clusters, features, popularity
    cluster = rng.permutation(np.arange(n_items, dtype=np.int64) % n_clusters)
    centres = rng.normal(size=(n_clusters, _LATENT))
    latent = centres[cluster] + 0.5 * rng.normal(size=(n_items, _LATENT))
    text = latent @ rng.normal(size=(_LATENT, text_dim)) / np.sqrt(_LATENT) + 0.3 * rng.normal(
        size=(n_items, text_dim)
    )
    image = latent @ rng.normal(size=(_LATENT, image_dim)) / np.sqrt(_LATENT) + 0.3 * rng.normal(
        size=(n_items, image_dim)
    )
    shuffled = rng.permutation(n_items)
    by_cluster = shuffled[
        np.argsort(cluster[shuffled], kind="stable")
    ]  # grouped by cluster, random within
    size = np.bincount(cluster, minlength=n_clusters)
    first = np.cumsum(size) - size

    # users: groups, history lengths
    group = rng.integers(0, n_groups, size=n_users, dtype=np.int64)
    preferred = (2 * np.arange(n_groups)[:, None] + np.arange(2)[None, :]) % n_clusters  # [G, 2]
    cap = max(min_interactions, n_items // 2)
    excess = rng.geometric(1.0 / (mean_interactions - min_interactions + 1.0), size=n_users) - 1
    counts = np.minimum(min_interactions + excess, cap).astype(np.int64)

    # interactions: a cluster (preferred or any), then a power-law position within it
    row_user = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    n_rows = row_user.shape[0]
    pick = np.where(
        rng.random(n_rows) < _P_PREFERRED,
        preferred[group[row_user], rng.integers(0, 2, size=n_rows)],
        rng.integers(0, n_clusters, size=n_rows),
    )
    within = np.floor(size[pick] * rng.random(n_rows) ** _POPULARITY_POWER).astype(np.int64)
    items = by_cluster[first[pick] + within]
    users, items = _make_distinct(row_user, items, n_users, n_items, rng)

    # timestamps increase along each user's rows (rows are in random draw order)
    gaps = rng.integers(60, 3 * 86_400, size=n_rows, dtype=np.int64)
    elapsed = np.cumsum(gaps)
    block_start = np.cumsum(counts) - counts
    start_time = 978_300_000 + rng.integers(0, 365 * 86_400, size=n_users, dtype=np.int64)
    offset = elapsed[block_start] - gaps[block_start]
    timestamps = start_time[users] + elapsed - offset[users]

    # preferred clusters of group g are 2g and 2g + 1 (mod C)
    liked = (cluster[items] - 2 * group[users]) % n_clusters < min(2, n_clusters)
    ratings = np.clip(np.rint(2.8 + 1.4 * liked + rng.normal(0.0, 0.8, size=n_rows)), 1, 5).astype(
        np.float32
    )

    male_share = np.linspace(0.2, 0.8, n_groups) if n_groups > 1 else np.array([0.5])
    gender = np.where(rng.random(n_users) < male_share[group], "M", "F")
    age_mean = 22.0 + 30.0 * group / max(n_groups - 1, 1)
    age = np.clip(np.rint(age_mean + rng.normal(0.0, 6.0, size=n_users)), 13, 80).astype(np.int64)

    item_ids = np.arange(n_items, dtype=np.int64)
    return InteractionData(
        name=f"synthetic-{n_users}x{n_items}-seed{seed}",
        n_users=n_users,
        n_items=n_items,
        users=users,
        items=items,
        ratings=ratings,
        timestamps=timestamps,
        user_map=IdMap(np.arange(n_users, dtype=np.int64)),
        item_map=IdMap(item_ids),
        user_attributes=pd.DataFrame({"group": group, "gender": gender, "age": age}),
        item_table=pd.DataFrame(
            {
                "title": np.char.add("item ", item_ids.astype(str)),
                "genres": np.char.add("cluster", cluster.astype(str)),
                "cluster": cluster,
            }
        ),
        image_paths=None,
        text_features=text.astype(np.float32),
        image_features=image.astype(np.float32),
        source=None,
    )
