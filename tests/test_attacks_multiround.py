"""Attacks over several rounds: differencing released sums (server) and LiRA with every run a target (outsider)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attacks.membership import balanced_membership, fold_in_statistic, lira_leave_one_out, membership_figures, min_negatives
from attacks.multiround import (
    RoundRelease,
    client_updates,
    differencing_attack,
    differencing_on_views,
    isolating_weights,
    lira_rounds_experiment,
    release_rows,
    releases_from_views,
)
from gfmfr_secure.config import config_from_dict, with_overrides
from test_attacks_experiments import TINY as EXPERIMENT_TINY
from gfmfr_secure.data import leave_one_out
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.simulation.views import ViewRecorder

N_ITEMS, D = 120, 8


def client_updates_synthetic(n_clients: int = 5, *, seed: int = 0, clip: float | None = None):
    """Dot-scorer-like updates: positives along +v_u, negatives along -v_u, a small head part.

    Returns flattened updates [U, I * d + 9] and the positives as CSR (indptr, items).
    """
    rng = np.random.default_rng(seed)
    rows = np.zeros((n_clients, N_ITEMS, D))
    indptr, items = [0], []
    for u in range(n_clients):
        v = rng.normal(size=D)
        perm = rng.permutation(N_ITEMS)
        pos, neg = np.sort(perm[:12]), perm[12:48]
        rows[u, pos] = rng.uniform(0.5, 1.0, (pos.size, 1)) * v
        rows[u, neg] = -rng.uniform(0.1, 0.3, (neg.size, 1)) * v
        items.append(pos)
        indptr.append(indptr[-1] + pos.size)
    flat = np.concatenate([rows.reshape(n_clients, -1), rng.normal(0.0, 0.1, (n_clients, 9))], axis=1)
    if clip is not None:
        flat *= np.minimum(1.0, clip / np.linalg.norm(flat, axis=1, keepdims=True))
    return flat, (np.asarray(indptr), np.concatenate(items))


def release(t, groups_of, updates, *, n_groups=2, noise=0.0, rng=None, known=True) -> RoundRelease:
    """What the server learns from a round in which client ``u`` sits in group ``groups_of[u]``."""
    cohort = np.array(sorted(groups_of))
    groups = np.array([groups_of[u] for u in cohort])
    sums = np.zeros((n_groups, updates.shape[1]))
    np.add.at(sums, groups, updates[cohort])
    if noise:
        sums += rng.normal(0.0, noise, sums.shape)
    counts = np.bincount(groups, minlength=n_groups).astype(float)
    return RoundRelease(round=t, cohort=cohort, sums=sums, counts=counts, groups=groups if known else None, noise_std=noise)


A, B, C, DD, E = range(5)
# round 0: group 0 = {A, B, C}, group 1 = {D, E}; round 1: C was not sampled
BEFORE = {A: 0, B: 0, C: 0, DD: 1, E: 1}
AFTER = {A: 0, B: 0, DD: 1, E: 1}


# ----------------------------------------------------------------------------- differencing


@pytest.mark.parametrize("known", [True, False])
def test_a_client_missing_from_one_round_is_isolated_exactly(known) -> None:
    """The group floor does not help: two rounds whose memberships differ by one client give that client's update."""
    x, truth = client_updates_synthetic()
    rel = [release(0, BEFORE, x, known=known), release(1, AFTER, x, known=known)]
    res = differencing_attack(rel, n_users=5, n_items=N_ITEMS, latent_dim=D, truth_items=truth, targets=[A, C], true_updates=x[[A, C]])
    per = res["per_target"]
    assert per["leakage"][1] < 1e-9 and per["relative_error"][1] < 1e-9  # C: exact, from group sums or (masking) cohort totals
    assert per["f1"][1] == 1.0  # and its interaction set, exactly
    assert per["leakage"][0] >= 1.0 and per["relative_error"][0] > 0.5  # A never leaves B: not isolated
    assert res["isolated"] == 1 and res["rows"] == (4 if known else 2)


