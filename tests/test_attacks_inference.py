"""Tests for the inference attacks: interaction-level (magnitude, IMIA), LiRA, attribute, grouping.

Each attack must find a planted signal and stay at its baseline on pure noise
(fixed seeds, so the numbers are deterministic).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from attacks.attribute import AGE_BRACKET_LABELS, age_bracket, attribute_inference
from attacks.grouping import group_inference, group_scores
from attacks.interaction import (
    dense_to_csr,
    imia_row_scores,
    imia_scores,
    row_magnitude_scores,
    row_norms,
    scatter_rows,
)
from attacks.membership import lira_scores, logit_scale, loss_threshold_scores
from attacks.metrics import attack_metrics

# --------------------------------------------------------------------------- NCF simulation


def simulate_ncf_round(
    n_clients: int = 60,
    n_items: int = 120,
    d: int = 8,
    n_pos: int = 6,
    n_neg: int = 24,
    epochs: int = 2,
    lr: float = 0.1,
    item_std: float = 0.3,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One round of local training of the NCF model, every client at once.

    Each client draws ``n_pos`` positives and ``n_neg`` negatives among distinct items,
    then runs ``epochs`` epochs of per-sample SGD (BCE) on its embedding, its local
    copies of the item rows and its local copy of the head, starting from a broadcast
    model initialised as :func:`gfmfr_secure.models.params.init_shared_params` does.
    Returns the broadcast model, the CSR upload (uploaded minus broadcast rows) and
    the true labels of the uploaded rows.
    """
    rng = np.random.default_rng(seed)
    h = d
    wu = rng.normal(0.0, np.sqrt(2.0 / (2 * d)), (h, d))
    wi = rng.normal(0.0, np.sqrt(2.0 / (2 * d)), (h, d))
    b1 = np.zeros(h)
    bound = np.sqrt(6.0 / (d + 1))
    w2 = rng.uniform(-bound, bound, h)
    table = rng.normal(0.0, item_std, (n_items, d))
    m = n_pos + n_neg
    items = np.stack([rng.choice(n_items, m, replace=False) for _ in range(n_clients)])
    labels = np.zeros((n_clients, m))
    labels[:, :n_pos] = 1.0
    e = rng.normal(0.0, 1.0, (n_clients, d))
    x = table[items].copy()  # [n, m, d] local item rows
    cwu, cwi = np.repeat(wu[None], n_clients, 0), np.repeat(wi[None], n_clients, 0)
    cb1, cw2, cb2 = np.repeat(b1[None], n_clients, 0), np.repeat(w2[None], n_clients, 0), np.zeros(n_clients)
    ar = np.arange(n_clients)
    for _ in range(epochs):
        order = np.stack([rng.permutation(m) for _ in range(n_clients)])
        for j in range(m):
            k = order[:, j]
            xi, y = x[ar, k], labels[ar, k]
            z = np.einsum("nhd,nd->nh", cwu, e) + np.einsum("nhd,nd->nh", cwi, xi) + cb1
            act = np.maximum(z, 0.0)
            p = 1.0 / (1.0 + np.exp(-((cw2 * act).sum(1) + cb2)))
            err = (p - y)[:, None]
            gz = cw2 * (z > 0)
            x[ar, k] -= lr * err * np.einsum("nhd,nh->nd", cwi, gz)
            e_new = e - lr * err * np.einsum("nhd,nh->nd", cwu, gz)
            cwu -= lr * err[:, :, None] * gz[:, :, None] * e[:, None, :]
            cwi -= lr * err[:, :, None] * gz[:, :, None] * xi[:, None, :]
            cb1 -= lr * err * gz
            cw2 -= lr * err * act
            cb2 -= lr * err[:, 0]
            e = e_new
    order = np.argsort(items, axis=1)  # CSR rows item-ascending per client
    items = np.take_along_axis(items, order, 1)
    labels = np.take_along_axis(labels, order, 1)
    delta = np.take_along_axis(x, order[:, :, None], 1) - table[items]
    return {
        "row_ptr": np.arange(n_clients + 1) * m,
        "row_items": items.reshape(-1),
        "delta": delta.reshape(-1, d),
        "labels": labels.reshape(-1),
        "head": (table, wu, wi, b1, w2, 0.0),
    }


