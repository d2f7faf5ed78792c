"""Server-side grouping of clients into ``G`` groups.

GFMFR clusters the clients of a round by a feature vector per client: the
flattened prediction head of its model (first layer weight ``[d, 2d]`` and bias
``[d]``, output layer weight ``[d]`` and bias ``[1]``). The pipeline is

1. :func:`preprocess_features`: standardise every column, then PCA keeping a
   fraction of the variance;
2. a registered :class:`Grouper` (``"spectral"`` with an RBF affinity whose
   width follows the median heuristic, or ``"kmeans"``);
3. :func:`align_groups`: relabel the new clusters so that group ids stay stable
   from round to round (Hungarian matching on the overlap with the previous
   assignment).

:func:`group_clients` chains the three. :func:`nearest_centroid` is the
client-side half of oblivious grouping: each client picks its group from the
broadcast centroids without revealing its feature vector.
:func:`merge_small_groups` is the server-side half: from the (securely summed)
group counts it folds every group below the minimum group size into its
nearest group, so that no released group sum covers fewer clients than that.

Running the faithful pipeline means the server sees every client's head: it is
the mode that exposes per-client data (DESIGN.md section 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.decomposition import PCA

from gfmfr_secure.errors import ConfigError, DataError

__all__ = [
    "GROUPERS",
    "SERVER_GROUPING",
    "Grouper",
    "KMeansGrouper",
    "SpectralGrouper",
    "align_groups",
    "get_grouper",
    "group_clients",
    "merge_small_groups",
    "nearest_centroid",
    "preprocess_features",
    "rbf_gamma_median",
    "register_grouper",
]

#: grouping methods the server runs over individual client features (they need per-client exposure)
SERVER_GROUPING = ("spectral", "kmeans")


# --------------------------------------------------------------------------- checks


def _finite_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a float64 ``[n, f]`` array with n, f >= 1 and only finite entries."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise DataError(f"{name} must be a 2-D array [n, f], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{name} must have at least one row and one column, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise DataError(
            f"{name} has {int(bad.sum())} NaN/inf entries (first rows: {rows[:5].tolist()})"
        )
    return arr


def _int_vector(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as an int64 1-D array (integer dtypes only)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise DataError(f"{name} must be a 1-D integer array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name} must have an integer dtype, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_n_groups(n_groups: int) -> None:
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or n_groups < 1:
        raise ConfigError(f"n_groups must be a positive integer, got {n_groups!r}")


# --------------------------------------------------------------------------- features


def preprocess_features(
    features: np.ndarray, *, use_pca: bool = True, pca_variance: float = 0.95, seed: int = 0
) -> np.ndarray:
    """Standardise client features, then reduce them with PCA.

    Parameters
    ----------
    features : ndarray, shape [n_clients, f]
        One feature vector per client (e.g. the flattened prediction head).
    use_pca : bool
        Apply PCA after standardising. Skipped when ``f == 1``.
    pca_variance : float
        Fraction of the variance in ``(0, 1]`` the kept components must explain;
        ``1.0`` keeps every component.
    seed : int
        ``random_state`` handed to scikit-learn's PCA (the exact ``full`` solver
        used here does not draw random numbers; the seed is passed for form).

    Returns
    -------
    ndarray, shape [n_clients, k]
        float64 features. ``k = f`` without PCA, otherwise the number of kept
        components. Constant columns standardise to zero; when every column is
        constant (all clients identical) the result is a single zero column.

    Raises
    ------
    DataError
        ``features`` is not a finite numeric 2-D array.
    ConfigError
        ``pca_variance`` is outside ``(0, 1]``.
    """
    x = _finite_matrix(features, "features")
    if not (isinstance(pca_variance, (int, float)) and 0.0 < float(pca_variance) <= 1.0):
        raise ConfigError(f"pca_variance must lie in (0, 1], got {pca_variance!r}")
    scaled = standardise(x)
    if not use_pca or x.shape[1] == 1:
        return scaled
    if not np.any(scaled):
        return np.zeros((x.shape[0], 1))
    # Constant columns standardise to zero and add nothing to the covariance, so the
    # PCA scores are the same without them. Under the dot scorer only the output layer
    # moves (65 of a round's 8321 head entries), which turns a [943, 8321] Gram product
    # (about 1 s a round) into a [943, 65] SVD (milliseconds).
    varying = np.any(scaled != 0.0, axis=0)
    if not varying.all():
        scaled = scaled[:, varying]
    if scaled.shape[0] < scaled.shape[1]:
        return _pca_scores_gram(scaled, float(pca_variance))
    n_components: float | int | None = None if float(pca_variance) >= 1.0 else float(pca_variance)
    pca = PCA(n_components=n_components, svd_solver="full", random_state=seed)
    return pca.fit_transform(scaled)


def standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance per column, as scikit-learn's ``StandardScaler``.

    ``(x - mean) / std`` with the population standard deviation; a constant column
    (variance within rounding of zero, scikit-learn's test) is only centred. Written
    out because the scaler's incremental, NaN-aware statistics take about 4x longer
    on a round's [943, 8321] heads (0.09 against 0.02 s); the values agree (a test
    compares them).

    ``x`` : float64 ``[n, f]``; returns a new float64 ``[n, f]`` array.
    """
    n = x.shape[0]
    mean = x.mean(axis=0)
    centred = x - mean
    var = np.einsum("ij,ij->j", centred, centred) / n
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = np.sqrt(var)
    scale[constant] = 1.0
    centred /= scale
    return centred


