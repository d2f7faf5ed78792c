"""Synthetic generator: shapes, determinism, planted structure."""

from __future__ import annotations

import numpy as np
import pytest

from gfmfr_secure.data import leave_one_out, make_synthetic
from gfmfr_secure.errors import ConfigError


def test_shapes_dtypes_and_invariants(tiny_synthetic):
    d = tiny_synthetic
    assert (d.n_users, d.n_items) == (60, 80)
    assert d.text_features.shape == (80, 8) and d.image_features.shape == (80, 6)
    assert d.text_features.dtype == d.image_features.dtype == np.float32
    assert list(d.user_attributes.columns) == ["group", "gender", "age"]
    assert set(d.user_attributes["group"]) <= {0, 1, 2} and set(d.user_attributes["gender"]) <= {
        "M",
        "F",
    }
    assert list(d.item_table.columns) == ["title", "genres", "cluster"]
    counts = np.bincount(d.users, minlength=d.n_users)
    assert counts.min() >= 3
    assert set(np.unique(d.ratings).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    # rows grouped by user with strictly increasing timestamps inside each user
    assert np.all(np.diff(d.users) >= 0)
    same_user = np.diff(d.users) == 0
    assert np.all(np.diff(d.timestamps)[same_user] > 0)
    assert d.image_paths is None and d.source is None
    split = leave_one_out(d)
    assert (split.test_items >= 0).all() and (split.val_items >= 0).all()


def test_same_seed_same_data_other_seed_other_data():
    a = make_synthetic(40, 50, seed=3, text_dim=4, image_dim=4)
    b = make_synthetic(40, 50, seed=3, text_dim=4, image_dim=4)
    c = make_synthetic(40, 50, seed=4, text_dim=4, image_dim=4)
    for field in ("users", "items", "ratings", "timestamps", "text_features", "image_features"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.user_attributes.equals(b.user_attributes)
    assert not (a.n_interactions == c.n_interactions and np.array_equal(a.items, c.items))


def test_mean_interactions_and_min_respected():
    d = make_synthetic(2000, 500, mean_interactions=20, min_interactions=5, seed=1)
    counts = np.bincount(d.users, minlength=d.n_users)
    assert counts.min() >= 5
    assert 18 < counts.mean() < 22


def test_planted_groups_share_items_and_features_reveal_clusters():
    d = make_synthetic(300, 400, n_groups=4, mean_interactions=25, seed=2)
    group = d.user_attributes["group"].to_numpy()
    x = np.zeros((d.n_users, d.n_items))
    x[d.users, d.items] = 1.0
    overlap = x @ x.T
    same = group[:, None] == group[None, :]
    off_diag = ~np.eye(d.n_users, dtype=bool)
    within, across = overlap[same & off_diag].mean(), overlap[~same].mean()
    assert within > 2 * across
    # item features: same-cluster items are closer than items of other clusters
    cluster = d.item_table["cluster"].to_numpy()
    f = d.text_features / np.linalg.norm(d.text_features, axis=1, keepdims=True)
    sim = f @ f.T
    same_c = (cluster[:, None] == cluster[None, :]) & ~np.eye(d.n_items, dtype=bool)
    assert sim[same_c].mean() > sim[cluster[:, None] != cluster[None, :]].mean() + 0.3
    # a group's users rate its preferred clusters higher
    liked = (cluster[d.items] - 2 * group[d.users]) % 8 < 2
    assert d.ratings[liked].mean() > d.ratings[~liked].mean() + 0.8
    # gender share differs across groups (0.2 -> 0.8 by design)
    male = (d.user_attributes["gender"] == "M").to_numpy()
    assert male[group == 3].mean() - male[group == 0].mean() > 0.3


def test_dense_small_universe_still_gives_distinct_items():
    d = make_synthetic(30, 8, mean_interactions=6, min_interactions=3, n_groups=5, seed=0)
    keys = d.users * d.n_items + d.items
    assert np.unique(keys).size == keys.size
    assert np.bincount(d.users).max() <= 4  # capped at half the items


def test_bad_arguments():
    with pytest.raises(ConfigError, match="n_items \\(3\\) must exceed min_interactions \\(3\\)"):
        make_synthetic(5, 3)
    with pytest.raises(ConfigError, match="mean_interactions"):
        make_synthetic(5, 30, mean_interactions=2)