@pytest.fixture(scope="module")
def ncf_round() -> dict[str, np.ndarray]:
    return simulate_ncf_round()


# --------------------------------------------------------------------------- magnitude


def test_row_magnitude_detects_positives(ncf_round):
    r = ncf_round
    norms = row_norms(r["row_ptr"], r["row_items"], r["delta"], n_items=120)
    assert norms.shape == (60, 120)
    scores = row_magnitude_scores(norms)
    truth = scatter_rows(r["row_ptr"], r["row_items"], r["labels"], 120)
    # among uploaded rows: positives move further (|p - 1| vs |p| after local learning)
    up = norms > 0
    assert attack_metrics(truth[up], scores[up])["auc"] > 0.8
    # over all items the server also knows that non-uploaded rows are not interactions
    assert attack_metrics(truth.ravel(), scores.ravel())["auc"] > 0.9
    per = row_magnitude_scores(norms, per_client=True)
    np.testing.assert_allclose(per.sum(1) / (per > 0).sum(1), 1.0)
    assert (per[~up] == 0).all()


def test_row_magnitude_on_noise_and_validation():
    rng = np.random.default_rng(1)
    norms = np.abs(rng.normal(size=(40, 100)))
    truth = rng.integers(0, 2, (40, 100))
    assert 0.45 < attack_metrics(truth.ravel(), row_magnitude_scores(norms).ravel())["auc"] < 0.55
    with pytest.raises(ValueError):
        row_magnitude_scores(-norms)
    with pytest.raises(ValueError):
        row_magnitude_scores(norms[0])


def test_csr_helpers_round_trip():
    rng = np.random.default_rng(2)
    dense = np.zeros((3, 5, 2))
    dense[0, 1] = rng.normal(size=2)
    dense[0, 4] = rng.normal(size=2)
    dense[2, 0] = rng.normal(size=2)
    ptr, items, rows = dense_to_csr(dense)
    assert ptr.tolist() == [0, 2, 2, 3] and items.tolist() == [1, 4, 0]
    np.testing.assert_array_equal(rows, dense[[0, 0, 2], [1, 4, 0]])
    back = scatter_rows(ptr, items, np.arange(3.0), 5, fill_value=-1.0)
    assert back[0, 1] == 0.0 and back[0, 4] == 1.0 and back[2, 0] == 2.0 and back[1].tolist() == [-1.0] * 5
    np.testing.assert_allclose(row_norms(ptr, items, rows, 5), np.linalg.norm(dense, axis=2))
    with pytest.raises(ValueError, match="row_ptr"):
        scatter_rows([0, 2, 1], items, np.zeros(3), 5)
    with pytest.raises(ValueError, match="row_items"):
        scatter_rows(ptr, [1, 4, 7], np.zeros(3), 5)
    with pytest.raises(ValueError, match="more than once"):
        scatter_rows(ptr, [1, 1, 0], np.zeros(3), 5)


# --------------------------------------------------------------------------- IMIA


def test_imia_detects_positives_in_simulated_sgd(ncf_round):
    r = ncf_round
    args = (r["row_ptr"], r["row_items"], r["delta"], *r["head"])
    with_prior = imia_row_scores(*args, seed=0, pos_fraction=0.2)
    no_prior = imia_row_scores(*args, seed=0)
    # among the uploaded rows only (positives vs sampled negatives)
    assert attack_metrics(r["labels"], with_prior)["auc"] > 0.9
    assert attack_metrics(r["labels"], no_prior)["auc"] > 0.75
    assert np.abs(no_prior).max() <= 2.0 + 1e-6
    proj = imia_row_scores(*args, seed=0, pos_fraction=0.2, score="projection")
    assert attack_metrics(r["labels"], proj)["auc"] > 0.85