def _pca_scores_gram(x: np.ndarray, variance: float) -> np.ndarray:
    """PCA scores through the [n, n] Gram matrix, for n clients << f features.

    With ``xc = U S V^T`` the scores are ``U S``, and ``xc xc^T = U S^2 U^T``, so an
    eigendecomposition of the small Gram matrix gives them without the [n, f] SVD
    (for 943 clients x 8321 head entries: about 0.3 s instead of about 5 s). The
    components kept follow scikit-learn's rule for a float ``n_components``: the
    fewest whose cumulative explained-variance ratio reaches ``variance``. Scores
    equal scikit-learn's up to the sign of each component, which no distance sees.
    """
    xc = x - x.mean(axis=0)
    evals, evecs = np.linalg.eigh(xc @ xc.T)
    order = np.argsort(evals)[::-1]
    evals = np.clip(evals[order], 0.0, None)
    evecs = evecs[:, order]
    total = evals.sum()
    if total <= 0:
        return np.zeros((x.shape[0], 1))
    ratio = np.cumsum(evals) / total
    k = evals.size if variance >= 1.0 else int(np.searchsorted(ratio, variance, side="right")) + 1
    k = min(k, int(np.count_nonzero(evals > evals[0] * 1e-12)))
    return evecs[:, :k] * np.sqrt(evals[:k])


def rbf_gamma_median(x: np.ndarray) -> float:
    """RBF width by the median heuristic.

    ``gamma = 1 / (2 m^2)`` with ``m`` the median of the non-zero pairwise
    Euclidean distances between the rows of ``x``; ``1.0`` when every distance is
    zero (a single row, or identical rows).

    Parameters
    ----------
    x : ndarray, shape [n, f]

    Returns
    -------
    float
    """
    arr = _finite_matrix(x, "x")
    n = arr.shape[0]
    if n < 2:
        return 1.0
    # Squared distances from the Gram matrix: one [n, n] product instead of a pairwise
    # loop (0.23 s -> 0.05 s for 943 clients). The Gram form leaves rounding residue
    # where two rows are identical, so identical rows are found exactly and count as
    # distance zero, as a direct computation gives.
    norms = np.einsum("ij,ij->i", arr, arr)
    upper = np.triu_indices(n, k=1)
    sq = (norms[:, None] + norms[None, :] - 2.0 * (arr @ arr.T))[upper]
    _, row_id = np.unique(arr, axis=0, return_inverse=True)
    distinct = row_id.reshape(-1)[upper[0]] != row_id.reshape(-1)[upper[1]]
    dists = np.sqrt(np.clip(sq, 0.0, None))
    nonzero = dists[distinct & (dists > 0)]
    if nonzero.size == 0:
        return 1.0
    median = float(np.median(nonzero))
    return 1.0 / (2.0 * median * median)