def test_known_colluders_isolate_a_target_in_one_round() -> None:
    x, truth = client_updates_synthetic()
    rel = release(0, {A: 0, B: 0, C: 0}, x, n_groups=1)
    alone = differencing_attack([rel], n_users=5, n_items=N_ITEMS, latent_dim=D, truth_items=truth, targets=[C], true_updates=x[[C]])
    assert alone["isolated"] == 0
    minus = RoundRelease(round=0, cohort=rel.cohort, sums=rel.sums - x[A] - x[B], counts=rel.counts, groups=rel.groups)
    res = differencing_attack([minus], n_users=5, n_items=N_ITEMS, latent_dim=D, truth_items=truth, targets=[C], known=[A, B], true_updates=x[[C]])
    assert res["isolated"] == 1 and res["per_target"]["relative_error"][0] < 1e-9


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_dp_noise_bounds_the_differencing_attack(sigma) -> None:
    """Updates clipped to C = 1, Gaussian noise sigma * C * sqrt(1 + 0.5^2) on every coordinate of every released sum."""
    x, truth = client_updates_synthetic(clip=1.0)
    rng = np.random.default_rng(3)
    tau = sigma * np.sqrt(1.25)
    rel = [release(0, BEFORE, x, noise=tau, rng=rng), release(1, AFTER, x, noise=tau, rng=rng)]
    res = differencing_attack(rel, n_users=5, n_items=N_ITEMS, latent_dim=D, truth_items=truth, targets=[C], true_updates=x[[C]])
    err = res["per_target"]["relative_error"][0]
    predicted = res["per_target"]["noise_std"][0] * np.sqrt(x.shape[1]) / np.linalg.norm(x[C])
    assert err > 10.0 and err >= 0.8 * predicted  # the error is the noise floor the weights predict (or more)
    assert abs(res["interaction"]["auc"] - 0.5) < 0.15
    assert res["interaction"]["f1"] < res["interaction"]["baseline_f1"]  # worse than calling every item a positive


def test_without_noise_the_same_design_is_exact_and_a_little_noise_barely_hurts() -> None:
    x, truth = client_updates_synthetic(clip=1.0)
    rng = np.random.default_rng(3)
    rel = [release(0, BEFORE, x, noise=1e-4, rng=rng), release(1, AFTER, x, noise=1e-4, rng=rng)]
    res = differencing_attack(rel, n_users=5, n_items=N_ITEMS, latent_dim=D, truth_items=truth, targets=[C], true_updates=x[[C]])
    assert res["per_target"]["relative_error"][0] < 0.1 and res["interaction"]["f1"] == 1.0


def test_isolating_weights_golden_and_leverage_identity() -> None:
    rows = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    iso = isolating_weights(rows, [2])
    np.testing.assert_allclose(iso.weights[0], [1.0, -1.0], atol=1e-12)
    assert iso.isolated.tolist() == [True]
    rng = np.random.default_rng(0)
    a = (rng.random((6, 15)) < 0.4).astype(float)
    a[0, :] = 1.0  # every client is counted somewhere
    iso = isolating_weights(a, np.arange(15))
    np.testing.assert_allclose(iso.leakage**2, 1.0 / iso.leverage - 1.0, atol=1e-9)  # leakage^2 = 1 / h - 1 without noise
    np.testing.assert_allclose((a.T @ iso.weights.T)[np.arange(15), np.arange(15)], 1.0)  # the target's coefficient is 1
    np.testing.assert_array_equal(iso.isolated, np.isclose(iso.leverage, 1.0))  # isolated exactly at leverage 1
    assert 0 < iso.isolated.sum() < 15  # 6 random rows over 15 clients happen to isolate some of them, not all
    both = isolating_weights(a, np.arange(15), common=True)  # coefficients also total 1: a common part cancels
    coef = a.T @ both.weights.T
    np.testing.assert_allclose(coef.sum(0), 1.0)
    np.testing.assert_allclose(coef[np.arange(15), np.arange(15)], 1.0)
    np.testing.assert_array_equal(both.isolated, iso.isolated)  # an isolation meets both constraints
    assert (both.leakage >= iso.leakage - 1e-9).all()  # a further constraint never leaves less


