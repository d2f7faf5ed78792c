"""Tests for the teacher's group preferences (gfmfr_secure.server.teacher)."""

from __future__ import annotations

import math

import pytest
import torch

from gfmfr_secure.errors import DataError
from gfmfr_secure.server.fusion import GroupFusion
from gfmfr_secure.server.teacher import group_preferences


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_group_preferences_golden():
    fused = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]],
            [[1.0, 1.0], [2.0, -1.0], [0.0, 0.0]],
        ],
        dtype=torch.float64,
    )  # [G=2, I=3, d=2]
    weight = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # group 0: 1*1 + 0*2 + 0 = 1;  0*1 + 1*2 = 2;  2 + 4 = 6
    # group 1: 0.5 - 1 + 1 = 0.5;  1 + 1 + 1 = 3;  0 + 1 = 1
    expected = torch.tensor(
        [[sigmoid(1.0), sigmoid(2.0), sigmoid(6.0)], [sigmoid(0.5), sigmoid(3.0), sigmoid(1.0)]],
        dtype=torch.float64,
    )
    q = group_preferences(fused, weight, bias)
    assert q.shape == (2, 3)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-15)


def test_group_preferences_from_fusion_module():
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(9, 4, generator=gen)
    module = GroupFusion.from_features(
        3, 8, text=text, image=None, embedding_dim=6, operator="moe", generator=gen
    )
    with torch.no_grad():
        fused = module.forward_all()
    weight, bias = torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen)
    q = group_preferences(fused, weight, bias)
    assert q.shape == (3, 9)
    assert bool(((q > 0) & (q < 1)).all())
    # each group is scored with its own output layer
    manual = torch.sigmoid(fused[1] @ weight[1] + bias[1])
    torch.testing.assert_close(q[1], manual)


def test_group_preferences_shape_errors():
    fused = torch.zeros(2, 3, 4)
    with pytest.raises(DataError, match=r"out_weight must have shape \[G, d\] = \[2, 4\]"):
        group_preferences(fused, torch.zeros(2, 5), torch.zeros(2))
    with pytest.raises(DataError, match=r"out_weight must have shape \[G, d\]"):
        group_preferences(fused, torch.zeros(2, 1, 4), torch.zeros(2))
    with pytest.raises(DataError, match=r"out_bias must have shape \[G\] = \[2\]"):
        group_preferences(fused, torch.zeros(2, 4), torch.zeros(2, 1))
    with pytest.raises(DataError, match=r"fused must have shape \[G, I, d\]"):
        group_preferences(torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(DataError, match="floating dtype"):
        group_preferences(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2))


def test_group_preferences_non_finite_errors():
    fused = torch.zeros(2, 3, 4)
    bad = torch.zeros(2, 4)
    bad[1, 0] = float("inf")
    with pytest.raises(DataError, match="out_weight contains NaN/inf"):
        group_preferences(fused, bad, torch.zeros(2))
    fused[0, 1, 2] = float("nan")
    with pytest.raises(DataError, match="fused contains NaN/inf"):
        group_preferences(fused, torch.zeros(2, 4), torch.zeros(2))
