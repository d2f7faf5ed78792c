"""Clipping and Gaussian noise: norm bounds, identity when off, realised noise std."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.errors import ConfigError, DataError
from gfmfr_secure.privacy.mechanisms import (
    add_central_noise,
    clip_updates,
    clip_updates_per_tensor,
    distributed_noise_std,
    gaussian_noise_like,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bound(clip: float) -> float:
    return clip + 1e-6 * max(1.0, clip)


# --------------------------------------------------------------------------- clipping


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=8),
    p=st.integers(min_value=1, max_value=32),
    clip=st.floats(min_value=1e-3, max_value=1e3),
    scale=st.floats(min_value=1e-4, max_value=1e4),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_clipped_norms_never_exceed_clip_and_short_rows_unchanged(n, p, clip, scale, seed):
    updates = torch.randn(n, p, generator=gen(seed)) * scale
    clipped, norms = clip_updates(updates, clip)
    assert clipped.shape == updates.shape and norms.shape == (n,)
    assert torch.allclose(norms, torch.linalg.vector_norm(updates, dim=1))
    after = torch.linalg.vector_norm(clipped, dim=1)
    assert bool((after <= _bound(clip)).all())
    short = norms <= clip
    assert torch.equal(clipped[short], updates[short])
    # long rows keep their direction and land on the sphere of radius clip
    long = ~short
    if bool(long.any()):
        assert torch.allclose(after[long], torch.full_like(after[long], clip), rtol=1e-5)
        cos = torch.nn.functional.cosine_similarity(clipped[long], updates[long], dim=1)
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=16), min_size=1, max_size=5),
    clip=st.floats(min_value=1e-2, max_value=1e2),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_per_tensor_clipping_bounds_the_whole_row(sizes, clip, seed):
    g = gen(seed)
    parts = [torch.randn(4, s, generator=g) * 10 for s in sizes]
    clipped, norms = clip_updates_per_tensor(parts, clip)
    assert norms.shape == (4, len(sizes))
    per_part = clip / math.sqrt(len(sizes))
    for c in clipped:
        assert bool((torch.linalg.vector_norm(c, dim=1) <= _bound(per_part)).all())
    whole = torch.linalg.vector_norm(torch.cat(clipped, dim=1), dim=1)
    assert bool((whole <= _bound(clip)).all())


def test_clipping_validation_and_nan():
    with pytest.raises(ConfigError, match="clip"):
        clip_updates(torch.ones(2, 3), 0.0)
    with pytest.raises(ConfigError, match="updates must be 2-D"):
        clip_updates(torch.ones(3), 1.0)
    with pytest.raises(DataError, match=r"rows \[1\]"):
        clip_updates(torch.tensor([[1.0, 2.0], [math.nan, 0.0]]), 1.0)
    with pytest.raises(ConfigError, match="parts"):
        clip_updates_per_tensor([], 1.0)
    with pytest.raises(ConfigError, match="same n"):
        clip_updates_per_tensor([torch.ones(2, 3), torch.ones(3, 3)], 1.0)


def test_zero_rows_stay_zero():
    clipped, norms = clip_updates(torch.zeros(3, 5), 1.0)
    assert torch.equal(clipped, torch.zeros(3, 5)) and torch.equal(norms, torch.zeros(3))


# --------------------------------------------------------------------------- noise


def test_mechanisms_are_the_identity_with_no_noise_and_no_clipping():
    updates = torch.randn(6, 10, generator=gen(1)) * 100
    clipped, _ = clip_updates(updates, math.inf)
    assert torch.equal(clipped, updates)
    parts, _ = clip_updates_per_tensor([updates[:, :4], updates[:, 4:]], math.inf)
    assert torch.equal(torch.cat(parts, dim=1), updates)
    total = clipped.sum(dim=0)
    g = gen(2)
    state = g.get_state()
    assert torch.equal(add_central_noise(total, 0.0, math.inf, g), total)
    assert torch.equal(g.get_state(), state)  # no draw consumed
    assert distributed_noise_std(0.0, math.inf, 5) == 0.0


@pytest.mark.parametrize(("sigma", "clip"), [(1.0, 1.0), (0.5, 3.0), (2.0, 0.1)])
def test_realised_central_noise_std_matches_sigma_times_clip(sigma, clip):
    n = 200_000
    total = torch.full((n,), 7.0, dtype=torch.float64)
    noise = add_central_noise(total, sigma, clip, gen(3)) - total
    expected = sigma * clip
    # standard error of the sample std of n Gaussians: expected / sqrt(2 (n - 1))
    se = expected / math.sqrt(2 * (n - 1))
    assert abs(noise.std().item() - expected) < 4 * se
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(n)


def test_noise_is_reproducible_from_the_generator_and_keeps_dtype():
    t = torch.zeros(3, 4, dtype=torch.float64)
    a = gaussian_noise_like(t, 2.0, gen(9))
    b = gaussian_noise_like(t, 2.0, gen(9))
    assert torch.equal(a, b) and a.dtype == torch.float64 and a.shape == (3, 4)
    assert not torch.equal(a, gaussian_noise_like(t, 2.0, gen(10)))
    assert torch.equal(gaussian_noise_like(t, 0.0, gen(9)), torch.zeros_like(t))


def test_noise_validation():
    with pytest.raises(ConfigError, match="std"):
        gaussian_noise_like(torch.zeros(2), -1.0, gen())
    with pytest.raises(ConfigError, match="generator"):
        gaussian_noise_like(torch.zeros(2), 1.0, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="clip=inf"):
        add_central_noise(torch.zeros(2), 1.0, math.inf, gen())
    with pytest.raises(ConfigError, match="noise_multiplier"):
        add_central_noise(torch.zeros(2), -0.1, 1.0, gen())
    with pytest.raises(ConfigError, match="n_honest_min"):
        distributed_noise_std(1.0, 1.0, 0)


@pytest.mark.parametrize("m", [1, 4, 10])
def test_distributed_shares_sum_to_the_central_noise(m):
    sigma, clip = 1.3, 0.7
    std = distributed_noise_std(sigma, clip, m)
    assert std == pytest.approx(sigma * clip / math.sqrt(m))
    n = 100_000
    g = gen(m)
    shares = [gaussian_noise_like(torch.zeros(n, dtype=torch.float64), std, g) for _ in range(m)]
    realised = torch.stack(shares).sum(dim=0).std().item()
    se = sigma * clip / math.sqrt(2 * (n - 1))
    assert abs(realised - sigma * clip) < 4 * se