def test_imia_on_noise_is_near_random(ncf_round):
    # random updates, unrelated to the labels: 200 clients x 30 rows
    table, wu, wi, b1, w2, b2 = ncf_round["head"]
    rng = np.random.default_rng(3)
    n, m = 200, 30
    ptr = np.arange(n + 1) * m
    items = np.concatenate([np.sort(rng.choice(table.shape[0], m, replace=False)) for _ in range(n)])
    labels = rng.random(n * m) < 0.2
    noise = rng.normal(size=(n * m, table.shape[1]))
    s = imia_row_scores(ptr, items, noise, table, wu, wi, b1, w2, b2, seed=0, pos_fraction=0.2, n_iter=2, fit_steps=10)
    assert 0.45 < roc_auc_score(labels, s) < 0.55


def test_imia_dense_csr_and_chunking_agree(ncf_round):
    r = ncf_round
    table = r["head"][0]
    n, n_items, d = 60, table.shape[0], table.shape[1]
    dense = np.zeros((n, n_items, d))
    owner = np.repeat(np.arange(n), np.diff(r["row_ptr"]))
    dense[owner, r["row_items"]] = r["delta"]
    uploaded = np.zeros((n, n_items), dtype=bool)
    uploaded[owner, r["row_items"]] = True
    kw = {"seed": 4, "n_iter": 2, "fit_steps": 10, "n_restarts": 1}
    # a few uploaded rows never moved (every ReLU gate closed): pass the upload mask
    assert (np.abs(r["delta"]).sum(1) == 0).any()
    from_dense = imia_scores(dense, *r["head"], uploaded=uploaded, **kw)
    from_csr = imia_scores(r["delta"], *r["head"], row_ptr=r["row_ptr"], row_items=r["row_items"], **kw)
    assert from_dense.shape == (n, n_items)
    np.testing.assert_allclose(from_dense, from_csr, atol=1e-6)
    assert (from_dense[~uploaded] == -2.0).all()
    assert (from_dense[uploaded] >= -2.0 - 1e-6).all()
    chunked = imia_row_scores(r["row_ptr"], r["row_items"], r["delta"], *r["head"], chunk_rows=100, **kw)
    whole = imia_row_scores(r["row_ptr"], r["row_items"], r["delta"], *r["head"], **kw)
    assert np.mean(np.isclose(chunked, whole, atol=1e-3)) > 0.98
    again = imia_row_scores(r["row_ptr"], r["row_items"], r["delta"], *r["head"], **kw)
    np.testing.assert_array_equal(again, whole)


