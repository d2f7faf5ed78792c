"""View-based attacks end to end on small synthetic runs: leakage under plain, none under secure sums."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.suite import interaction_targets, run_view_attacks
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.simulation.views import ViewRecorder

SMALL = [
    "train.rounds=1", "train.local_epochs=2", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=2", "fusion.embedding_dim=16", "model.latent_dim=8", "grouping.num_groups=3",
    "eval.ks=[5,10]", "train.patience=0", "aggregation.neighbours=8",
]


@pytest.fixture(scope="module")
def split(tiny_synthetic):
    return leave_one_out(tiny_synthetic)


def _attack(tmp_path, data, split, *extra):
    cfg = with_overrides(config_from_dict({"method": "gfmfr"}), SMALL + list(extra))
    run_federated(cfg, data, split, progress=False, callbacks=[ViewRecorder(tmp_path, [0])])
    return {(r.name, r.observer): r for r in run_view_attacks(tmp_path, 0, data, split, seed=0, imia_clients=20, attribute_folds=0)}


def test_popularity_matched_negatives(split) -> None:
    clients = np.arange(split.n_users)
    pos, items, y = interaction_targets(split, clients, seed=0)
    for j in clients[:10]:
        own = set(split.train_of(int(j)).tolist())
        sel = pos == j
        assert all(i in own for i in items[sel][y[sel] == 1]) and not any(i in own for i in items[sel][y[sel] == 0])


def test_plain_uploads_leak_interactions(tmp_path, tiny_synthetic, split) -> None:
    res = _attack(tmp_path, tiny_synthetic, split, "grouping.method=spectral")
    assert res[("interaction-magnitude", "server")].metrics["auc"] > 0.7  # 60 of 80 items are uploaded per client here
    assert res[("interaction-imia", "server")].metrics["auc"] > 0.7  # 60 of 80 items are uploaded per client here
    assert res[("group-membership-known", "server")].metrics["relabelled_match_rate"] == 1.0  # the server groups the clients itself


def test_secure_sums_hide_interactions(tmp_path, tiny_synthetic, split) -> None:
    res = _attack(tmp_path, tiny_synthetic, split, "grouping.method=oblivious", "aggregation.backend=masking")
    auc = res[("interaction-magnitude", "server")].metrics["auc"]
    assert abs(auc - 0.5) < 0.1
    assert ("interaction-imia", "server") not in res


def _audit_cfg(*extra):
    base = [o for o in SMALL if not o.startswith("train.rounds")] + ["train.rounds=3", "grouping.method=oblivious", "train.selection=last"]
    return with_overrides(config_from_dict({"method": "gfmfr"}), base + list(extra))


def test_canary_audit_detects_without_dp_and_respects_dp(tiny_synthetic, split) -> None:
    from attacks.canary_audit import gradient_canary_audit

    no_dp = gradient_canary_audit(_audit_cfg(), tiny_synthetic, split, n_canaries=60, seed=1)
    assert no_dp["eps_lower"] > 1.0  # canary updates stand out in an un-noised sum
    assert no_dp["mean_in"] > no_dp["mean_out"] + 0.5
    dp = gradient_canary_audit(_audit_cfg("privacy.mechanism=central", "privacy.epsilon=2", "privacy.delta=1e-3", "privacy.clip=0.5"),
                               tiny_synthetic, split, n_canaries=60, seed=1)
    assert dp["eps_lower"] <= dp["eps_claimed"] and dp["claimed_source"] == "accountant"


def test_popularity_alone_scores_about_half(split) -> None:
    _pos, items, y = interaction_targets(split, np.arange(split.n_users), seed=3)
    pop = np.bincount(split.train_items, minlength=split.n_items)
    from attacks.metrics import attack_metrics

    assert abs(attack_metrics(y, pop[items].astype(float))["auc"] - 0.5) < 0.08


def test_canary_scale_above_clip_is_refused_under_dp(tiny_synthetic, split) -> None:
    from attacks.canary_audit import gradient_canary_audit

    with pytest.raises(ValueError, match="at most 1 under DP|in \\(0, 1\\] under DP"):
        gradient_canary_audit(_audit_cfg("privacy.mechanism=central", "privacy.noise_multiplier=1"), tiny_synthetic, split, n_canaries=4, scale=2.0)
