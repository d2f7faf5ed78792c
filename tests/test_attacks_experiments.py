"""Multi-run experiment driver: LiRA user membership (tiny synthetic data)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attacks.experiments import (
    roc_inputs,
    user_membership_experiment,
    user_statistic,
)
from attacks.metrics import tpr_key
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out

TINY = [
    "train.rounds=2", "train.local_epochs=1", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=1", "fusion.embedding_dim=16", "model.latent_dim=8", "grouping.num_groups=3",
    "eval.ks=[5,10]", "train.patience=0", "grouping.method=oblivious", "train.selection=last",
]


def cfg(*extra: str):
    return with_overrides(config_from_dict({"method": "gfmfr"}), TINY + list(extra))


@pytest.fixture(scope="module")
def split(tiny_synthetic):
    return leave_one_out(tiny_synthetic)


def _plain(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "curves"}


# ----------------------------------------------------------------------------- membership


def test_membership_experiment_keys_and_metrics(tiny_synthetic, split) -> None:
    res = user_membership_experiment(cfg(), tiny_synthetic, split, n_shadows=3, seed=0)
    assert res["statistic"] == res["statistic_used"] == "teacher"
    assert res["n_shadows"] == 3 and len(res["run_seeds"]) == 4 and len(set(res["run_seeds"])) == 4
    assert res["n_users"] == 60 and res["n_members"] == 30
    for label in ("lira", "lira_offline", "raw_statistic"):
        m = res[label]
        assert 0.0 <= m["auc"] <= 1.0
        for t in (0.01, 0.001):
            assert 0.0 <= m[tpr_key(t)] <= 1.0
        assert m["n_pos"] == 30 and m["n_neg"] == 30
        c = res["curves"][label]
        assert c["y_true"].shape == c["scores"].shape == (60,)
        assert c["fpr"][0] == 0.0 and c["tpr"][-1] == 1.0
    assert res["target_privacy"]["mechanism"] == "none"
    json.dumps(_plain(res))  # everything but the curves is plain JSON
    assert set(roc_inputs(res)) == {"lira", "lira_offline", "raw_statistic"}


@pytest.mark.parametrize("fix_variance", [None, False])
def test_membership_with_two_shadows_uses_global_variance(tiny_synthetic, split, fix_variance) -> None:
    res = user_membership_experiment(cfg(), tiny_synthetic, split, n_shadows=2, seed=1, statistic="item_norm", fix_variance=fix_variance)
    assert res["fix_variance"] is (fix_variance is None)  # auto: pooled variances below 64 shadows
    assert 0.0 <= res["lira"]["auc"] <= 1.0 and np.isfinite(res["curves"]["lira"]["scores"]).all()
    again = user_membership_experiment(cfg(), tiny_synthetic, split, n_shadows=2, seed=1, statistic="item_norm", fix_variance=fix_variance)
    np.testing.assert_array_equal(again["curves"]["lira"]["scores"], res["curves"]["lira"]["scores"])  # seeded


def test_membership_falls_back_to_item_table_without_teacher(tiny_synthetic, split) -> None:
    res = user_membership_experiment(cfg("method=fedrap", "distill.enabled=false"), tiny_synthetic, split, n_shadows=2, seed=2)
    assert res["statistic"] == "teacher" and res["statistic_used"] == "item_norm"


def test_user_statistic_definitions(split) -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(split.n_items, 4))
    q = rng.uniform(0.1, 0.9, size=(3, split.n_items))
    stats, used = user_statistic(split, table, q, "teacher")
    lq = np.log(q / (1 - q))
    u = 5
    items = split.train_of(u)
    assert used == "teacher"
    assert stats[u] == pytest.approx(max(lq[g, items].mean() - lq[g].mean() for g in range(3)))
    stats, used = user_statistic(split, table, None, "teacher")
    norms = np.linalg.norm(table, axis=1)
    assert used == "item_norm" and stats[u] == pytest.approx(norms[items].mean() - norms.mean())


def test_membership_argument_errors(tiny_synthetic, split) -> None:
    with pytest.raises(ValueError, match="n_shadows"):
        user_membership_experiment(cfg(), tiny_synthetic, split, n_shadows=1, seed=0)
    with pytest.raises(ValueError, match="unknown membership statistic"):
        user_membership_experiment(cfg(), tiny_synthetic, split, n_shadows=2, seed=0, statistic="loss")
    with pytest.raises(ValueError, match="seed"):
        user_membership_experiment(cfg(), tiny_synthetic, split, n_shadows=2, seed=-1)
