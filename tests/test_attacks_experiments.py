"""Multi-run experiment drivers: LiRA user membership and the canary DP audit (tiny synthetic data)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import attacks.experiments as exp
from attacks.audit import AuditViolation
from attacks.experiments import (
    add_canaries,
    canary_statistic,
    dp_audit_experiment,
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
CENTRAL = ["privacy.mechanism=central", "privacy.noise_multiplier=5"]


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
    res = user_membership_experiment(cfg("distill.enabled=false"), tiny_synthetic, split, n_shadows=2, seed=2)
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


# ----------------------------------------------------------------------------- canaries


def test_add_canaries_appends_rare_disjoint_users(tiny_synthetic, split) -> None:
    data = tiny_synthetic
    aug, canaries, sets = add_canaries(data, 4, 6, seed=3)
    assert aug.n_users == data.n_users + 4 and aug.n_items == data.n_items
    assert aug.n_interactions == data.n_interactions + 24
    np.testing.assert_array_equal(canaries, np.arange(60, 64))
    assert sets.shape == (4, 6) and np.unique(sets).size == 24  # disjoint sets
    popularity = np.bincount(data.items, minlength=data.n_items)
    assert popularity[sets].max() <= np.sort(popularity)[23]  # among the 24 rarest
    assert len(aug.user_attributes) == 64 and aug.user_attributes.iloc[60:].isna().all().all()
    assert aug.user_map.ids[60:].tolist() == [60, 61, 62, 63]
    aug_split = leave_one_out(aug)
    for k, u in enumerate(canaries):
        np.testing.assert_array_equal(aug_split.train_of(int(u)), np.sort(sets[k, :4]))  # all but the last two train
        assert aug_split.val_items[u] == sets[k, 4] and aug_split.test_items[u] == sets[k, 5]
    np.testing.assert_array_equal(aug_split.train_items[: aug_split.train_indptr[60]], split.train_items)  # real users unchanged
    np.testing.assert_array_equal(aug_split.test_items[:60], split.test_items)


def test_add_canaries_overlapping_when_pool_is_small(tiny_synthetic) -> None:
    aug, _, sets = add_canaries(tiny_synthetic, 10, 20, seed=0)  # 200 > 80 items
    assert sets.shape == (10, 20) and all(np.unique(row).size == 20 for row in sets)
    assert aug.n_users == 70
    with pytest.raises(ValueError, match="canary_items"):
        add_canaries(tiny_synthetic, 2, 2, seed=0)
    with pytest.raises(ValueError, match="n_canaries"):
        add_canaries(tiny_synthetic, 0, 5, seed=0)


def test_canary_statistic_variants(tiny_synthetic) -> None:
    aug, canaries, _ = add_canaries(tiny_synthetic, 2, 5, seed=0)
    sp = leave_one_out(aug)
    rng = np.random.default_rng(1)
    table, init = rng.normal(size=(aug.n_items, 3)), rng.normal(size=(aug.n_items, 3))
    items = sp.train_of(int(canaries[0]))
    assert canary_statistic(sp, canaries, table)[0] == pytest.approx(np.linalg.norm(table[items], axis=1).mean())
    assert canary_statistic(sp, canaries, table, init)[0] == pytest.approx(np.linalg.norm((table - init)[items], axis=1).mean())
    v = np.array([0.0, 2.0, 0.0])
    assert canary_statistic(sp, canaries, table, init, v)[0] == pytest.approx((table - init)[items, 1].mean())
    with pytest.raises(ValueError, match="direction"):
        canary_statistic(sp, canaries, table, init, np.zeros(3))


# ----------------------------------------------------------------------------- audit


def test_audit_without_dp_claims_nothing(tiny_synthetic) -> None:
    res = dp_audit_experiment(cfg(), tiny_synthetic, n_canaries=6, n_runs=3, seed=0, canary_items=6)
    assert res["eps_lb"] >= 0.0 and res["passed"]
    assert res["eps_claimed"] == math.inf and res["claimed_source"].startswith("none")
    assert res["n_in"] + res["n_out"] == 18 and res["n_in"] > 0 and res["n_out"] > 0
    assert res["canary_train_items"] == 4 and len(res["run_seeds"]) == 3
    assert res["curves"]["audit"]["scores"].shape == (18,)
    json.dumps(_plain(res))


def test_audit_with_central_dp_stays_below_the_claim(tiny_synthetic) -> None:
    res = dp_audit_experiment(cfg(*CENTRAL), tiny_synthetic, n_canaries=8, n_runs=4, seed=1, canary_items=6)
    assert res["claimed_source"] == "epsilon" and math.isfinite(res["eps_claimed"])
    assert 0.0 <= res["eps_lb"] <= res["eps_claimed"] and res["passed"]
    assert res["delta"] == pytest.approx(res["privacy"]["delta"]) and res["privacy"]["mechanism"] == "central"


def test_audit_uses_epsilon_if_covered_when_withheld(tiny_synthetic) -> None:
    c = with_overrides(cfg(*CENTRAL), ["train.selection=best-val"])  # validation-based selection is not covered
    res = dp_audit_experiment(c, tiny_synthetic, n_canaries=4, n_runs=2, seed=2, canary_items=5, statistic="head_projection")
    assert res["claimed_source"].startswith("epsilon_if_covered") and math.isfinite(res["eps_claimed"])
    assert res["statistic"] == "head_projection" and res["eps_lb"] >= 0.0


def test_audit_violation_is_raised_for_an_oracle_test(tiny_synthetic, monkeypatch) -> None:
    """A statistic that knows the answer separates IN from OUT perfectly and must beat a small claim."""
    seen: dict[str, np.ndarray] = {}
    real_run = exp.run_federated

    def recording_run(*args, participants, **kwargs):
        seen["participants"] = np.asarray(participants)
        return real_run(*args, participants=participants, **kwargs)

    def oracle(split, canary_users, *args):
        return np.isin(canary_users, seen["participants"]).astype(np.float64)

    monkeypatch.setattr(exp, "run_federated", recording_run)
    monkeypatch.setattr(exp, "canary_statistic", oracle)
    c = cfg("privacy.mechanism=central", "privacy.noise_multiplier=8", "train.rounds=1", "distill.enabled=false")
    with pytest.raises(AuditViolation, match="exceeds the claimed epsilon"):
        dp_audit_experiment(c, tiny_synthetic, n_canaries=10, n_runs=3, seed=0, canary_items=4)
    res = dp_audit_experiment(c, tiny_synthetic, n_canaries=10, n_runs=3, seed=0, canary_items=4, raise_on_violation=False)
    assert not res["passed"] and res["eps_lb"] > res["eps_claimed"] and res["fp"] == 0 and res["fn"] == 0


def test_audit_argument_errors(tiny_synthetic) -> None:
    with pytest.raises(ValueError, match="n_runs"):
        dp_audit_experiment(cfg(), tiny_synthetic, n_canaries=2, n_runs=0, seed=0)
    with pytest.raises(ValueError, match="unknown audit statistic"):
        dp_audit_experiment(cfg(), tiny_synthetic, n_canaries=2, n_runs=1, seed=0, statistic="loss")
