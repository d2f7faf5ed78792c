"""Adaptive clipping: the released clipped-count must have the sensitivity the sigma split assumes (1/2).

Andrew et al. (2021) release ``sum_i (b_i - 1/2) + N(0, sigma_b^2)``: one client moves it by
exactly 1/2, so the update sum (multiplier z_Delta) and the count together are one Gaussian
mechanism with multiplier ``(z_Delta^-2 + (2 sigma_b)^-2)^-1/2 = z``, the accounted one. The
unshifted count ``sum_i b_i`` moves by 1: the same noise then only gives
``(z_Delta^-2 + sigma_b^-2)^-1/2 < z``, and a larger epsilon than the one reported.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gfmfr_secure.privacy.accounting import epsilon_for
from gfmfr_secure.privacy.mechanisms import clipped_count_query, noisy_unclipped_fraction, split_noise_multiplier


def _measured_sensitivity(query, trials: int = 200, seed: int = 0) -> float:
    """max |query(D + u) - query(D)| over random datasets and added users (clipped or not)."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(trials):
        norms = torch.from_numpy(rng.exponential(1.0, rng.integers(0, 30)))
        clip = float(rng.uniform(0.2, 3.0))
        for extra in (clip / 2, clip * 2):  # the added user is unclipped, or clipped
            neighbour = torch.cat([norms, torch.tensor([extra], dtype=norms.dtype)])
            worst = max(worst, abs(query(neighbour, clip) - query(norms, clip)))
    return worst


def test_released_count_has_sensitivity_one_half() -> None:
    assert _measured_sensitivity(clipped_count_query) == pytest.approx(0.5)
    # the unshifted count the loop used to release: sensitivity 1 (so the check is not vacuous)
    assert _measured_sensitivity(lambda n, c: float((n <= c).sum())) == pytest.approx(1.0)


@pytest.mark.parametrize(("z", "expected_clients"), [(0.8, 20.0), (1.2, 100.0)])
def test_accounted_multiplier_holds_for_the_released_pair(z: float, expected_clients: float) -> None:
    sigma_b = expected_clients / 20.0
    z_update = split_noise_multiplier(z, sigma_b, expected_clients)
    sens = _measured_sensitivity(clipped_count_query)
    effective = (z_update**-2 + (sens / sigma_b) ** 2) ** -0.5
    assert effective == pytest.approx(z, rel=1e-9)
    # with the unshifted count the real multiplier is smaller and epsilon larger than claimed
    unshifted = (z_update**-2 + (1.0 / sigma_b) ** 2) ** -0.5
    q, rounds, delta = expected_clients / 943, 100, 1e-5
    claimed, actual_unshifted = epsilon_for(z, q, rounds, delta, "rdp"), epsilon_for(unshifted, q, rounds, delta, "rdp")
    assert actual_unshifted > 1.01 * claimed


def test_noisy_fraction_is_post_processing_of_the_centred_count() -> None:
    norms = torch.tensor([0.1, 0.2, 5.0, 6.0])
    assert clipped_count_query(norms, 1.0) == pytest.approx(0.0)
    assert noisy_unclipped_fraction(norms, 1.0, 0.0, 4.0) == pytest.approx(0.5)
    assert noisy_unclipped_fraction(norms, 10.0, 0.0, 4.0) == pytest.approx(1.0)
    assert noisy_unclipped_fraction(norms, 10.0, 2.0, 4.0) == pytest.approx(1.5)
    assert math.isfinite(noisy_unclipped_fraction(torch.zeros(0), 1.0, 0.3, 0.0))
