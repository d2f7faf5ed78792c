"""Tests for server-side client grouping (gfmfr_secure.server.grouping)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import pdist
from sklearn.metrics import adjusted_rand_score

from gfmfr_secure.errors import ConfigError, DataError
from gfmfr_secure.server import grouping
from gfmfr_secure.server.grouping import (
    GROUPERS,
    Grouper,
    align_groups,
    get_grouper,
    group_clients,
    nearest_centroid,
    preprocess_features,
    rbf_gamma_median,
    register_grouper,
    standardise,
)


def planted(n_groups: int = 5, per_group: int = 20, dim: int = 40, seed: int = 0):
    """Well-separated Gaussian blobs: features [n, dim] and true labels [n]."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 10.0, size=(n_groups, dim))
    truth = np.repeat(np.arange(n_groups), per_group)
    x = centres[truth] + rng.normal(0.0, 0.5, size=(truth.size, dim))
    order = rng.permutation(truth.size)
    return x[order], truth[order]


# --------------------------------------------------------------------------- preprocess


def test_preprocess_shapes_and_variance():
    x, _ = planted()
    full = preprocess_features(x, use_pca=False)
    assert full.shape == x.shape
    np.testing.assert_allclose(full.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(full.std(axis=0), 1.0, atol=1e-12)
    reduced = preprocess_features(x, pca_variance=0.95)
    assert reduced.shape[0] == x.shape[0]
    assert 1 <= reduced.shape[1] < x.shape[1]
    # the kept components carry at least 95% of the standardised variance
    assert reduced.var(axis=0).sum() >= 0.95 * full.var(axis=0).sum() - 1e-9
    assert preprocess_features(x, pca_variance=1.0).shape[1] == min(x.shape)


def test_preprocess_constant_columns_are_fine():
    x, _ = planted(per_group=4, dim=6)
    x[:, 2] = 3.0
    out = preprocess_features(x, use_pca=False)
    np.testing.assert_array_equal(out[:, 2], 0.0)
    assert np.isfinite(preprocess_features(x)).all()
    same = np.ones((4, 3))
    np.testing.assert_array_equal(preprocess_features(same), np.zeros((4, 1)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_preprocess_rejects_non_finite(bad):
    x = np.zeros((4, 3))
    x[2, 1] = bad
    with pytest.raises(DataError, match="features has 1 NaN/inf"):
        preprocess_features(x)


@pytest.mark.parametrize("variance", [0.0, -0.1, 1.5])
def test_preprocess_rejects_bad_variance(variance):
    with pytest.raises(ConfigError, match="pca_variance"):
        preprocess_features(np.eye(4), pca_variance=variance)


def test_preprocess_rejects_bad_shape():
    with pytest.raises(DataError, match="2-D"):
        preprocess_features(np.zeros(5))
    with pytest.raises(DataError, match="at least one row"):
        preprocess_features(np.zeros((0, 3)))


# --------------------------------------------------------------------------- gamma


def test_rbf_gamma_median_golden():
    # distances 3, 4, 5 -> median 4 -> gamma = 1 / (2 * 16)
    x = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert rbf_gamma_median(x) == pytest.approx(1.0 / 32.0)
    # zero distances are left out: non-zero distances 3, 3 -> gamma = 1 / 18
    y = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    assert rbf_gamma_median(y) == pytest.approx(1.0 / 18.0)
    # four points on a line: distances 1, 1, 1, 2, 2, 3 -> median 1.5 -> gamma = 1 / 4.5
    z = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert rbf_gamma_median(z) == pytest.approx(1.0 / 4.5)


def test_rbf_gamma_median_degenerate():
    assert rbf_gamma_median(np.ones((3, 2))) == 1.0
    assert rbf_gamma_median(np.ones((1, 2))) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 30),
    f=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    duplicates=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_rbf_gamma_median_matches_direct_pairwise_distances(n, f, scale, duplicates, seed):
    """The Gram-matrix form gives the direct computation's gamma, duplicate rows (distance 0) included."""
    rng = np.random.default_rng(seed)
    x = rng.normal(5.0, 1.0, size=(n, f)) * scale  # offset from the origin: the Gram form's hard case
    for _ in range(duplicates):
        x[rng.integers(n)] = x[rng.integers(n)]
    direct = pdist(x)
    direct = direct[direct > 0]
    expected = 1.0 if direct.size == 0 else 1.0 / (2.0 * float(np.median(direct)) ** 2)
    assert rbf_gamma_median(x) == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- groupers


@pytest.mark.parametrize("method", ["spectral", "kmeans"])
def test_planted_clusters_recovered(method):
    x, truth = planted(seed=3)
    labels = group_clients(x, np.arange(len(x)), None, method=method, n_groups=5, seed=0)
    assert labels.dtype == np.int64
    assert set(labels.tolist()) <= set(range(5))
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["spectral", "kmeans"])
def test_grouper_deterministic_for_seed(method):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 6))  # no clear structure: the seed matters
    grouper = get_grouper(method)
    assert isinstance(grouper, Grouper)
    a = grouper.fit_predict(x, 4, 11)
    b = get_grouper(method).fit_predict(x, 4, 11)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.shape == (40,)