def test_imia_handles_empty_clients_and_zero_rows():
    table = np.random.default_rng(5).normal(size=(6, 3))
    head = (table, np.eye(3), np.eye(3), np.zeros(3), np.ones(3), 0.0)
    ptr = np.array([0, 0, 2, 2])
    items = np.array([1, 4])
    delta = np.array([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    s, emb = imia_row_scores(ptr, items, delta, *head, seed=0, return_embeddings=True)
    assert s.shape == (2,) and emb.shape == (3, 3) and s[1] == 0.0 and np.isfinite(s).all()
    dense = imia_scores(delta, *head, row_ptr=ptr, row_items=items, seed=0)
    assert dense.shape == (3, 6) and dense[0].tolist() == [-2.0] * 6


@pytest.mark.parametrize(
    "change, match",
    [
        ({"delta": np.zeros((2, 4))}, "item_delta"),
        ({"w2": np.ones(4)}, "w2"),
        ({"b1": np.full(3, np.nan)}, "NaN"),
        ({"row_ptr": np.array([0, 1])}, "row_ptr"),
    ],
)
def test_imia_rejects_bad_shapes(change, match):
    table = np.zeros((6, 3))
    base = {"row_ptr": np.array([0, 2]), "row_items": np.array([1, 4]), "delta": np.ones((2, 3))}
    head = {"item_table": table, "w1_user": np.eye(3), "w1_item": np.eye(3), "b1": np.zeros(3), "w2": np.ones(3), "b2": 0.0}
    for k, v in change.items():
        (base if k in base else head)[k] = v
    with pytest.raises(ValueError, match=match):
        imia_row_scores(base["row_ptr"], base["row_items"], base["delta"], seed=0, **head)


def test_imia_option_validation(ncf_round):
    r = ncf_round
    args = (r["row_ptr"], r["row_items"], r["delta"], *r["head"])
    with pytest.raises(ValueError, match="pos_fraction"):
        imia_row_scores(*args, seed=0, pos_fraction=1.5)
    with pytest.raises(ValueError, match="unknown score"):
        imia_row_scores(*args, seed=0, score="nope")
    with pytest.raises(ValueError, match="both row_ptr and row_items"):
        imia_scores(r["delta"], *r["head"], row_ptr=r["row_ptr"], seed=0)


# --------------------------------------------------------------------------- LiRA


def shadow_data(effect: float, *, n_users: int = 2000, n_shadows: int = 16, seed: int = 0):
    """Per-user statistics with user-specific difficulty; membership adds ``effect``."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.0, 2.0, n_users)
    noise = 0.5
    shadow_in = rng.random((n_shadows, n_users)) < 0.5
    shadow = difficulty + effect * shadow_in + rng.normal(0.0, noise, (n_shadows, n_users))
    member = rng.random(n_users) < 0.5
    target = difficulty + effect * member + rng.normal(0.0, noise, n_users)
    return target, shadow, shadow_in, member


def test_lira_detects_members_and_beats_the_loss_threshold():
    target, shadow, shadow_in, member = shadow_data(1.0)
    online = attack_metrics(member, lira_scores(target, shadow, shadow_in))
    offline = attack_metrics(member, lira_scores(target, shadow, shadow_in, online=False))
    fixed = attack_metrics(member, lira_scores(target, shadow, shadow_in, fix_variance=True))
    loss = attack_metrics(member, loss_threshold_scores(-target))
    assert online["auc"] > 0.85 and offline["auc"] > 0.8 and fixed["auc"] > 0.85
    # the per-user calibration is what makes LiRA work here: the plain threshold is swamped by difficulty
    assert loss["auc"] < 0.7 < online["auc"]
    assert online["tpr_at_fpr_0.01"] > 0.05
    calibrated = loss_threshold_scores(-target, reference_losses=-np.where(~shadow_in, shadow, 0).sum(0) / (~shadow_in).sum(0))
    assert attack_metrics(member, calibrated)["auc"] > 0.8


def test_lira_on_noise_is_near_random():
    target, shadow, shadow_in, member = shadow_data(0.0, seed=1)
    for online in (True, False):
        auc = attack_metrics(member, lira_scores(target, shadow, shadow_in, online=online))["auc"]
        assert 0.45 < auc < 0.55


def test_lira_fallbacks_for_few_shadows():
    target, shadow, shadow_in, _ = shadow_data(1.0, n_users=50, n_shadows=6, seed=2)
    shadow_in[:, 0] = True  # user 0: never out
    shadow_in[:, 1] = False  # user 1: never in
    shadow_in[:, 2] = False
    shadow_in[0, 2] = True  # user 2: a single in shadow (pooled variance)
    s = lira_scores(target, shadow, shadow_in)
    assert s.shape == (50,) and np.isfinite(s).all()
    assert np.isfinite(lira_scores(target, shadow, shadow_in, online=False)).all()
    # a member-like statistic scores higher than an out-like one for the same user
    hi = lira_scores(np.r_[target[:3], 10.0], np.c_[shadow[:, :3], shadow[:, 3]], np.c_[shadow_in[:, :3], shadow_in[:, 3]])
    lo = lira_scores(np.r_[target[:3], -10.0], np.c_[shadow[:, :3], shadow[:, 3]], np.c_[shadow_in[:, :3], shadow_in[:, 3]])
    assert hi[3] > lo[3]
    with pytest.raises(ValueError, match="too few shadows"):
        lira_scores(target, shadow[:1], shadow_in[:1])
    with pytest.raises(ValueError, match="shadow_in"):
        lira_scores(target, shadow, shadow_in[:, :10])
    with pytest.raises(ValueError, match="NaN"):
        lira_scores(np.full(50, np.nan), shadow, shadow_in)


def test_lira_golden_single_user():
    # in: 1, 3 (mean 2, var 2); out: -1, 1 (mean 0, var 2); t = 1 sits halfway
    shadow = np.array([[1.0], [3.0], [-1.0], [1.0]])
    inn = np.array([[True], [True], [False], [False]])
    assert lira_scores([1.0], shadow, inn)[0] == pytest.approx(0.0)
    assert lira_scores([2.0], shadow, inn)[0] == pytest.approx(-0.5 * (0 / 2) + 0.5 * (4 / 2))
    assert lira_scores([2.0], shadow, inn, online=False)[0] == pytest.approx(2.0 / np.sqrt(2.0))
    np.testing.assert_allclose(logit_scale([0.5, 0.75]), [0.0, np.log(3.0)])


# --------------------------------------------------------------------------- attribute


def test_age_bracket_edges():
    ages = [0, 18, 24, 24.9, 25, 34, 35, 44, 45, 73]
    assert age_bracket(ages).tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert len(AGE_BRACKET_LABELS) == 4
    with pytest.raises(ValueError):
        age_bracket([-1, 20])


def test_attribute_inference_binary_signal_and_noise():
    rng = np.random.default_rng(6)
    n = 1200
    gender = (rng.random(n) < 0.3).astype(int)  # imbalanced, like ML-100K
    feats = rng.normal(size=(n, 10))
    feats[:, :2] += 1.5 * gender[:, None]
    res = attribute_inference(feats, gender, labelled_fraction=0.5, seed=0)
    assert res["auc"] > 0.85
    assert res["accuracy"] > res["baseline_accuracy"] + 0.08
    assert res["macro_f1"] > res["baseline_macro_f1"] + 0.2
    assert res["n_train"] + res["n_test"] == n and res["proba"].shape == (res["n_test"], 2)
    # baseline = majority of the labelled users, on the attacked users
    assert res["baseline_accuracy"] == pytest.approx(np.mean(gender[res["test_index"]] == 0))
    noise = attribute_inference(rng.normal(size=(2000, 10)), (rng.random(2000) < 0.3).astype(int), labelled_fraction=0.5, seed=1)
    assert 0.45 < noise["auc"] < 0.55
    assert noise["accuracy"] <= noise["baseline_accuracy"] + 0.02


def test_attribute_inference_multiclass_age_and_mlp():
    rng = np.random.default_rng(7)
    n = 800
    brackets = age_bracket(rng.integers(15, 70, n))
    centres = rng.normal(0.0, 1.5, (4, 8))
    feats = centres[brackets] + rng.normal(size=(n, 8))
    res = attribute_inference(feats, brackets, labelled_fraction=0.5, seed=0)
    assert res["n_classes"] == 4 and res["proba"].shape[1] == 4
    assert res["auc"] > 0.85
    assert res["accuracy"] > res["baseline_accuracy"] + 0.2
    mlp = attribute_inference(feats, brackets, labelled_fraction=0.5, seed=0, classifier="mlp")
    assert mlp["accuracy"] > mlp["baseline_accuracy"] + 0.2
    # the split depends only on the seed: same attacked users for both classifiers
    np.testing.assert_array_equal(res["test_index"], mlp["test_index"])


def test_attribute_inference_validation():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="two classes"):
        attribute_inference(x, np.zeros(10, int), labelled_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="need >= 2"):
        attribute_inference(x, np.r_[np.zeros(9, int), 1], labelled_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="unknown classifier"):
        attribute_inference(x, np.r_[np.zeros(5, int), np.ones(5, int)], labelled_fraction=0.5, seed=0, classifier="svm")
    with pytest.raises(ValueError, match="labelled_fraction"):
        attribute_inference(x, np.r_[np.zeros(5, int), np.ones(5, int)], labelled_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="rows"):
        attribute_inference(x, np.zeros(9, int), labelled_fraction=0.5, seed=0)


# --------------------------------------------------------------------------- grouping


def planted_groups(signal: bool, *, n_users: int = 1500, n_groups: int = 4, n_items: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    block = n_items // n_groups
    truth = rng.integers(0, n_groups, n_users)
    teacher = rng.uniform(0.1, 0.3, (n_groups, n_items))
    for g in range(n_groups):
        teacher[g, g * block : (g + 1) * block] += 0.5 if signal else 0.0
    lengths = rng.integers(3, 15, n_users)
    rows = []
    for u in range(n_users):
        if signal:
            own = rng.random(lengths[u]) < 0.6
            rows.append(np.where(own, truth[u] * block + rng.integers(0, block, lengths[u]), rng.integers(0, n_items, lengths[u])))
        else:
            rows.append(rng.integers(0, n_items, lengths[u]))
    indptr = np.r_[0, np.cumsum(lengths)]
    return teacher, (indptr, np.concatenate(rows)), truth


@pytest.mark.parametrize("method", ["mean", "loglik"])
def test_group_inference_signal_and_noise(method):
    teacher, user_items, truth = planted_groups(True)
    res = group_inference(teacher, user_items, truth, method=method)
    assert res["accuracy"] > 0.9 and res["macro_f1"] > 0.9
    assert res["baseline_chance"] == 0.25 and res["baseline_accuracy"] < 0.3
    teacher, user_items, truth = planted_groups(False, seed=1)
    res = group_inference(teacher, user_items, truth, method=method)
    assert 0.2 < res["accuracy"] < 0.3


def test_group_inference_golden_and_edge_cases():
    teacher = np.array([[0.9, 0.8, 0.1, 0.1], [0.1, 0.2, 0.9, 0.6]])
    indptr = np.array([0, 2, 3, 3, 5])  # user 2 has no known items
    items = np.array([0, 1, 3, 2, 3])
    truth = np.array([0, 0, 1, 1])
    res = group_inference(teacher, (indptr, items), truth)
    np.testing.assert_allclose(res["scores"][0], [0.85, 0.15])
    np.testing.assert_allclose(res["scores"][3], [0.1, 0.75])
    assert res["pred"].tolist() == [0, 1, -1, 1]
    assert res["accuracy"] == pytest.approx(2 / 3) and res["n_no_items"] == 1 and res["n_evaluated"] == 3
    assert res["baseline_accuracy"] == pytest.approx(2 / 3)
    ll = group_scores(teacher, indptr, items, method="loglik")
    np.testing.assert_allclose(ll[1], np.log(teacher[:, 3] / teacher.sum(1)))
    with pytest.raises(ValueError, match="strictly positive"):
        group_scores(teacher - 0.5, indptr, items, method="loglik")
    with pytest.raises(ValueError, match="unknown method"):
        group_scores(teacher, indptr, items, method="nope")
    with pytest.raises(ValueError, match="true_groups"):
        group_inference(teacher, (indptr, items), np.array([0, 0, 2, 1]))
    with pytest.raises(ValueError, match="items"):
        group_inference(teacher, (indptr, np.array([0, 1, 9, 2, 3])), truth)
