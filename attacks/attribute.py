"""Attribute inference: predict a private user attribute (gender, age) from features.

Two estimators:

:func:`cv_attribute_inference` (used by ``gfmfr-secure attack``)
    nested, stratified cross-validation: the reported AUC is the mean (and std) over
    ``outer_folds`` held-out folds; inside each outer fold the regularisation ``C``
    of a logistic regression and the feature transform (:data:`FEATURE_TRANSFORMS`)
    are chosen by an inner stratified cross-validation on the outer fold's training
    users only, so nothing about a held-out fold enters any choice. The adversary
    knows the attribute of the training users of each fold (``1 - 1/outer_folds`` of
    them). Multi-class targets report both the **macro** one-vs-rest AUC (mean of the
    per-class AUCs) and the **micro** one-vs-rest AUC (every (user, class) pair pooled
    into one binary decision, scored by the class probability).
:func:`attribute_inference`
    one labelled / attacked split with a fixed classifier (kept for comparison).

For :func:`attribute_inference`: the adversary holds one feature vector per user
derived from what it observed (for the server: e.g. the user's uploaded item-table
rows summarised per item, head deltas, or the grouping features; for an outsider:
published recommendations), and knows the true attribute of a random fraction of
users (auxiliary knowledge, e.g. users who made their profile public). It trains a
classifier on those users and predicts the others.

The split is stratified by label so every class appears among both the labelled
and the attacked users; the majority-class baseline is the accuracy of always
predicting the most frequent class *of the labelled users* on the attacked users.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from threadpoolctl import threadpool_limits

from attacks.base import as_array, make_rng

__all__ = [
    "AGE_BRACKET_EDGES",
    "AGE_BRACKET_LABELS",
    "AGE_THRESHOLD",
    "ATTRIBUTE_TARGETS",
    "DEFAULT_CS",
    "FEATURE_TRANSFORMS",
    "age_bracket",
    "attribute_inference",
    "attribute_targets",
    "cv_attribute_inference",
    "fit_logreg_path",
    "interaction_matrix",
    "min_class_size",
    "stratified_split",
]

#: Lower edges of the age brackets after the first: ``<25, 25-34, 35-44, 45+``.
AGE_BRACKET_EDGES: tuple[int, ...] = (25, 35, 45)
AGE_BRACKET_LABELS: tuple[str, ...] = ("<25", "25-34", "35-44", "45+")

CLASSIFIERS: tuple[str, ...] = ("logreg", "mlp")


def age_bracket(ages: np.ndarray | Sequence[float]) -> np.ndarray:
    """Map ages to bracket ids: 0 = <25, 1 = 25-34, 2 = 35-44, 3 = 45+.

    Parameters
    ----------
    ages : [U] non-negative ages in years (ints or floats; a float age in
        ``[24, 25)`` is still "<25").

    Returns
    -------
    np.ndarray [U] int64 in ``{0, 1, 2, 3}``; names in :data:`AGE_BRACKET_LABELS`.
    """
    a = as_array("ages", ages, ndim=1)
    if a.size and a.min() < 0:
        raise ValueError(f"ages must be non-negative, got min {a.min()}")
    return np.digitize(a, AGE_BRACKET_EDGES, right=False).astype(np.int64)


def stratified_split(labels: np.ndarray, labelled_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of labelled (known) and attacked users, stratified by class.

    Each class contributes ``round(fraction * n_c)`` labelled users, clipped to
    ``[1, n_c - 1]`` so both sides see every class.

    Returns
    -------
    (train_idx, test_idx) : sorted int64 index arrays partitioning ``range(U)``.
    """
    if not 0.0 < labelled_fraction < 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1), got {labelled_fraction}")
    train = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < 2:
            raise ValueError(f"class {c} has {idx.size} user(s); need >= 2 to appear on both sides of the split")
        k = int(np.clip(round(labelled_fraction * idx.size), 1, idx.size - 1))
        train.append(rng.choice(idx, size=k, replace=False))
    tr = np.sort(np.concatenate(train))
    te = np.setdiff1d(np.arange(labels.size), tr)
    return tr, te