def test_registry_known_names_and_errors():
    assert {"spectral", "kmeans"} <= set(GROUPERS)
    with pytest.raises(
        ConfigError, match="unknown grouping method 'nope'; known: .*kmeans.*spectral"
    ):
        get_grouper("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_grouper("kmeans")(grouping.KMeansGrouper)


def test_register_custom_grouper():
    name = "first-n-test"

    @register_grouper(name)
    class FirstN:
        def fit_predict(self, x, n_groups, seed):
            return np.arange(len(x), dtype=np.int64) % n_groups

    try:
        labels = group_clients(np.eye(6), np.arange(6), None, method=name, n_groups=3)
        assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    finally:
        del GROUPERS[name]


def test_group_clients_errors():
    x, _ = planted(per_group=1)
    with pytest.raises(DataError, match="cannot split 5 clients into n_groups=6"):
        group_clients(x, np.arange(5), None, n_groups=6)
    with pytest.raises(DataError, match="features has 5 rows but clients has 4"):
        group_clients(x, np.arange(4), None, n_groups=2)
    with pytest.raises(ConfigError, match="n_groups"):
        group_clients(x, np.arange(5), None, n_groups=0)
    with pytest.raises(ConfigError, match="unknown grouping method"):
        group_clients(x, np.arange(5), None, method="SpectralClustering", n_groups=2)


def test_group_clients_keeps_ids_across_rounds():
    x, _ = planted(seed=5)
    n_users = len(x) + 10
    clients = np.arange(5, 5 + len(x))
    first = group_clients(x, clients, None, method="kmeans", n_groups=5, seed=1)
    prev = np.full(n_users, -1, dtype=np.int64)
    prev[clients] = first
    # next round: same structure, fresh noise, a different seed (raw labels permuted)
    x2 = x + np.random.default_rng(9).normal(0.0, 0.1, size=x.shape)
    second = group_clients(x2, clients, prev, method="kmeans", n_groups=5, seed=2)
    np.testing.assert_array_equal(second, first)


# --------------------------------------------------------------------------- alignment


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n_groups=st.integers(min_value=1, max_value=6),
    n_clients=st.integers(min_value=1, max_value=30),
    extra_users=st.integers(min_value=0, max_value=5),
)
def test_align_permuted_partition_recovers_prev(data, n_groups, n_clients, extra_users):
    groups = data.draw(
        st.lists(st.integers(0, n_groups - 1), min_size=n_clients, max_size=n_clients)
    )
    perm = np.array(data.draw(st.permutations(range(n_groups))), dtype=np.int64)
    n_users = n_clients + extra_users
    clients = np.array(data.draw(st.permutations(range(n_users)))[:n_clients], dtype=np.int64)
    prev = np.full(n_users, -1, dtype=np.int64)
    prev[clients] = groups
    labels = perm[np.asarray(groups, dtype=np.int64)]
    aligned = align_groups(prev, clients, labels, n_groups)
    np.testing.assert_array_equal(aligned, prev[clients])


def test_align_without_previous_returns_labels():
    labels = np.array([2, 0, 1, 1])
    clients = np.array([0, 1, 2, 3])
    np.testing.assert_array_equal(align_groups(None, clients, labels, 3), labels)
    prev = np.full(4, -1)
    out = align_groups(prev, clients, labels, 3)
    np.testing.assert_array_equal(out, labels)
    assert out.dtype == np.int64


def test_align_majority_overlap_hand_example():
    # previous groups of users 0..5; user 5 is new
    prev = np.array([0, 0, 0, 1, 1, -1])
    clients = np.array([0, 1, 2, 3, 4, 5])
    # new cluster 1 holds most of old group 0, new cluster 0 holds old group 1
    labels = np.array([1, 1, 0, 0, 0, 2])
    # overlap[new, old]: new1-old0 = 2, new0-old0 = 1, new0-old1 = 2 -> 1->0, 0->1, 2->2
    np.testing.assert_array_equal(align_groups(prev, clients, labels, 3), [0, 0, 1, 1, 1, 2])