def test_differencing_input_errors() -> None:
    with pytest.raises(ValueError, match="counted in no released row"):
        isolating_weights(np.array([[1.0, 0.0]]), [1])
    with pytest.raises(ValueError, match="known"):
        isolating_weights(np.array([[1.0, 1.0]]), [1], known=[1])
    with pytest.raises(ValueError, match="groups must lie"):
        RoundRelease(round=0, cohort=np.array([0, 1]), sums=np.zeros((2, 3)), counts=np.zeros(2), groups=np.array([0, 2]))
    with pytest.raises(ValueError, match="client ids"):
        release_rows([RoundRelease(round=0, cohort=np.array([7]), sums=np.zeros((1, 3)), counts=np.ones(1))], n_users=5)


# ----------------------------------------------------------------------------- on recorded views

# the tiny GFMFR of the membership driver's tests (oblivious grouping), over 3 rounds with half the clients a round
TINY = [o for o in EXPERIMENT_TINY if not o.startswith("train.rounds=")] + [
    "train.rounds=3", "train.client_fraction=0.5", "grouping.min_group_size=2", "aggregation.neighbours=0", "aggregation.value_bound=32",
]


@pytest.fixture(scope="module")
def split(tiny_synthetic):
    return leave_one_out(tiny_synthetic)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_synthetic, split):
    """Views of rounds 0-2 of the same tiny run under plain and masking (and plain with another seed)."""
    root = tmp_path_factory.mktemp("views")
    for name, extra in (("plain", ["aggregation.backend=plain"]), ("masking", ["aggregation.backend=masking"]), ("other", ["aggregation.backend=plain", "seed=5"])):
        cfg = with_overrides(config_from_dict({"method": "gfmfr"}), TINY + extra)
        run_federated(cfg, tiny_synthetic, split, progress=False, callbacks=[ViewRecorder(root / name, range(3))])
    return root


def test_views_give_the_released_sums_and_what_the_server_knows(recorded, split) -> None:
    plain = releases_from_views(recorded / "plain", range(3))
    masking = releases_from_views(recorded / "masking", range(3))
    assert all(r.groups is not None for r in plain)  # plain: each upload's group field
    assert all(r.groups is None for r in masking)  # masking: sums, counts and the cohort only
    assert all(r.groups is None for r in releases_from_views(recorded / "plain", range(3), groups_known=False))
    for p, m in zip(plain, masking):
        np.testing.assert_array_equal(p.cohort, m.cohort)  # same seed: same cohorts
        np.testing.assert_allclose(p.sums, m.sums, atol=1e-3)  # fixed-point sums equal the float sums
        x = client_updates(recorded / "plain", [p.round], p.cohort, split.n_items, 8)
        for g in range(p.sums.shape[0]):  # each released group sum is the sum of its members' uploads
            np.testing.assert_allclose(x[p.groups == g].sum(0), p.sums[g], atol=1e-5)
        assert p.counts.sum() == p.cohort.size


def test_differencing_on_recorded_views(recorded, split) -> None:
    known = differencing_on_views(recorded / "plain", range(3), split, latent_dim=8, truth_dir=recorded / "plain")
    masked = differencing_on_views(recorded / "masking", range(3), split, latent_dim=8, truth_dir=recorded / "plain")
    assert known["rows"] > masked["rows"] == 3  # group sums against one total per round
    assert masked["leakage"]["median"] >= known["leakage"]["median"] > 0  # 60 clients, a few rows: nobody is isolated
    for res in (known, masked):
        assert 0.0 <= res["interaction"]["f1"] <= 1.0 and np.isfinite(res["relative_error"]["median"])
    json.dumps({k: v for k, v in masked.items() if k != "per_target"})
    with pytest.raises(ConfigError, match="cohort differs"):
        differencing_on_views(recorded / "masking", range(3), split, latent_dim=8, truth_dir=recorded / "other")
    with pytest.raises(ConfigError, match="no recorded server view"):
        differencing_on_views(recorded / "masking", range(3), split, latent_dim=8, truth_dir=recorded / "missing")


# ----------------------------------------------------------------------------- LiRA, every run a target


def layouts(effect: float, *, n_users: int, n_models: int = 17, seeds=(0, 1)):
    """Per-user statistics with user-specific difficulty; membership adds ``effect``; scored leave-one-out."""
    out = []
    for s in seeds:
        rng = np.random.default_rng(s)
        keep = balanced_membership(n_models, n_users, rng)
        stats = rng.normal(0.0, 2.0, n_users) + effect * keep + rng.normal(0.0, 0.5, (n_models, n_users))
        out.append((lira_leave_one_out(stats, keep), keep))
    return out