def _make_classifier(classifier: str, seed: int) -> Any:
    if classifier == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    if classifier == "mlp":
        return make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=500, early_stopping=False, random_state=seed),
        )
    raise ValueError(f"unknown classifier {classifier!r}; known: {', '.join(CLASSIFIERS)}")


def attribute_inference(
    features: np.ndarray,
    labels: np.ndarray | Sequence[int],
    *,
    labelled_fraction: float,
    seed: int | np.random.Generator,
    classifier: str = "logreg",
) -> dict[str, Any]:
    """Train on a labelled fraction of users, predict the attribute of the rest.

    Parameters
    ----------
    features : [U, F] the adversary's feature vector per user.
    labels : [U] integer attribute (binary gender or a multi-class bracket from
        :func:`age_bracket`); any integer coding.
    labelled_fraction : fraction of users whose label the adversary knows, in (0, 1).
    seed : int or :class:`numpy.random.Generator`; seeds the split (and the MLP's
        initialisation).
    classifier : ``"logreg"`` (standardise + logistic regression) or ``"mlp"``
        (standardise + one hidden layer of 64 units).

    Returns
    -------
    dict with

    - ``auc`` : ROC AUC (binary) or macro one-vs-rest AUC (multi-class).
    - ``accuracy``, ``macro_f1`` : on the attacked users.
    - ``baseline_accuracy`` : majority class of the labelled users, on the attacked users.
    - ``baseline_macro_f1`` : macro F1 of that constant prediction.
    - ``baseline_auc`` : 0.5.
    - ``n_train``, ``n_test``, ``n_classes`` : counts.
    - ``classes`` : [C] the label values; ``test_index`` : [n_test] attacked users;
      ``proba`` : [n_test, C] predicted class probabilities; ``pred`` : [n_test].

    Raises
    ------
    ValueError
        Shape mismatch, NaN/inf features, fewer than two classes, a class with a
        single user, or an unknown classifier.
    """
    x = as_array("features", features, ndim=2)
    y = as_array("labels", labels, ndim=1, dtype=np.int64)
    if y.size != x.shape[0]:
        raise ValueError(f"features has {x.shape[0]} rows but labels has {y.size} entries")
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError(f"need at least two classes, got {classes.tolist()}")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; known: {', '.join(CLASSIFIERS)}")
    rng = make_rng(seed)
    tr, te = stratified_split(y, labelled_fraction, rng)
    model = _make_classifier(classifier, int(rng.integers(0, 2**31 - 1)))
    model.fit(x[tr], y[tr])
    proba = model.predict_proba(x[te])
    model_classes = np.asarray(model.classes_)
    pred = model_classes[np.argmax(proba, axis=1)]
    if classes.size == 2:
        auc = float(roc_auc_score(y[te] == classes[1], proba[:, 1]))
    else:
        auc = float(roc_auc_score(y[te], proba, multi_class="ovr", average="macro", labels=model_classes))
    vals, counts = np.unique(y[tr], return_counts=True)
    majority = vals[np.argmax(counts)]
    const = np.full(te.size, majority)
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(y[te], pred)),
        "macro_f1": float(f1_score(y[te], pred, average="macro", labels=classes, zero_division=0)),
        "baseline_auc": 0.5,
        "baseline_accuracy": float(np.mean(y[te] == majority)),
        "baseline_macro_f1": float(f1_score(y[te], const, average="macro", labels=classes, zero_division=0)),
        "n_train": int(tr.size),
        "n_test": int(te.size),
        "n_classes": int(classes.size),
        "classes": classes,
        "test_index": te,
        "proba": proba,
        "pred": pred,
    }


# --------------------------------------------------------------------------- nested cross-validation

#: Age of the binary age target: label 1 for users aged ``AGE_THRESHOLD`` or more.
AGE_THRESHOLD: int = 30

#: Targets of :func:`attribute_targets`, in report order.
ATTRIBUTE_TARGETS: tuple[str, ...] = ("gender", "age-ge-30", "age-bracket4")

