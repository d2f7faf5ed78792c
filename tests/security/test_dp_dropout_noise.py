"""Distributed DP under masking dropouts: the released sum must carry at least sigma * Delta of noise.

Each client adds a noise share to its masked upload; a client that drops out after
masking is recovered by the protocol, but its share never reaches the sum. The
shares are sized for the fewest survivors the backend releases a sum of
(``MaskingAggregator.min_reporting``), and a round with fewer survivors is refused.

The test measures the noise of the released sum over many rounds at dropout 0.3
(all updates zero, so the release is noise only) and bounds its standard deviation
with a one-sided chi-square interval. Shares sized for the whole cohort (the earlier
rule) fail the same test.
"""

from __future__ import annotations

import dataclasses
import math
import secrets

import numpy as np
import pytest
import torch
from scipy import stats

from gfmfr_secure.aggregation import get_aggregator
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy.plan import UserLevelDP
from gfmfr_secure.privacy.release import NoiseShares, ReleaseLayout, ReleaseNoise
from gfmfr_secure.secagg.masking import SecAggError
from gfmfr_secure.types import CohortUpdate

N_CLIENTS, N_ITEMS, DIM, TRIALS = 20, 2000, 2, 12
CONFIDENCE = 0.999


def _setup():
    cfg = with_overrides(
        config_from_dict({"method": "gfmfr"}),
        ["privacy.mechanism=distributed", "privacy.noise_multiplier=1.0", "privacy.clip=1.0", "aggregation.backend=masking",
         "aggregation.dropout=0.3", "aggregation.neighbours=0", "grouping.method=oblivious"],
    )
    dp = UserLevelDP.from_config(cfg.privacy, sample_rate=1.0, rounds=10, expected_clients=N_CLIENTS)
    backend = get_aggregator("masking", settings=cfg.aggregation, seed=3)
    update = CohortUpdate(
        clients=np.arange(N_CLIENTS, dtype=np.int64),
        n_samples=np.ones(N_CLIENTS, dtype=np.int64),
        row_ptr=np.zeros(N_CLIENTS + 1, dtype=np.int64),
        row_items=np.zeros(0, dtype=np.int64),
        item_delta=torch.zeros(0, DIM),
        head_delta=None,
        head_after=None,
        group=np.zeros(N_CLIENTS, dtype=np.int64),
        loss=np.zeros(N_CLIENTS),
    )
    return dp, backend, update


def _released_noise(share_std_for) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Run TRIALS masked rounds; return the released noise [T, I*d], survivors per round, refused rounds, target std."""
    dp, backend, update = _setup()
    layout = ReleaseLayout(1, N_ITEMS, DIM, 0, dp.count_value)
    target = dp.noise_multiplier * dp.sensitivity
    noise, survivors, refused = [], [], 0
    for t in range(TRIALS):
        std = share_std_for(dp, backend)
        shares = NoiseShares(secrets.token_bytes(32), t, update.clients, std, layout)
        release = ReleaseNoise(layout, torch.zeros(layout.shape), shares)
        try:
            agg = backend.aggregate(update, n_items=N_ITEMS, weights=np.ones(N_CLIENTS), groups=np.zeros(N_CLIENTS, dtype=np.int64), n_groups=1, noise=release)
        except (ConfigError, SecAggError) as exc:  # too few survivors: the round fails, nothing is released
            assert "survived" in str(exc) or "fewer than the threshold" in str(exc)
            backend.rounds_done += 1  # the refused round releases nothing; the next one draws new dropouts
            refused += 1
            continue
        noise.append(agg.item_sum.double().numpy().reshape(-1))
        survivors.append(agg.n_clients)
    return np.array(noise), np.array(survivors, dtype=np.float64), refused, target


def _std_interval(x: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
    """Pooled std of zero-mean noise and its one-sided CONFIDENCE bounds (chi-square, Satterthwaite dof).

    Rounds differ in variance (in proportion to their survivors): the pooled sum of
    squares is a weighted chi-square, approximated by a scaled chi-square with
    ``k = D (sum w)^2 / sum w^2`` degrees of freedom.
    """
    per_round = x.shape[1]
    ss = float(np.sum(x**2))
    n = x.size
    k = per_round * weights.sum() ** 2 / np.sum(weights**2)
    var = ss / n
    lo = var * k / stats.chi2.ppf(CONFIDENCE, k)
    hi = var * k / stats.chi2.ppf(1 - CONFIDENCE, k)
    return math.sqrt(var), math.sqrt(lo), math.sqrt(hi)


def test_released_noise_at_dropout_0_3_is_at_least_sigma_delta() -> None:
    noise, survivors, refused, target = _released_noise(lambda dp, backend: dp.share_std(N_CLIENTS, backend.min_reporting(N_CLIENTS)))
    assert len(noise) >= TRIALS // 2 and survivors.min() >= math.ceil(0.6 * N_CLIENTS)
    std, lower, _ = _std_interval(noise, survivors)
    assert lower >= target, f"released noise std {std:.4f} (lower bound {lower:.4f}) < sigma*Delta {target:.4f}"
    # and it is what the sizing predicts: sigma*Delta * sqrt(mean survivors / min_reporting)
    assert std / target == pytest.approx(math.sqrt(survivors.mean() / math.ceil(0.6 * N_CLIENTS)), rel=0.03)


def test_shares_sized_for_the_whole_cohort_fall_short() -> None:
    """The earlier rule: any ceil(h * n) shares, as if nobody dropped. The same test detects the shortfall."""
    noise, survivors, refused, target = _released_noise(lambda dp, backend: dp.share_std(N_CLIENTS))
    std, _, upper = _std_interval(noise, survivors)
    assert upper < target  # about 0.84 sigma*Delta at 70 % survivors
    assert std / target == pytest.approx(math.sqrt(survivors.mean() / N_CLIENTS), rel=0.03)


def test_shares_account_for_dishonest_survivors() -> None:
    dp, backend, _ = _setup()
    dp = dataclasses.replace(dp, honest_fraction=0.9)
    n, r = 20, backend.min_reporting(20)
    assert r == 12
    assert dp.honest_reporting(n, r) == r - (n - 18)  # every dishonest client may be among the survivors
    base = dp.noise_multiplier * dp.sensitivity
    assert dp.share_std(n, r) == pytest.approx(base / math.sqrt(10))
    with pytest.raises(ConfigError, match="no honest noise share is guaranteed"):
        dataclasses.replace(dp, honest_fraction=0.3).share_std(n, r)
