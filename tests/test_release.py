"""Release: for each user-level mechanism, who adds which DP noise to a released vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.privacy.plan import UserLevelDP
from gfmfr_secure.privacy.release import NoiseShares, Release, ReleaseLayout, central_noise
from gfmfr_secure.rng import SecretSource

LAYOUT = ReleaseLayout(2, 5, 3, 4, 0.5)
CLIENTS = np.arange(10, dtype=np.int64)


def _release(mechanism: str, kind: str = "dp") -> Release:
    cfg = with_overrides(config_from_dict({"method": "fedrap"}), ["distill.enabled=false", f"privacy.mechanism={mechanism}", "privacy.noise_multiplier=1", "privacy.clip=1"])
    dp = UserLevelDP.from_config(cfg.privacy, sample_rate=1.0, rounds=3, expected_clients=CLIENTS.size)
    return Release(dp, LAYOUT, 2, kind=kind)


@pytest.mark.parametrize(("mechanism", "central", "shares"), [("central", True, False), ("distributed", False, True), ("local", False, True)])
def test_the_release_says_who_adds_the_noise(mechanism: str, central: bool, shares: bool) -> None:
    source = SecretSource("reproducible", 0)
    rel = _release(mechanism)
    drawn = rel.central(source)
    assert tuple(drawn.shape) == LAYOUT.shape and bool(drawn.abs().sum() > 0) == central
    got = rel.shares(source, CLIENTS, CLIENTS.size)
    assert (got is not None) == shares
    if got is not None:
        assert isinstance(got, NoiseShares) and got.std == pytest.approx(rel.dp.share_std(CLIENTS.size)) and got.std > 0
        assert got.key == source.key("dp-share", 2)


def test_the_keys_are_the_kind_of_the_released_vector() -> None:
    """A round's sums and its count phase draw from different keys; the central draw is central_noise under {kind}-central."""
    source = SecretSource("reproducible", 0)
    sums, counts = _release("central"), _release("central", kind="dp-count")
    assert torch.equal(sums.central(source), central_noise(LAYOUT, sums.dp.central_std(), source.key("dp-central", 2)))
    assert not torch.equal(sums.central(source), counts.central(source))
    assert _release("distributed", kind="dp-count").shares(source, CLIENTS, CLIENTS.size).key == source.key("dp-count-share", 2)


def test_single_block_shares_land_in_the_groups_the_server_chose() -> None:
    """Local or distributed DP with server-side grouping: each client's one-block share is added to its group's block."""
    layout = ReleaseLayout(1, 5, 3, 4, 0.5)
    shares = NoiseShares(SecretSource("reproducible", 0).key("dp-share", 1), 1, CLIENTS, 0.7, layout)
    groups = np.array([0, 2, 1, 2, -1, 0, 0, 1, 2, 2], dtype=np.int64)
    got = shares.sum_by_group(groups, 3)
    assert tuple(got.shape) == (3, layout.block_size)
    for g in range(3):
        expected = sum(shares.client(i).double()[0] for i in np.flatnonzero(groups == g))
        torch.testing.assert_close(got[g].double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(shares.sum_by_group(None), sum(shares.client(i) for i in range(CLIENTS.size)).float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="single-block"):
        NoiseShares(shares.key, 1, CLIENTS, 0.7, LAYOUT).sum_by_group(groups, 3)


def test_local_dp_with_the_papers_server_grouping_trains(tiny_synthetic) -> None:
    """It failed with an IndexError: the shares' sum had one block while the server formed G groups."""
    from gfmfr_secure.data.split import leave_one_out
    from gfmfr_secure.simulation.loop import run_federated

    cfg = with_overrides(config_from_dict({"method": "gfmfr"}), [
        "grouping.method=spectral", "grouping.num_groups=3", "privacy.mechanism=local", "privacy.noise_multiplier=1", "privacy.clip=0.1",
        "train.rounds=2", "model.latent_dim=8", "fusion.server_epochs=1", "secrets=reproducible",
    ])
    run = run_federated(cfg, tiny_synthetic, leave_one_out(tiny_synthetic), progress=False)
    assert len(run.history[-1]["group_sizes"]) == 3
