"""Exact reconstruction of each client's training set: the pure functions and a small synthetic run."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.reconstruction import (
    decide_by_count,
    decide_by_sign,
    expected_uploaded_rows,
    fixed_direction_row_scores,
    positives_from_row_count,
    reconstruction_metrics,
)
from attacks.suite import run_view_attacks
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out, sample_training
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.simulation.views import ViewRecorder

TINY = [
    "train.rounds=1", "train.local_epochs=1", "train.batch_size=16", "fusion.server_epochs=1", "fusion.embedding_dim=16",
    "model.latent_dim=8", "grouping.num_groups=3", "eval.ks=[5,10]", "train.patience=0", "grouping.method=oblivious",
    "train.selection=last",
]


def test_expected_rows_golden() -> None:
    # 2 positives, 1 negative each, 4 items: 2 draws from the 2 other items give 1 + 1/2 distinct on average
    assert expected_uploaded_rows(2, 1, 4) == pytest.approx(2 + 1.5)
    # no negatives: only the positives
    assert expected_uploaded_rows(np.array([0, 3]), 0, 10).tolist() == [0.0, 3.0]
    with pytest.raises(ValueError):
        expected_uploaded_rows(4, 1, 4)


def test_positive_count_accounts_for_repeated_negatives() -> None:
    n_items, k = 1682, 4
    n = np.array([1, 20, 100, 400])
    rows = np.rint(expected_uploaded_rows(n, k, n_items)).astype(np.int64)
    np.testing.assert_array_equal(positives_from_row_count(rows, k, n_items), n)
    assert rows[-1] < 400 * (1 + k)  # rows / (1 + k) would undercount a long history
    assert positives_from_row_count(np.array([0]), k, n_items).tolist() == [0]


def test_positive_count_on_sampled_negatives(tiny_synthetic) -> None:
    split = leave_one_out(tiny_synthetic)
    s = sample_training(split, 4, np.random.default_rng(0))
    rows = np.array([np.unique(s.items[s.indptr[u] : s.indptr[u + 1]]).size for u in range(split.n_users)])
    est = positives_from_row_count(rows, 4, split.n_items)
    true = split.train_counts()
    naive = np.rint(rows / 5)  # as if negatives never repeated
    assert np.mean(est == true) >= 0.5 and np.abs(est - true).mean() < np.abs(naive - true).mean()


def test_decisions_and_metrics_golden() -> None:
    ptr = np.array([0, 3, 5])
    scores = np.array([0.5, -1.0, 2.0, -0.1, 0.3])
    np.testing.assert_array_equal(decide_by_count(ptr, scores, np.array([1, 1])), [False, False, True, False, True])
    np.testing.assert_array_equal(decide_by_sign(scores), [True, False, True, False, True])
    truth = np.array([True, False, True, False, True])
    m = reconstruction_metrics(ptr, decide_by_sign(scores), truth)
    assert m["precision"] == m["recall"] == m["f1"] == m["exact_recovery"] == 1.0
    m = reconstruction_metrics(ptr, decide_by_count(ptr, scores, np.array([1, 1])), truth, missed=np.array([0, 1]))
    # client 0 misses one positive (row 0); client 1 also misses a positive that was never uploaded
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 2) and m["exact_recovery"] == 0.0
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(0.5) and m["f1"] == pytest.approx(2 / 3)


def test_fixed_direction_projection() -> None:
    w1i, w2 = np.eye(2), np.array([3.0, 4.0])
    np.testing.assert_allclose(fixed_direction_row_scores(np.array([[3.0, 4.0], [-3.0, -4.0]]), w1i, w2), [5.0, -5.0])
    with pytest.raises(ValueError, match="dot scorer"):
        fixed_direction_row_scores(np.ones((1, 2)), np.zeros((2, 2)), w2)


def _attack(data, tmp_path, *extra: str) -> dict:
    split = leave_one_out(data)
    cfg = with_overrides(config_from_dict({"method": "gfmfr"}), TINY + list(extra))
    run_federated(cfg, data, split, progress=False, callbacks=[ViewRecorder(tmp_path, [0])])
    res = run_view_attacks(tmp_path, 0, data, split, imia_clients=0, num_negatives=cfg.train.num_negatives, attribute_folds=0)
    return {r.name: r for r in res if r.observer == "server"}


def test_plain_server_recovers_every_training_set(tiny_synthetic, tmp_path) -> None:
    res = _attack(tiny_synthetic, tmp_path)
    rec = res["interaction-reconstruction"].metrics
    assert rec["clients"] == 60 and rec["exact_recovery"] >= 0.95 and rec["f1"] >= 0.99
    assert rec["auc"] >= 0.99  # among uploaded rows
    base = res["interaction-uploaded"].metrics["auc"]
    assert 0.55 < base < 0.95 and rec["uploaded_indicator_auc"] == base  # negatives are uploaded too
    assert 0.0 <= rec["count_exact_recovery"] <= 1.0 and 0.0 <= rec["count_estimate_exact"] <= 1.0


def test_masking_server_has_nothing_per_client(tiny_synthetic, tmp_path) -> None:
    res = _attack(tiny_synthetic, tmp_path, "aggregation.backend=masking", "aggregation.neighbours=8")
    rec = res["interaction-reconstruction"]
    assert rec.metrics["clients"] == 0 and rec.metrics["exact_recovery"] == 0.0 and rec.metrics["recall"] == 0.0
    assert "interaction-uploaded" not in res and "no per-client" in rec.details["source"]