# --------------------------------------------------------------------------- groupers


@runtime_checkable
class Grouper(Protocol):
    """Clusters ``n`` points into ``n_groups`` groups."""

    def fit_predict(self, x: np.ndarray, n_groups: int, seed: int) -> np.ndarray:
        """Labels of the rows of ``x`` ``[n, f]``: int64 ``[n]`` with values in ``0..n_groups-1``."""
        ...


GrouperFactory = Callable[[], Grouper]
_F = TypeVar("_F", bound=Callable[[], Grouper])

GROUPERS: dict[str, GrouperFactory] = {}


def register_grouper(name: str) -> Callable[[_F], _F]:
    """Class decorator registering a zero-argument :class:`Grouper` factory under ``name``.

    Raises
    ------
    ConfigError
        ``name`` is already registered.
    """

    def decorator(factory: _F) -> _F:
        if name in GROUPERS:
            raise ConfigError(f"grouper {name!r} is already registered ({GROUPERS[name]!r})")
        GROUPERS[name] = factory
        return factory

    return decorator


def get_grouper(name: str) -> Grouper:
    """A new instance of the grouper registered under ``name``.

    Raises
    ------
    ConfigError
        No grouper is registered under ``name``; the message lists the known ones.
    """
    if name not in GROUPERS:
        raise ConfigError(f"unknown grouping method {name!r}; known: {', '.join(sorted(GROUPERS))}")
    return GROUPERS[name]()


def _check_cluster_input(x: np.ndarray, n_groups: int) -> np.ndarray:
    arr = _finite_matrix(x, "x")
    _check_n_groups(n_groups)
    if arr.shape[0] < n_groups:
        raise DataError(f"cannot split {arr.shape[0]} clients into n_groups={n_groups} groups")
    return arr


@register_grouper("spectral")
class SpectralGrouper:
    """Spectral clustering with an RBF affinity of median-heuristic width (the paper's choice).

    Uses :class:`sklearn.cluster.SpectralClustering` with ``affinity="rbf"``,
    ``gamma = rbf_gamma_median(x)``, ``assign_labels="kmeans"`` and
    ``random_state=seed``.
    """

    def fit_predict(self, x: np.ndarray, n_groups: int, seed: int) -> np.ndarray:
        """Labels int64 ``[n]`` of the rows of ``x`` ``[n, f]``."""
        arr = _check_cluster_input(x, n_groups)
        if n_groups == 1:
            return np.zeros(arr.shape[0], dtype=np.int64)
        model = SpectralClustering(
            n_clusters=int(n_groups),
            affinity="rbf",
            gamma=rbf_gamma_median(arr),
            assign_labels="kmeans",
            random_state=int(seed),
        )
        return np.asarray(model.fit_predict(arr), dtype=np.int64)


@register_grouper("kmeans")
class KMeansGrouper:
    """K-means (:class:`sklearn.cluster.KMeans`, ``n_init=10``, ``random_state=seed``)."""

    def fit_predict(self, x: np.ndarray, n_groups: int, seed: int) -> np.ndarray:
        """Labels int64 ``[n]`` of the rows of ``x`` ``[n, f]``."""
        arr = _check_cluster_input(x, n_groups)
        model = KMeans(n_clusters=int(n_groups), n_init=10, random_state=int(seed))
        return np.asarray(model.fit_predict(arr), dtype=np.int64)