#: Feature transforms chosen among by the inner cross-validation.
#: ``raw``: the features as given (a binary interaction matrix stays binary);
#: ``l2-rows``: each user's row scaled to unit L2 norm (long and short histories alike);
#: ``tfidf``: TF-IDF weighting (IDF fitted on the training users), then unit L2 rows.
FEATURE_TRANSFORMS: tuple[str, ...] = ("raw", "l2-rows", "tfidf")

#: Inverse regularisation strengths searched by the inner cross-validation (1e-3 .. 1e2).
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 2, 11))


def attribute_targets(gender: np.ndarray | Sequence[str], age: np.ndarray | Sequence[float]) -> dict[str, np.ndarray]:
    """The attacked attributes of each user, keyed by :data:`ATTRIBUTE_TARGETS`.

    Parameters
    ----------
    gender : [U] ``"F"`` / ``"M"`` (anything else counts as not ``"F"``).
    age : [U] ages in years.

    Returns
    -------
    dict ``gender`` -> int64 [U] (1 = ``"F"``); ``age-ge-30`` -> int64 [U] (1 = aged
    :data:`AGE_THRESHOLD` or more); ``age-bracket4`` -> int64 [U] in ``{0, 1, 2, 3}``
    (:func:`age_bracket`).
    """
    g = np.asarray(gender)
    a = as_array("age", age, ndim=1)
    if g.shape != a.shape:
        raise ValueError(f"gender has {g.size} entries but age has {a.size}")
    return {
        "gender": (g == "F").astype(np.int64),
        "age-ge-30": (a >= AGE_THRESHOLD).astype(np.int64),
        "age-bracket4": age_bracket(a),
    }


