"""Local DP: the noise each client adds must cover the worst pair of neighbouring uploads.

Replacing a user's data can move its whole group-indexed upload from block g to block g':
``[u ; kappa]`` leaves g and ``[u' ; kappa]`` enters g', an L2 change of
``C sqrt(2 (1 + count_scale^2))``, more than the ``2C`` the noise used to assume once
``count_scale > 1``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gfmfr_secure.aggregation.layout import dense_uploads
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.privacy.mechanisms import clip_sparse_updates
from gfmfr_secure.privacy.plan import UserLevelDP
from gfmfr_secure.privacy.release import ReleaseLayout
from gfmfr_secure.types import CohortUpdate

I, D, H, G, C = 30, 4, 6, 3, 1.0


def _plan(count_scale: float, n_blocks: int = G) -> UserLevelDP:
    cfg = with_overrides(config_from_dict({"method": "gfmfr"}), [
        "privacy.mechanism=local", "privacy.noise_multiplier=1.5", f"privacy.clip={C}", f"privacy.count_scale={count_scale}",
    ])
    return UserLevelDP.from_config(cfg.privacy, sample_rate=1.0, rounds=5, expected_clients=10, n_blocks=n_blocks)


def _upload(rows: np.ndarray, values: np.ndarray, head: np.ndarray, group: int, dp: UserLevelDP) -> np.ndarray:
    """One client's clipped dense upload [G * block]."""
    item, head_t, _ = clip_sparse_updates(torch.zeros(len(rows), dtype=torch.int64), torch.from_numpy(values), torch.from_numpy(head[None]), 1, C)
    update = CohortUpdate(
        clients=np.array([0]), n_samples=np.array([1]), row_ptr=np.array([0, len(rows)]), row_items=rows.astype(np.int64),
        item_delta=item, head_delta=head_t, head_after=None, group=np.array([group]), loss=np.zeros(1),
    )
    layout = ReleaseLayout(G, I, D, H, dp.count_value)
    return dense_uploads(update, layout, np.array([group]))[0].astype(np.float64)


@pytest.mark.parametrize("count_scale", [0.5, 2.0, 4.0])
def test_worst_case_neighbouring_uploads_are_covered(count_scale: float) -> None:
    dp = _plan(count_scale)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(50):
        rows_a, rows_b = rng.choice(I, 5, replace=False), rng.choice(I, 5, replace=False)
        va, vb = rng.normal(size=(5, D)).astype(np.float32) * 10, rng.normal(size=(5, D)).astype(np.float32) * 10
        ha, hb = rng.normal(size=H).astype(np.float32) * 10, rng.normal(size=H).astype(np.float32) * 10
        ga, gb = rng.integers(0, G, 2)
        a = _upload(rows_a, va, ha, int(ga), dp)
        b = _upload(rows_b, vb, hb, int(gb), dp)
        worst = max(worst, float(np.linalg.norm(a - b)))
        # the same data and its negation, in one block: 2C
        worst = max(worst, float(np.linalg.norm(a - _upload(rows_a, -va, -ha, int(ga), dp))))
    bound = C * max(2.0, math.sqrt(2.0 * (1.0 + count_scale**2)))
    assert worst <= dp.local_sensitivity * (1 + 1e-5)
    assert dp.local_sensitivity == pytest.approx(bound)
    assert worst == pytest.approx(bound, rel=0.02)  # the bound is reached by moving between blocks
    assert dp.share_std(10) == pytest.approx(dp.noise_multiplier * dp.local_sensitivity)
    if count_scale > 1:
        assert worst > 2.0 * C * 1.05  # the noise the plan used to size (2 C sigma) did not cover this pair


def test_one_block_keeps_2c() -> None:
    assert _plan(4.0, n_blocks=1).local_sensitivity == pytest.approx(2 * C)