# --------------------------------------------------------------------------- alignment


def align_groups(
    prev: np.ndarray | None, clients: np.ndarray, labels: np.ndarray, n_groups: int
) -> np.ndarray:
    """Relabel new clusters so that group ids stay stable across rounds.

    Builds the ``[G, G]`` overlap matrix ``M[new, old]`` = number of clients that
    are in new cluster ``new`` now and were in group ``old`` before (clients with
    no previous group are ignored), and relabels with the permutation that
    maximises the total overlap (:func:`scipy.optimize.linear_sum_assignment`).
    New clusters that overlap nothing take the ids left over.

    Parameters
    ----------
    prev : ndarray of int, shape [n_users], or None
        Previous group of every user, ``-1`` for none.
    clients : ndarray of int, shape [n]
        Distinct user ids of the clients clustered now (indices into ``prev``).
    labels : ndarray of int, shape [n]
        Their new raw labels in ``0..n_groups-1``.
    n_groups : int

    Returns
    -------
    ndarray of int64, shape [n]
        The relabelled labels; ``labels`` unchanged (as int64) when ``prev`` is
        None or none of ``clients`` has a previous group.

    Raises
    ------
    DataError
        Wrong shapes, ids out of range, duplicate clients, labels or previous
        groups outside ``0..n_groups-1`` (``-1`` allowed in ``prev``).
    """
    _check_n_groups(n_groups)
    clients = _int_vector(clients, "clients")
    labels = _int_vector(labels, "labels")
    if labels.shape != clients.shape:
        raise DataError(f"labels has {labels.shape[0]} entries but clients has {clients.shape[0]}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_groups):
        raise DataError(
            f"labels must lie in 0..{n_groups - 1}, got range [{labels.min()}, {labels.max()}]"
        )
    if np.unique(clients).size != clients.size:
        raise DataError("clients contains duplicate ids")
    if prev is None:
        return labels.copy()
    prev = _int_vector(prev, "prev")
    if clients.size and (clients.min() < 0 or clients.max() >= prev.shape[0]):
        raise DataError(
            f"clients must be ids in 0..{prev.shape[0] - 1} (prev has {prev.shape[0]} users), "
            f"got range [{clients.min()}, {clients.max()}]"
        )
    if prev.size and (prev.min() < -1 or prev.max() >= n_groups):
        raise DataError(
            f"prev must hold -1 or a group in 0..{n_groups - 1}, "
            f"got range [{prev.min()}, {prev.max()}]"
        )
    old = prev[clients]
    known = old >= 0
    if not known.any():
        return labels.copy()
    overlap = np.bincount(
        labels[known] * n_groups + old[known], minlength=n_groups * n_groups
    ).reshape(n_groups, n_groups)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    mapping = np.empty(n_groups, dtype=np.int64)
    mapping[rows] = cols
    return mapping[labels]


# --------------------------------------------------------------------------- pipeline


def group_clients(
    features: np.ndarray,
    clients: np.ndarray,
    prev: np.ndarray | None,
    *,
    method: str = "spectral",
    n_groups: int = 5,
    use_pca: bool = True,
    pca_variance: float = 0.95,
    seed: int = 0,
) -> np.ndarray:
    """Preprocess, cluster and align: the server's grouping step of one round.

    Parameters
    ----------
    features : ndarray, shape [n, f]
        Grouping feature of each client clustered now.
    clients : ndarray of int, shape [n]
        Their user ids (indices into ``prev``).
    prev : ndarray of int, shape [n_users], or None
        Previous group of every user (``-1`` for none), or None in the first round.
    method : str
        A key of :data:`GROUPERS` (``"spectral"`` or ``"kmeans"``).
    n_groups, use_pca, pca_variance, seed
        See :func:`preprocess_features` and :class:`Grouper`.

    Returns
    -------
    ndarray of int64, shape [n]
        Aligned group of each client in ``0..n_groups-1``.

    Raises
    ------
    DataError
        ``n < n_groups``, ``features`` and ``clients`` disagree in length, or any
        check of the steps fails.
    ConfigError
        Unknown ``method`` or bad PCA settings.
    """
    x = _finite_matrix(features, "features")
    clients = _int_vector(clients, "clients")
    _check_n_groups(n_groups)
    if x.shape[0] != clients.shape[0]:
        raise DataError(
            f"features has {x.shape[0]} rows but clients has {clients.shape[0]} entries"
        )
    if x.shape[0] < n_groups:
        raise DataError(f"cannot split {x.shape[0]} clients into n_groups={n_groups} groups")
    grouper = get_grouper(method)
    processed = preprocess_features(x, use_pca=use_pca, pca_variance=pca_variance, seed=seed)
    labels = grouper.fit_predict(processed, n_groups, seed)
    return align_groups(prev, clients, labels, n_groups)


def nearest_centroid(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean distance) of every row.

    Used by clients for oblivious grouping. Ties go to the lowest index.

    Parameters
    ----------
    features : ndarray, shape [n, f]
    centroids : ndarray, shape [G, f]

    Returns
    -------
    ndarray of int64, shape [n]
    """
    x = _finite_matrix(features, "features")
    c = _finite_matrix(centroids, "centroids")
    if x.shape[1] != c.shape[1]:
        raise DataError(f"features have {x.shape[1]} columns but centroids have {c.shape[1]}")
    # One pass per centroid (G is small) keeps memory at [n, f] and computes the
    # distances from differences, so exact ties stay exact.
    dists = np.empty((x.shape[0], c.shape[0]))
    for g in range(c.shape[0]):
        diff = x - c[g]
        dists[:, g] = np.einsum("nf,nf->n", diff, diff)
    return np.argmin(dists, axis=1).astype(np.int64)


def merge_small_groups(counts: np.ndarray, centroids: np.ndarray | None, min_size: float) -> np.ndarray:
    """Fold every group with fewer than ``min_size`` members into its nearest group.

    Repeatedly, the group with the smallest count below ``min_size`` joins the remaining
    group whose centroid is nearest to its own (squared Euclidean distance; without
    centroids, the remaining group with the largest count; ties go to the lowest index),
    and the counts are added. It stops when every remaining group has at least
    ``min_size`` members or one group remains (then the whole cohort is below the floor:
    the caller must not release it). The map is a pure function of public values (the
    released counts and the broadcast centroids), so every client can apply it itself.

    Parameters
    ----------
    counts : float [G] released member count of each group (noised under DP).
    centroids : float [G, f] the broadcast centroids, or None (first round).
    min_size : the floor, > 0.

    Returns
    -------
    ndarray of int64, shape [G]
        ``target[g]``: the group whose block carries group g's members from now on;
        ``target[target[g]] == target[g]``.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.isfinite(c).all():
        raise DataError(f"counts must be a non-empty finite vector [G], got shape {c.shape}")
    if not min_size > 0:
        raise ConfigError(f"min_size must be > 0, got {min_size!r}")
    g = c.size
    cent = None
    if centroids is not None:
        cent = _finite_matrix(centroids, "centroids")
        if cent.shape[0] != g:
            raise DataError(f"{cent.shape[0]} centroids for {g} group counts")
    target = np.arange(g, dtype=np.int64)
    size = c.copy()
    alive = list(range(g))
    while len(alive) > 1:
        small = min(alive, key=lambda k: (size[k], k))
        if size[small] >= min_size:
            break
        others = [k for k in alive if k != small]
        if cent is None:
            into = max(others, key=lambda k: (size[k], -k))
        else:
            dist = [float(np.sum((cent[k] - cent[small]) ** 2)) for k in others]
            into = others[int(np.argmin(dist))]
        size[into] += size[small]
        target[target == small] = into
        alive.remove(small)
    return target