def interaction_matrix(indptr: np.ndarray | Sequence[int], items: np.ndarray | Sequence[int], n_items: int) -> sp.csr_matrix:
    """Binary user x item matrix from a CSR list of each user's items.

    Parameters
    ----------
    indptr : [U + 1] row pointer; user ``u``'s items are ``items[indptr[u]:indptr[u + 1]]``.
    items : [nnz] item ids in ``[0, n_items)`` (repeats count once).
    n_items : number of columns ``I``.

    Returns
    -------
    scipy.sparse.csr_matrix float64 [U, I] with entries 0 / 1.
    """
    ptr = as_array("indptr", indptr, ndim=1, dtype=np.int64)
    it = as_array("items", items, ndim=1, dtype=np.int64)
    if ptr.size < 1 or ptr[0] != 0 or ptr[-1] != it.size or np.any(np.diff(ptr) < 0):
        raise ValueError(f"indptr must start at 0, be non-decreasing and end at len(items)={it.size}")
    if it.size and (it.min() < 0 or it.max() >= n_items):
        raise ValueError(f"items must be in [0, {n_items}), got range [{it.min()}, {it.max()}]")
    m = sp.csr_matrix((np.ones(it.size), it, ptr), shape=(ptr.size - 1, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _transform(name: str) -> Any:
    """A fresh unfitted transformer for ``name`` (:data:`FEATURE_TRANSFORMS`)."""
    if name == "raw":
        return None
    if name == "l2-rows":
        return Normalizer(norm="l2")
    if name == "tfidf":
        return TfidfTransformer(norm="l2")
    raise ValueError(f"unknown feature transform {name!r}; known: {', '.join(FEATURE_TRANSFORMS)}")


def _fit_transform(name: str, x_fit: Any, *others: Any) -> tuple[Any, ...]:
    """Fit transform ``name`` on ``x_fit`` only; return it applied to ``x_fit`` and each of ``others``."""
    t = _transform(name)
    if t is None:
        return (x_fit, *others)
    t.fit(x_fit)
    return tuple(t.transform(x) for x in (x_fit, *others))


def _auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores [n]`` for the boolean ``positive [n]`` (both classes present).

    The Mann-Whitney form with tied scores counted one half, equal to
    :func:`sklearn.metrics.roc_auc_score` without its per-call input checks (which
    cost more than the fits in nested cross-validation).
    """
    from scipy.stats import rankdata

    pos = np.asarray(positive, dtype=bool)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _class_aucs(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """AUCs of class probabilities ``proba [n, C]`` against labels ``y [n]``.

    Binary: ``auc`` (class ``classes[1]`` positive). Multi-class: ``auc_macro_ovr``
    (mean of the one-vs-rest AUCs of the classes present among ``y``, each against
    the rest) and ``auc_micro_ovr`` (one AUC over every (user, class) pair).
    """
    if classes.size == 2:
        return {"auc": _auc(y == classes[1], proba[:, 1])}
    onehot = (y[:, None] == classes[None, :])
    per_class = [_auc(onehot[:, c], proba[:, c]) for c in range(classes.size) if 0 < onehot[:, c].sum() < y.size]
    return {"auc_macro_ovr": float(np.mean(per_class)), "auc_micro_ovr": _auc(onehot.ravel(), proba.ravel())}


def _inner_score(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """The inner selection criterion: binary AUC, or the macro one-vs-rest AUC."""
    aucs = _class_aucs(y, proba, classes)
    return aucs["auc"] if classes.size == 2 else aucs["auc_macro_ovr"]


def _logreg_objective(w: np.ndarray, x: Any, xt: Any, onehot: np.ndarray, lam: float, binary: bool) -> tuple[float, np.ndarray]:
    """Mean log-loss plus ``lam / 2 |W|^2`` (intercepts unpenalised) and its gradient.

    ``w`` packs ``W [F, K]`` then ``b [K]`` with ``K = 1`` (binary, sigmoid of class 1)
    or ``K = C`` (multinomial softmax); ``x [n, F]``, ``xt = x.T [F, n]`` (precomputed),
    ``onehot [n, C]``.
    """
    n, f = x.shape
    k = onehot.shape[1] if not binary else 1
    wm = w[: f * k].reshape(f, k)
    z = np.asarray(x @ wm) + w[f * k :]
    if binary:
        y1 = onehot[:, 1:2]
        # log(1 + exp(z)) - y z, stably
        loss = float(np.sum(np.logaddexp(0.0, z) - y1 * z)) / n
        r = (1.0 / (1.0 + np.exp(-z)) - y1) / n
    else:
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = float(-np.sum(onehot * logp)) / n
        r = (np.exp(logp) - onehot) / n
    grad_w = np.asarray(xt @ r) + lam * wm
    return loss + 0.5 * lam * float(np.sum(wm * wm)), np.concatenate([grad_w.ravel(), r.sum(axis=0)])


def _logreg_proba(w: np.ndarray, x: Any, n_classes: int) -> np.ndarray:
    """Class probabilities [n, C] of packed weights ``w`` (see :func:`_logreg_objective`)."""
    f = x.shape[1]
    k = 1 if n_classes == 2 else n_classes
    z = np.asarray(x @ w[: f * k].reshape(f, k)) + w[f * k :]
    if n_classes == 2:
        p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1.0 - p1, p1], axis=1)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_logreg_path(x_tr: Any, y_tr: np.ndarray, x_te: Any, cs: Sequence[float], classes: np.ndarray, max_iter: int = 500) -> list[np.ndarray]:
    """Class probabilities on ``x_te`` of an L2 logistic regression fitted on ``(x_tr, y_tr)`` at each C.

    The objective is scikit-learn's ``LogisticRegression(C=c)`` (``lbfgs``): the
    log-loss summed over users times ``C`` plus ``|W|^2 / 2``, intercept unpenalised;
    sigmoid for two classes, multinomial softmax otherwise. It is minimised here with
    SciPy's L-BFGS directly (the same optimum without scikit-learn's per-fit
    overhead, which dominated nested cross-validation on sparse interaction
    matrices), the fits following ``cs`` in increasing order, each started from the
    previous optimum.

    Parameters
    ----------
    x_tr : [n, F] dense or sparse; y_tr : [n] labels, each in ``classes``.
    x_te : [m, F]; cs : candidate C values (> 0); classes : [C] sorted label values.
    max_iter : L-BFGS iterations per C.

    Returns
    -------
    list, in the order of ``cs``, of float64 [m, C] probabilities (columns follow ``classes``).
    """
    from scipy.optimize import minimize

    n, f = x_tr.shape
    binary = classes.size == 2
    onehot = (np.asarray(y_tr)[:, None] == classes[None, :]).astype(np.float64)
    k = 1 if binary else classes.size
    w = np.zeros(f * k + k)
    xt = x_tr.T.tocsr() if sp.issparse(x_tr) else np.ascontiguousarray(x_tr.T)
    out: list[np.ndarray] = [np.empty(0)] * len(cs)
    # one BLAS thread: L-BFGS's small vector operations only lose from threading (and much
    # more so on a machine whose cores are shared)
    with threadpool_limits(limits=1, user_api="blas"):
        for idx in np.argsort(cs):
            lam = 1.0 / (float(cs[idx]) * n)
            res = minimize(_logreg_objective, w, args=(x_tr, xt, onehot, lam, binary), jac=True, method="L-BFGS-B",
                           options={"maxiter": max_iter, "gtol": 1e-6})
            w = res.x
            out[idx] = _logreg_proba(w, x_te, classes.size)
    return out


def min_class_size(outer_folds: int, inner_folds: int) -> int:
    """Fewest users a class needs for nested stratified CV: in every outer test fold, and
    ``inner_folds`` times in every outer training part (``n - ceil(n / outer_folds)``)."""
    n = max(outer_folds, inner_folds)
    while n - -(-n // outer_folds) < inner_folds:
        n += 1
    return n


def cv_attribute_inference(
    features: np.ndarray | sp.spmatrix,
    labels: np.ndarray | Sequence[int],
    *,
    transforms: Sequence[str] = FEATURE_TRANSFORMS,
    cs: Sequence[float] = DEFAULT_CS,
    outer_folds: int = 5,
    inner_folds: int = 3,
    seed: int = 0,
    max_iter: int = 500,
) -> dict[str, Any]:
    """Nested stratified cross-validation of a tuned logistic regression.

    For each of ``outer_folds`` stratified folds: on the other folds' users only,
    every (transform, C) pair is scored by an ``inner_folds`` stratified
    cross-validation (mean inner AUC; macro one-vs-rest for multi-class), the best
    pair is refitted on all of them and predicts the held-out fold. The held-out
    fold's AUC is one sample of the reported mean and std.

    Parameters
    ----------
    features : [U, F] dense array or scipy sparse matrix (e.g. a binary user x item
        matrix from :func:`interaction_matrix`).
    labels : [U] integer attribute; every class needs at least ``outer_folds`` users.
    transforms : candidate feature transforms (:data:`FEATURE_TRANSFORMS`).
    cs : candidate inverse regularisation strengths (> 0).
    outer_folds, inner_folds : folds (>= 2).
    seed : shuffles the folds (outer with ``seed``, inner with ``seed + 1 + fold``).
    max_iter : L-BFGS iterations per fit.

    Returns
    -------
    dict with

    - binary targets: ``auc``, ``auc_std`` (mean and std over outer folds), ``fold_auc`` [K];
    - multi-class: ``auc_macro_ovr``, ``auc_macro_ovr_std``, ``fold_auc_macro_ovr`` [K]
      and the same for ``auc_micro_ovr``;
    - ``accuracy``, ``accuracy_std``; ``baseline_accuracy`` (predicting each fold's
      training majority class, mean over folds); ``baseline_auc`` 0.5;
    - ``chosen_c`` [K] float, ``chosen_transform`` [K] str: the inner choice per fold;
    - ``oof_proba`` [U, C]: each user's probabilities from the fold that held it out;
      ``classes`` [C]; ``n_users``, ``n_classes``, ``outer_folds``, ``inner_folds``.

    Raises
    ------
    ValueError
        Shape mismatch, NaN/inf features, fewer than two classes, a class with fewer
        than ``outer_folds`` users (or, inside an outer fold, ``inner_folds``), an
        unknown transform, or an empty / non-positive ``cs``.
    """
    x = sp.csr_matrix(features, dtype=np.float64) if sp.issparse(features) else as_array("features", features, ndim=2)
    if sp.issparse(x) and x.nnz and not np.isfinite(x.data).all():
        raise ValueError("features contains NaN/inf entries")
    y = as_array("labels", labels, ndim=1, dtype=np.int64)
    if y.size != x.shape[0]:
        raise ValueError(f"features has {x.shape[0]} rows but labels has {y.size} entries")
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        raise ValueError(f"need at least two classes, got {classes.tolist()}")
    if outer_folds < 2 or inner_folds < 2:
        raise ValueError(f"need outer_folds and inner_folds >= 2, got {outer_folds}, {inner_folds}")
    need = min_class_size(outer_folds, inner_folds)
    if counts.min() < need:
        small = classes[np.argmin(counts)]
        raise ValueError(f"class {small} has {counts.min()} user(s); nested {outer_folds} x {inner_folds}-fold CV needs >= {need} per class")
    for t in transforms:
        _transform(t)
    if not transforms:
        raise ValueError("transforms must name at least one transform")
    c_grid = [float(c) for c in cs]
    if not c_grid or min(c_grid) <= 0:
        raise ValueError(f"cs must be non-empty and positive, got {c_grid}")

    outer = StratifiedKFold(n_splits=outer_folds, shuffle=True, random_state=seed)
    oof = np.zeros((y.size, classes.size))
    folds: list[dict[str, float]] = []
    chosen_c: list[float] = []
    chosen_t: list[str] = []
    for k, (tr, te) in enumerate(outer.split(np.zeros(y.size), y)):
        inner = StratifiedKFold(n_splits=inner_folds, shuffle=True, random_state=seed + 1 + k)
        best = (-np.inf, transforms[0], c_grid[0])
        for t in transforms:
            scores = np.zeros((inner_folds, len(c_grid)))
            for j, (itr, iva) in enumerate(inner.split(np.zeros(tr.size), y[tr])):
                a, b = _fit_transform(t, x[tr[itr]], x[tr[iva]])
                for ci, proba in enumerate(fit_logreg_path(a, y[tr[itr]], b, c_grid, classes, max_iter)):
                    scores[j, ci] = _inner_score(y[tr[iva]], proba, classes)
            mean = scores.mean(axis=0)
            ci = int(np.argmax(mean))  # ties: the first in cs (the smallest C with DEFAULT_CS)
            if mean[ci] > best[0]:
                best = (float(mean[ci]), t, c_grid[ci])
        _, t, c = best
        a, b = _fit_transform(t, x[tr], x[te])
        proba = fit_logreg_path(a, y[tr], b, [c], classes, max_iter)[0]
        oof[te] = proba
        pred = classes[np.argmax(proba, axis=1)]
        vals, cnt = np.unique(y[tr], return_counts=True)
        folds.append({
            **_class_aucs(y[te], proba, classes),
            "accuracy": float(np.mean(pred == y[te])),
            "baseline_accuracy": float(np.mean(y[te] == vals[np.argmax(cnt)])),
        })
        chosen_c.append(c)
        chosen_t.append(t)
    out: dict[str, Any] = {}
    for key in folds[0]:
        vals_k = np.asarray([f[key] for f in folds])
        out[key] = float(vals_k.mean())
        if key != "baseline_accuracy":
            out[f"{key}_std"] = float(vals_k.std(ddof=1))
        if key.startswith("auc"):
            out[f"fold_{key}"] = vals_k
    out.update(
        baseline_auc=0.5, chosen_c=np.asarray(chosen_c), chosen_transform=chosen_t, oof_proba=oof, classes=classes,
        n_users=int(y.size), n_classes=int(classes.size), outer_folds=int(outer_folds), inner_folds=int(inner_folds),
    )
    return out