def test_balanced_membership_puts_every_user_in_half_the_runs() -> None:
    keep = balanced_membership(17, 500, 0)
    assert (keep.sum(0) == 9).all()
    assert 0.4 < keep.mean(1).min() and keep.mean(1).max() < 0.6
    assert not np.array_equal(keep, balanced_membership(17, 500, 1))


def test_min_negatives() -> None:
    assert min_negatives(0.01) == 10_000 and min_negatives(0.001) == 100_000 and min_negatives(0.01, 50) == 5_000


def test_pooled_lira_detects_members_and_reports_tpr_only_where_estimable() -> None:
    lay = layouts(1.0, n_users=700)  # 8 non-member runs x 700 users = 5,600 per seed, 11,200 pooled
    pooled = membership_figures(lay, n_boot=100, seed=0)
    assert pooled["n_neg"] == 11_200 and pooled["n_models"] == 34
    assert pooled["auc"]["lo"] > 0.85
    tpr = pooled["tpr_at_fpr_0.01"]
    assert tpr["estimable"] and tpr["lo"] > 0.05 and tpr["lo"] <= tpr["value"] <= tpr["hi"]
    assert not pooled["tpr_at_fpr_0.001"]["estimable"] and "100000 needed" in pooled["tpr_at_fpr_0.001"]["reason"]
    one = membership_figures(lay[:1], n_boot=100, seed=0)
    assert not one["tpr_at_fpr_0.01"]["estimable"] and "5600 non-members" in one["tpr_at_fpr_0.01"]["reason"]


def test_pooled_lira_on_no_signal_covers_chance() -> None:
    pooled = membership_figures(layouts(0.0, n_users=700), n_boot=200, seed=0)
    assert pooled["auc"]["lo"] < 0.5 < pooled["auc"]["hi"]
    assert pooled["tpr_at_fpr_0.01"]["lo"] <= 0.01 <= pooled["tpr_at_fpr_0.01"]["hi"]


def test_lira_leave_one_out_uses_only_the_other_runs() -> None:
    rng = np.random.default_rng(0)
    keep = balanced_membership(6, 40, rng)
    stats = rng.normal(size=(6, 40))
    scores = lira_leave_one_out(stats, keep)
    changed = stats.copy()
    changed[0] += 100.0  # model 0 as a shadow moves the others' scores, never its own fit
    again = lira_leave_one_out(changed, keep)
    assert not np.allclose(again[1:], scores[1:])
    from attacks.membership import lira_scores

    np.testing.assert_allclose(scores[2], lira_scores(stats[2], np.delete(stats, 2, 0), np.delete(keep, 2, 0)))
    with pytest.raises(ValueError, match="at least 3 models"):
        lira_leave_one_out(stats[:2], keep[:2])


def test_fold_in_statistic_prefers_items_the_table_separates() -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(80, 6))
    direction = rng.normal(size=6)
    fitted = np.sort(np.argsort(table @ direction)[-10:])  # the items a user vector along `direction` ranks top
    random = np.sort(rng.choice(80, 10, replace=False))
    stat = fold_in_statistic(np.array([0, 10, 20, 20]), np.concatenate([fitted, random]), table)
    assert stat[0] > stat[1] and stat[2] == 0.0


LIRA_TINY = [
    "train.batch_size=16", "model.latent_dim=8", "eval.ks=[5,10]", "train.patience=0", "train.selection=last",
    "train.local_epochs=5", "train.rounds=5", "train.item_lr_decay=1.0", "secrets=reproducible",
]


