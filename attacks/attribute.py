"""Attribute inference: predict a private user attribute (gender, age bracket) from features.

The adversary holds one feature vector per user derived from what it observed
(for the server: e.g. the user's uploaded item-table rows summarised per item,
head deltas, or the grouping features; for an outsider: published
recommendations), and knows the true attribute of a random fraction of users
(auxiliary knowledge, e.g. users who made their profile public). It trains a
classifier on those users and predicts the others.

The split is stratified by label so every class appears among both the labelled
and the attacked users; the majority-class baseline is the accuracy of always
predicting the most frequent class *of the labelled users* on the attacked users.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from attacks.base import as_array, make_rng

__all__ = ["AGE_BRACKET_EDGES", "AGE_BRACKET_LABELS", "age_bracket", "attribute_inference", "stratified_split"]

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