def test_align_errors():
    prev = np.array([0, 1, -1])
    with pytest.raises(DataError, match="labels has 2 entries but clients has 3"):
        align_groups(prev, np.array([0, 1, 2]), np.array([0, 1]), 2)
    with pytest.raises(DataError, match="labels must lie in 0..1"):
        align_groups(prev, np.array([0, 1]), np.array([0, 2]), 2)
    with pytest.raises(DataError, match="clients must be ids in 0..2"):
        align_groups(prev, np.array([0, 3]), np.array([0, 1]), 2)
    with pytest.raises(DataError, match="duplicate"):
        align_groups(prev, np.array([1, 1]), np.array([0, 1]), 2)
    with pytest.raises(DataError, match="prev must hold -1 or a group in 0..1"):
        align_groups(np.array([0, 5, -1]), np.array([0, 1]), np.array([0, 1]), 2)
    with pytest.raises(DataError, match="integer dtype"):
        align_groups(prev, np.array([0.0, 1.0]), np.array([0, 1]), 2)


# --------------------------------------------------------------------------- nearest centroid


def test_nearest_centroid_and_ties():
    centroids = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    x = np.array([[0.1, 0.0], [1.9, 0.3], [0.0, 4.0], [1.0, 0.0]])  # last: tie 0 / 1
    out = nearest_centroid(x, centroids)
    np.testing.assert_array_equal(out, [0, 1, 2, 0])
    assert out.dtype == np.int64


def test_nearest_centroid_matches_bruteforce():
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(50, 7)), rng.normal(size=(4, 7))
    brute = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest_centroid(x, c), brute)


def test_nearest_centroid_errors():
    with pytest.raises(DataError, match="features have 3 columns but centroids have 2"):
        nearest_centroid(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(DataError, match="centroids has 1 NaN/inf"):
        nearest_centroid(np.zeros((2, 2)), np.array([[0.0, np.nan]]))


def test_gram_pca_matches_scikit_learn_distances() -> None:
    """The Gram-matrix PCA used for n < f gives scikit-learn's scores up to sign."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import pairwise_distances
    from sklearn.preprocessing import StandardScaler

    from gfmfr_secure.server.grouping import preprocess_features

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 300)) @ rng.normal(size=(300, 300)) * 0.1
    for variance in (0.5, 0.95, 1.0):
        ours = preprocess_features(x, pca_variance=variance)
        ref = PCA(n_components=None if variance >= 1.0 else variance, svd_solver="full").fit_transform(StandardScaler().fit_transform(x))
        assert ours.shape[1] == min(ref.shape[1], 40) or variance >= 1.0
        k = min(ours.shape[1], ref.shape[1])
        np.testing.assert_allclose(np.abs(ours[:, :k]), np.abs(ref[:, :k]), atol=1e-6)
        np.testing.assert_allclose(pairwise_distances(ours), pairwise_distances(ref[:, : ours.shape[1]]), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    f=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    constant=st.sampled_from([None, 0.0, 3.5, -1e6]),
    offset=st.sampled_from([0.0, 1e4]),
)
def test_standardise_matches_scikit_learn(n, f, seed, constant, offset) -> None:
    """Same values as StandardScaler, constant columns (any level) included."""
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * rng.uniform(0.01, 100, size=f) + offset
    if constant is not None:
        x[:, 0] = constant
    ref = StandardScaler().fit_transform(x)
    ours = standardise(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)
    if constant is not None:
        assert np.all(ours[:, 0] == 0.0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(6, 40), f=st.integers(1, 60), pad=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_constant_columns_change_no_pca_distance(n, f, pad, seed) -> None:
    """Constant columns (the unused first layer under the dot scorer) are dropped before
    the PCA: the clients' pairwise distances, the number of components kept and so the
    groups are those of the varying columns alone, on both PCA paths (n < f and n >= f)."""
    from sklearn.metrics import pairwise_distances

    from gfmfr_secure.server.grouping import preprocess_features

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    padded = np.concatenate([np.full((n, pad), 0.25), x, np.zeros((n, pad))], axis=1)[:, rng.permutation(f + 2 * pad)]
    for variance in (0.9, 1.0):
        ours = preprocess_features(padded, pca_variance=variance)
        alone = preprocess_features(x, pca_variance=variance)
        assert ours.shape == alone.shape
        np.testing.assert_allclose(pairwise_distances(ours), pairwise_distances(alone), atol=1e-8)