def test_lira_after_several_rounds_detects_members_on_a_tiny_run(tiny_synthetic, split, tmp_path) -> None:
    cfg = with_overrides(config_from_dict({"method": "gfmfr"}), LIRA_TINY)
    res = lira_rounds_experiment(cfg, tiny_synthetic, split, n_shadows=4, seeds=(0,), n_boot=100, out_dir=tmp_path, statistics=("fold_in",))
    fig = res["statistics"]["fold_in"]["lira"]["pooled"]
    assert fig["n_models"] == 5 and fig["n_pos"] + fig["n_neg"] == 5 * 60
    assert fig["auc"]["lo"] > 0.55  # the released table remembers its members
    assert not fig["tpr_at_fpr_0.01"]["estimable"]  # 5 x 30 non-members
    saved = np.load(tmp_path / "released-seed0.npz")
    assert saved["item_table"].shape == (5, split.n_items, 8) and saved["keep"].shape == (5, 60)
    json.dumps(res)
    with pytest.raises(ValueError, match="n_shadows"):
        lira_rounds_experiment(cfg, tiny_synthetic, split, n_shadows=3, seeds=(0,))
    with pytest.raises(ValueError, match="unknown membership statistics"):
        lira_rounds_experiment(cfg, tiny_synthetic, split, n_shadows=4, seeds=(0,), statistics=("loss",))


def test_lira_after_several_rounds_is_at_chance_under_strong_dp(tiny_synthetic, split) -> None:
    dp = ["privacy.mechanism=central", "privacy.noise_multiplier=20", "privacy.clip=0.02", "privacy.delta=1e-3"]
    cfg = with_overrides(config_from_dict({"method": "gfmfr"}), LIRA_TINY + dp)
    res = lira_rounds_experiment(cfg, tiny_synthetic, split, n_shadows=4, seeds=(0,), n_boot=100, statistics=("fold_in",))
    auc = res["statistics"]["fold_in"]["lira"]["pooled"]["auc"]
    assert auc["lo"] < 0.5 < auc["hi"]
    assert res["privacy"]["mechanism"] == "central"


# ----------------------------------------------------------------------------- command line


def test_attack_command_differences_recorded_rounds(ml100k_dir, tmp_path, capsys) -> None:
    from gfmfr_secure.cli import main

    sets = [
        "train.rounds=3", "model.latent_dim=8", "fusion.embedding_dim=16", "fusion.server_epochs=1", "train.local_epochs=1",
        "grouping.method=oblivious", "train.client_fraction=0.3", "train.selection=last", "record.views_rounds=[0,1,2]",
    ]
    args = ["train", "--config", "configs/gfmfr.yaml", "--data", str(ml100k_dir), "--out", str(tmp_path), "--name", "r", "--quiet", "--no-keep-model"]
    assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
    run = tmp_path / "r"
    assert main(["attack", "--run", str(run), "--difference-rounds", "0", "1", "2", "--max-targets", "20"]) == 0
    out = capsys.readouterr().out
    assert "its view (groups known)" in out and "sums and cohorts only (what masking releases)" in out
    saved = json.loads((run / "attacks" / "differencing.json").read_text())
    assert set(saved["results"]) == {"its view (groups known)", "sums and cohorts only (what masking releases)"}
    for res in saved["results"].values():
        assert res["targets"] == 20 and res["rounds"] == [0, 1, 2] and "relative_error" in res
    assert main(["attack", "--run", str(run), "--difference-rounds", "1"]) == 2
    assert "at least two rounds" in capsys.readouterr().err
    assert main(["attack", "--run", str(run), "--difference-rounds", "1", "5"]) == 2
    assert "round 5" in capsys.readouterr().err


def test_membership_leave_one_out_needs_shadows_on_both_sides(tmp_path, capsys) -> None:
    from gfmfr_secure.cli import main

    assert main(["membership", "configs/fedrap.yaml", "--leave-one-out", "--shadows", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("warning: --shadows 2") and "error: --leave-one-out needs --shadows >= 4" in err


def test_membership_table_says_not_estimable_for_too_few_non_members(ml100k_dir, tmp_path, capsys) -> None:
    from gfmfr_secure.cli import main

    sets = ["train.rounds=1", "model.latent_dim=8", "train.local_epochs=1", "train.selection=last"]
    args = ["membership", "configs/fedrap.yaml", "--shadows", "2", "--data", str(ml100k_dir), "--out", str(tmp_path)]
    assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
    row = json.loads((tmp_path / "membership.json").read_text())[0]
    assert row["lira_tpr_at_fpr_0.01"] == "not estimable (472 non-members)"  # a TPR at 1% FPR needs 10,000
    assert 0.0 <= row["lira_auc"] <= 1.0
    assert "not estimable (472 non-members)" in capsys.readouterr().out
