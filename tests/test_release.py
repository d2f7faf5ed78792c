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
