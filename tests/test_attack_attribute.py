"""Attribute inference by nested cross-validation: planted signals are found, permuted labels are not.

Small synthetic user x item matrices only (each test well under a few seconds).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from attacks.attribute import (
    AGE_THRESHOLD,
    _class_aucs,
    attribute_targets,
    cv_attribute_inference,
    fit_logreg_path,
    interaction_matrix,
    min_class_size,
)
from attacks.cli import attack_summary_lines
from attacks.suite import attribute_results

SMALL_CS = (0.01, 0.1, 1.0, 10.0)


def _planted(n_users: int, n_items: int, labels: np.ndarray, *, signal: float, seed: int) -> sp.csr_matrix:
    """Binary interactions: every user picks ~20 items; a user of class c favours the block of items of class c.

    ``signal`` is the probability that one of the user's picks comes from its class block
    (the rest are uniform over all items).
    """
    rng = np.random.default_rng(seed)
    n_cls = int(labels.max()) + 1
    blocks = np.array_split(np.arange(n_items), n_cls * 2)  # the first n_cls blocks carry the signal
    rows, cols = [], []
    for u, c in enumerate(labels):
        picks = np.where(rng.random(20) < signal, rng.choice(blocks[c], 20), rng.integers(0, n_items, 20))
        rows += [u] * picks.size
        cols += picks.tolist()
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_users, n_items))
    m.data[:] = 1.0
    return m


def test_planted_binary_signal_is_found() -> None:
    y = (np.random.default_rng(0).random(240) < 0.35).astype(np.int64)
    x = _planted(240, 120, y, signal=0.3, seed=1)
    res = cv_attribute_inference(x, y, cs=SMALL_CS, seed=0)
    assert res["auc"] > 0.9
    assert res["fold_auc"].shape == (5,) and res["auc_std"] >= 0.0
    assert res["oof_proba"].shape == (240, 2) and np.allclose(res["oof_proba"].sum(1), 1.0)
    assert set(res["chosen_transform"]) <= {"raw", "l2-rows", "tfidf"} and set(res["chosen_c"]) <= set(SMALL_CS)
    assert res["accuracy"] > res["baseline_accuracy"]


def test_permuted_labels_stay_at_chance_after_tuning() -> None:
    """The control: the same matrix with the labels shuffled. Tuning C and the transform
    on the held-out fold would lift this above 0.5; choosing them inside the training
    folds keeps it at chance."""
    y = (np.random.default_rng(0).random(200) < 0.35).astype(np.int64)
    x = _planted(200, 100, y, signal=0.3, seed=1)
    aucs = [cv_attribute_inference(x, np.random.default_rng(10 + k).permutation(y), cs=SMALL_CS, seed=k)["auc"] for k in range(3)]
    assert abs(float(np.mean(aucs)) - 0.5) < 0.07
    assert all(abs(a - 0.5) < 0.15 for a in aucs)


def test_planted_multiclass_macro_and_micro() -> None:
    y = np.repeat(np.arange(4), 32)
    x = _planted(128, 96, y, signal=0.4, seed=2)
    res = cv_attribute_inference(x, y, cs=SMALL_CS, seed=0)
    assert "auc" not in res
    assert res["auc_macro_ovr"] > 0.9 and res["auc_micro_ovr"] > 0.9
    assert res["fold_auc_macro_ovr"].shape == (5,) and res["fold_auc_micro_ovr"].shape == (5,)


def test_macro_and_micro_auc_definitions() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 50)
    y[:3] = [0, 1, 2]
    proba = rng.dirichlet(np.ones(3), 50) + 0.3 * (y[:, None] == np.arange(3))
    proba /= proba.sum(1, keepdims=True)
    aucs = _class_aucs(y, proba, np.arange(3))
    assert aucs["auc_macro_ovr"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    onehot = (y[:, None] == np.arange(3)).astype(int)
    assert aucs["auc_micro_ovr"] == pytest.approx(roc_auc_score(onehot.ravel(), proba.ravel()))
    assert aucs["auc_macro_ovr"] != pytest.approx(aucs["auc_micro_ovr"])


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logreg_path_matches_scikit_learn(n_classes: int) -> None:
    rng = np.random.default_rng(4)
    x = sp.random(150, 40, density=0.15, random_state=5, format="csr")
    x.data[:] = 1.0
    y = rng.integers(0, n_classes, 150)
    cs = [0.01, 1.0, 10.0]
    ours = fit_logreg_path(x, y, x, cs, np.arange(n_classes))
    for c, p in zip(cs, ours):
        ref = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x, y).predict_proba(x)
        np.testing.assert_allclose(p, ref, atol=1e-3)


def test_attribute_targets_and_matrix() -> None:
    t = attribute_targets(np.array(["F", "M", "M", "F"]), np.array([18, AGE_THRESHOLD - 1, AGE_THRESHOLD, 50]))
    assert t["gender"].tolist() == [1, 0, 0, 1]
    assert t["age-ge-30"].tolist() == [0, 0, 1, 1]
    assert t["age-bracket4"].tolist() == [0, 1, 1, 3]
    m = interaction_matrix(np.array([0, 3, 3, 4]), np.array([2, 2, 0, 1]), 4)
    assert m.shape == (3, 4) and m.toarray().tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    with pytest.raises(ValueError, match="items must be in"):
        interaction_matrix(np.array([0, 1]), np.array([4]), 4)


def test_cv_refuses_classes_too_small_for_the_folds() -> None:
    y = np.r_[np.zeros(40, int), np.ones(3, int)]
    with pytest.raises(ValueError, match="class 1 has 3 user"):
        cv_attribute_inference(np.ones((43, 3)), y)  # 5 x 3-fold nested CV needs 4 per class
    assert min_class_size(5, 3) == 5 and min_class_size(5, 5) == 7 and min_class_size(2, 3) == 6
    with pytest.raises(ValueError, match="unknown feature transform"):
        cv_attribute_inference(np.ones((45, 3)), np.r_[np.zeros(20, int), np.ones(25, int)], transforms=("log",))


def test_attribute_results_names_ceiling_and_statements() -> None:
    rng = np.random.default_rng(6)
    gender = (rng.random(200) < 0.4).astype(np.int64)
    truth = _planted(200, 100, gender, signal=0.3, seed=7)
    noisy = truth + _planted(200, 100, rng.integers(0, 2, 200), signal=0.0, seed=8)  # training items plus random rows
    noisy.data[:] = 1.0
    targets = {"gender": gender, "age-bracket4": np.r_[np.zeros(196, int), np.ones(4, int)]}  # too few in class 1
    views = {"reconstruction": truth.copy(), "uploaded-rows": noisy}
    res = attribute_results(views, truth, targets, seed=0, cs=SMALL_CS, note={"backend": "plain"})
    by_name = {r.name: r for r in res}
    rec, up = by_name["attribute-gender-from-reconstruction"], by_name["attribute-gender-from-uploaded-rows"]
    assert rec.details["same_features_as_ceiling"] and not up.details["same_features_as_ceiling"]
    assert rec.details["entries_differing_from_ceiling"] == 0 and up.details["entries_differing_from_ceiling"] == (noisy != truth).nnz > 0
    assert rec.metrics["auc"] == rec.metrics["ceiling_auc"] and rec.metrics["share_of_ceiling_lift"] == pytest.approx(1.0)
    assert up.metrics["ceiling_auc"] == rec.metrics["ceiling_auc"] and up.metrics["auc"] < rec.metrics["auc"]
    assert 0.0 < up.metrics["share_of_ceiling_lift"] < 1.0
    assert {"auc_std", "ceiling_auc_std", "tpr_at_fpr_0.01", "accuracy", "baseline_accuracy"} <= set(rec.metrics)
    small = by_name["attribute-age-bracket4"]
    assert small.metrics == {} and small.details["kind"] == "statement" and "class 1 has 4" in small.details["statement"]
    lines = "\n".join(attack_summary_lines(res, []))
    assert "| gender (1 = F) | binary | server | reconstruction |" in lines and "(= ceiling)" in lines
    assert "attribute-age-bracket4 (server): not run" in lines


def test_multiclass_results_name_their_auc() -> None:
    y = np.repeat(np.arange(4), 32)
    x = _planted(128, 96, y, signal=0.4, seed=9)
    res = {r.name: r for r in attribute_results({"reconstruction": x}, x, {"age-bracket4": y}, seed=0, cs=SMALL_CS)}
    macro, micro = res["attribute-age-bracket4-macro-from-reconstruction"], res["attribute-age-bracket4-micro-from-reconstruction"]
    assert macro.metrics["auc"] == macro.metrics["auc_macro_ovr"] and micro.metrics["auc"] == micro.metrics["auc_micro_ovr"]
    assert "macro" in macro.details["auc_definition"] and "micro" in micro.details["auc_definition"]
    assert "tpr_at_fpr_0.01" not in macro.metrics and "tpr_at_fpr_0.01" in micro.metrics
    lines = "\n".join(attack_summary_lines(list(res.values()), []))
    assert "| macro OvR | server | reconstruction |" in lines and "| micro OvR | server | reconstruction |" in lines
