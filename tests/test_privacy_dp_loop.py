"""User-level DP in the federated loop: clipping, noise, accounting, budget stop, coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy import epsilon_for, rounds_within_budget
from gfmfr_secure.privacy.mechanisms import (
    adaptive_clip_step,
    clip_sparse_updates,
    split_noise_multiplier,
)
from gfmfr_secure.privacy.plan import UserLevelDP, coverage
from gfmfr_secure.privacy.release import NoiseShares, ReleaseLayout, central_noise, noise_release
from gfmfr_secure.rng import SecretSource
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.types import AggregateResult

SMALL = [
    "train.rounds=3", "train.local_epochs=2", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=2", "fusion.embedding_dim=16", "model.latent_dim=8", "grouping.num_groups=3",
    "eval.ks=[5,10]", "train.patience=0",
]


def cfg(*extra: str):
    return with_overrides(config_from_dict({"method": "gfmfr"}), SMALL + list(extra))


@pytest.fixture(scope="module")
def split(tiny_synthetic):
    return leave_one_out(tiny_synthetic)


# ----------------------------------------------------------------------------- clipping


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    rows=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    scale=st.floats(1e-3, 1e3),
    clip=st.floats(1e-2, 10.0),
    per_tensor=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_clipped_client_norm_never_exceeds_clip(n, rows, scale, clip, per_tensor, seed) -> None:
    rows = (rows * n)[:n]
    gen = torch.Generator().manual_seed(seed)
    owner = torch.from_numpy(np.repeat(np.arange(n), rows))
    item = torch.randn(int(sum(rows)), 4, generator=gen) * scale
    head = torch.randn(n, 7, generator=gen) * scale
    item_c, head_c, norms = clip_sparse_updates(owner, item, head, n, clip, per_tensor=per_tensor)
    sq = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, item_c.double().square().sum(1)) + head_c.double().square().sum(1)
    assert bool((sq.sqrt() <= clip * (1 + 1e-5)).all())
    before = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, item.double().square().sum(1)) + head.double().square().sum(1)
    torch.testing.assert_close(norms, before.sqrt().float())
    if not per_tensor:  # under the bound: untouched; over: direction kept
        small = norms <= clip
        assert torch.equal(head_c[small], head[small])
        cos = torch.nn.functional.cosine_similarity(head_c, head, dim=1)
        assert bool((cos[head.norm(dim=1) > 0] > 1 - 1e-5).all())


def test_clip_inf_returns_inputs_unchanged() -> None:
    owner = torch.tensor([0, 0, 1])
    item, head = torch.randn(3, 2), torch.randn(2, 3)
    a, b, _ = clip_sparse_updates(owner, item, head, 2, math.inf)
    assert a is item and b is head


def test_clip_rejects_nan() -> None:
    with pytest.raises(Exception, match="NaN or infinite"):
        clip_sparse_updates(torch.tensor([0]), torch.tensor([[float("nan"), 0.0]]), None, 1, 1.0)


# ----------------------------------------------------------------------------- noise


def test_central_noise_std_matches_sigma_delta() -> None:
    layout = ReleaseLayout(n_groups=2, n_items=300, latent_dim=8, head_size=20, count_value=0.5)
    source = SecretSource("reproducible", 1)
    noise = central_noise(layout, 3.0, source.key("dp-central", 0))
    n = noise.numel()
    # sample std within 4 standard errors of 3 (se of s is about sigma / sqrt(2n))
    assert abs(float(noise.std()) - 3.0) < 4 * 3.0 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 4 * 3.0 / math.sqrt(n)
    assert torch.equal(noise, central_noise(layout, 3.0, source.key("dp-central", 0)))
    assert not torch.equal(noise, central_noise(layout, 3.0, source.key("dp-central", 1)))


def test_shares_sum_carries_central_noise() -> None:
    layout = ReleaseLayout(n_groups=1, n_items=200, latent_dim=4, head_size=10, count_value=1.0)
    n, sigma_delta = 25, 2.0
    shares = NoiseShares(key=SecretSource().key("dp-share", 0), round=0, clients=np.arange(100, 100 + n), std=sigma_delta / math.sqrt(n), layout=layout)
    total = shares.sum_by_group()
    assert abs(float(total.std()) - sigma_delta) < 4 * sigma_delta / math.sqrt(2 * total.numel())
    # a share is regenerated exactly from (round key, client)
    assert torch.equal(shares.client(4), shares.client(4))
    manual = sum(shares.client(i).double() for i in range(n)).float()
    torch.testing.assert_close(total, manual, rtol=0, atol=1e-5)


def test_noise_release_derives_everything_from_noised_blocks() -> None:
    layout = ReleaseLayout(n_groups=2, n_items=3, latent_dim=2, head_size=4, count_value=0.5)
    agg = AggregateResult(
        n_clients=5, weight_total=5.0, item_sum=torch.ones(3, 2) * 5, head_sum=torch.ones(4) * 5,
        group_counts=torch.tensor([2.0, 3.0]), group_item_sum=torch.stack([torch.ones(3, 2) * 2, torch.ones(3, 2) * 3]),
        group_head_sum=torch.stack([torch.ones(4) * 2, torch.ones(4) * 3]),
    )
    noise = torch.randn(layout.shape, generator=torch.Generator().manual_seed(0))
    out = noise_release(agg, noise, layout)
    torch.testing.assert_close(out.item_sum, out.group_item_sum.sum(0))
    torch.testing.assert_close(out.head_sum, out.group_head_sum.sum(0))
    torch.testing.assert_close(out.group_counts, agg.group_counts + noise[:, -1] / 0.5)
    assert out.weight_total == pytest.approx(float(out.group_counts.sum()), rel=1e-6)
    same = noise_release(agg, torch.zeros(layout.shape), layout)
    assert torch.equal(same.item_sum, agg.item_sum) and same.weight_total == 5.0
    with pytest.raises(ValueError, match="noise must have shape"):
        noise_release(agg, torch.zeros(1, 3), layout)


# ----------------------------------------------------------------------------- adaptive clipping


def test_split_noise_multiplier_golden() -> None:
    # z = 1, sigma_b = 5: z_delta = (1 - 1/100)^-1/2
    assert split_noise_multiplier(1.0, 5.0, 100) == pytest.approx((1 - 0.01) ** -0.5)
    assert split_noise_multiplier(1.0, 0.0, 100) == pytest.approx((1 - 0.01) ** -0.5)  # default sigma_b = 100/20
    with pytest.raises(ConfigError, match="too small"):
        split_noise_multiplier(2.0, 0.5, 10)


def test_adaptive_clip_moves_towards_quantile() -> None:
    assert adaptive_clip_step(1.0, 0.9, 0.5, 0.2) < 1.0  # most clients unclipped: lower C
    assert adaptive_clip_step(1.0, 0.1, 0.5, 0.2) > 1.0
    assert adaptive_clip_step(1.0, 0.5, 0.5, 0.2) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the loop


def _weights(run):
    return torch.cat([run.shared.item_table.flatten(), run.shared.head_flat()])


@pytest.mark.parametrize("grouping", ["oblivious", "spectral"])
def test_sigma_zero_without_clipping_equals_non_private_loop(grouping, tiny_synthetic, split) -> None:
    base = run_federated(cfg(f"grouping.method={grouping}"), tiny_synthetic, split, progress=False)
    dp = run_federated(
        cfg(f"grouping.method={grouping}", "privacy.mechanism=central", "privacy.noise_multiplier=0", "privacy.clip=.inf"),
        tiny_synthetic, split, progress=False,
    )
    assert torch.equal(_weights(base), _weights(dp))
    assert base.metrics["test"] == dp.metrics["test"]
    assert dp.metrics["privacy"]["epsilon"] is None  # sigma = 0 promises nothing


def test_central_dp_reports_accountant_epsilon(tiny_synthetic, split) -> None:
    c = cfg("grouping.method=oblivious", "train.selection=last", "privacy.mechanism=central", "privacy.noise_multiplier=1.3",
            "privacy.clip=0.5", "privacy.delta=1e-3")
    run = run_federated(c, tiny_synthetic, split, progress=False)
    p = run.metrics["privacy"]
    assert p["not_covered"] == []
    assert p["rounds"] == 3 and p["sample_rate"] == 1.0
    assert p["epsilon"] == pytest.approx(epsilon_for(1.3, 1.0, 3, 1e-3, "rdp"), rel=1e-9)
    for key in ("epsilon", "delta", "accountant", "unit", "noise_multiplier", "clip", "sample_rate", "rounds", "covers"):
        assert key in p
    assert len(p["ledger"]["events"]) == 3


def test_calibrated_budget_is_never_exceeded(tiny_synthetic, split) -> None:
    c = cfg("grouping.method=oblivious", "train.selection=last", "train.client_fraction=0.5", "privacy.mechanism=distributed",
            "privacy.epsilon=3", "privacy.delta=1e-3")
    run = run_federated(c, tiny_synthetic, split, progress=False)
    p = run.metrics["privacy"]
    assert p["calibrated"] and p["rounds"] == 3
    assert p["epsilon"] <= 3.0
    assert p["epsilon"] == pytest.approx(epsilon_for(p["noise_multiplier"], 0.5, 3, 1e-3), rel=1e-9)


def test_training_stops_before_the_budget_is_exceeded(tiny_synthetic, split) -> None:
    c = cfg("train.rounds=6", "grouping.method=oblivious", "train.selection=last", "privacy.mechanism=central",
            "privacy.noise_multiplier=2.0", "privacy.epsilon=2.5", "privacy.delta=1e-3")
    expected = rounds_within_budget(2.0, 1.0, 1e-3, 2.5, 6)
    assert 0 < expected < 6
    run = run_federated(c, tiny_synthetic, split, progress=False)
    p = run.metrics["privacy"]
    assert p["rounds"] == expected
    assert p["epsilon"] <= 2.5


def test_server_side_grouping_withholds_epsilon(tiny_synthetic, split) -> None:
    run = run_federated(
        cfg("grouping.method=spectral", "train.selection=last", "privacy.mechanism=central", "privacy.noise_multiplier=1.0"),
        tiny_synthetic, split, progress=False,
    )
    p = run.metrics["privacy"]
    assert p["epsilon"] is None and "spectral" in p["epsilon_withheld_because"]
    assert p["epsilon_if_covered"] > 0


def test_validation_selection_is_not_covered() -> None:
    covers, not_covered = coverage(mechanism="central", grouping="oblivious", distill=True, selection="best-val")
    assert any("validation" in x for x in not_covered)
    covers, not_covered = coverage(mechanism="central", grouping="oblivious", distill=True, selection="last")
    assert not_covered == [] and any("centroids" in c for c in covers)


def test_local_dp_share_and_accounting() -> None:
    pc = cfg("privacy.mechanism=local", "privacy.epsilon=4", "privacy.clip=0.5").privacy
    plan = UserLevelDP.from_config(pc, sample_rate=0.1, rounds=5, expected_clients=10)
    assert plan.sample_rate == 1.0  # no amplification against the server
    assert plan.share_std(10) == pytest.approx(2 * 0.5 * plan.noise_multiplier)
    assert plan.central_std() == 0.0
    assert plan.horizon_epsilon(5) <= 4.0


def test_distributed_share_std_covers_honest_fraction() -> None:
    pc = cfg("privacy.mechanism=distributed", "privacy.noise_multiplier=2", "privacy.clip=1", "privacy.honest_fraction=0.5").privacy
    plan = UserLevelDP.from_config(pc, sample_rate=1.0, rounds=5, expected_clients=40)
    m = math.ceil(0.5 * 40)
    assert plan.share_std(40) ** 2 * m == pytest.approx((2 * plan.sensitivity) ** 2)


def test_dp_config_errors(tiny_synthetic, split) -> None:
    with pytest.raises(ConfigError, match="needs privacy.epsilon"):
        cfg("privacy.mechanism=central")
    with pytest.raises(ConfigError, match="unbounded sensitivity"):
        cfg("privacy.mechanism=central", "privacy.noise_multiplier=1", "privacy.clip=.inf")
    with pytest.raises(ConfigError, match="weighting=uniform"):
        run_federated(cfg("train.weighting=samples", "privacy.mechanism=central", "privacy.noise_multiplier=1"), tiny_synthetic, split, progress=False)


def test_impossible_budget_is_a_clear_error(tiny_synthetic, split) -> None:
    with pytest.raises(ConfigError, match="cannot be reached|budget"):
        run_federated(cfg("privacy.mechanism=central", "privacy.epsilon=1e-6", "privacy.delta=1e-10"), tiny_synthetic, split, progress=False)


def test_record_level_dpsgd_in_the_loop(tiny_synthetic, split) -> None:
    base = ["train.rounds=2", "grouping.method=oblivious", "train.selection=last", "privacy.mechanism=dpsgd",
            "privacy.dpsgd_noise_multiplier=1.0", "privacy.dpsgd_batch_size=8", "privacy.delta=1e-3"]
    run = run_federated(cfg(*base), tiny_synthetic, split, progress=False)
    p = run.metrics["privacy"]
    assert p["mechanism"] == "dpsgd" and "record" in p["unit"]
    assert p["epsilon"] is None and "rows" in p["epsilon_withheld_because"]  # touched rows reveal items
    assert p["epsilon_if_covered"] > 0 and p["rounds"] == 2
    run = run_federated(cfg(*base, "privacy.dpsgd_all_rows=true"), tiny_synthetic, split, progress=False)
    p = run.metrics["privacy"]
    assert p["epsilon"] == pytest.approx(p["epsilon_if_covered"]) and math.isfinite(p["epsilon"])


def test_views_are_recorded_and_read_back(tiny_synthetic, split, tmp_path) -> None:
    from gfmfr_secure.simulation.views import ViewRecorder, load_view

    rec = ViewRecorder(tmp_path / "views", [1])
    c = cfg("grouping.method=oblivious", "privacy.mechanism=distributed", "privacy.noise_multiplier=1.0", "train.selection=last")
    run_federated(c, tiny_synthetic, split, progress=False, callbacks=[rec])
    assert sorted(p.name for p in rec.written) == ["round1-outsider.pt", "round1-server.pt"]
    server = load_view(tmp_path / "views", 1, "server")
    assert server["exposure"] == "per-client" and server["received"]["noise_shares"]["std"] > 0
    assert server["received"]["per_client"]["item_delta"].shape[1] == 8
    outsider = load_view(tmp_path / "views", 1, "outsider")
    assert outsider["received"] == {} and "teacher" in outsider["released"] and "groups" in outsider["truth"]
    with pytest.raises(FileNotFoundError, match="recorded: round1"):
        load_view(tmp_path / "views", 0, "server")


def test_adaptive_clipping_moves_the_clip(tiny_synthetic, split) -> None:
    c = cfg("grouping.method=oblivious", "train.selection=last", "privacy.mechanism=central", "privacy.noise_multiplier=1.0",
            "privacy.clip=1e-4", "privacy.adaptive_clip=true", "privacy.clip_count_stddev=5")
    run = run_federated(c, tiny_synthetic, split, progress=False)
    clips = [h["dp"]["clip"] for h in run.history if "dp" in h]
    assert clips[0] == pytest.approx(1e-4) and clips[-1] > clips[0]  # every update was clipped: C grows
    p = run.metrics["privacy"]
    assert p["update_noise_multiplier"] > p["noise_multiplier"]  # part of sigma pays for the count
    assert p["epsilon"] == pytest.approx(epsilon_for(1.0, 1.0, 3, 1e-4), rel=1e-9)


def test_local_dp_in_the_loop(tiny_synthetic, split) -> None:
    views = []
    run = run_federated(
        cfg("grouping.method=oblivious", "train.selection=last", "privacy.mechanism=local", "privacy.noise_multiplier=0.05", "privacy.clip=0.5"),
        tiny_synthetic, split, progress=False, callbacks=[views.append],
    )
    p = run.metrics["privacy"]
    assert p["sample_rate"] == 1.0 and "replace" in p["relation"]
    assert p["epsilon"] == pytest.approx(epsilon_for(0.05, 1.0, 3, 1e-4), rel=1e-9)
    server = next(v for v in views if v.observer == "server")
    shares = server.received["noise_shares"]
    assert server.received["upload_format"] == "dense" and shares.std == pytest.approx(2 * 0.5 * 0.05)
