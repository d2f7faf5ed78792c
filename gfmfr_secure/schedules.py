"""Per-round schedules as pure functions ``f(round) -> value``.

Nothing here is compounded in place: the value for round ``t`` depends only on
``t`` and the configured constants, so a resumed or re-ordered run sees the same
values (the authors' code multiplies alpha/beta in place and collapses them to
zero after round 0; FedRAP intends an increasing weight, which is what this is).
"""

from __future__ import annotations

import math

__all__ = ["distill_weight", "fedrap_weight", "item_lr", "network_lr"]


def network_lr(round_idx: int, base_lr: float, decay: float) -> float:
    """Learning rate of the dense network parameters in round ``round_idx``: ``base_lr * decay**t``."""
    _check_round(round_idx)
    return base_lr * decay**round_idx


def item_lr(round_idx: int, base_lr: float, scale: float, n_items: int, decay: float) -> float:
    """Item-table learning rate: ``base_lr * s * decay**t`` with ``s = scale`` or ``n_items`` when ``scale == 0``.

    The authors scale the item tables' learning rate by the item count because the
    batch-mean loss gives each embedding row a gradient of order ``1 / batch``.
    """
    _check_round(round_idx)
    s = float(n_items) if scale == 0 else scale
    return base_lr * s * decay**round_idx


def fedrap_weight(round_idx: int, base: float, tau: float = 10.0) -> float:
    """FedRAP's increasing regulariser weight ``base * tanh(t / tau)`` (0 at round 0)."""
    _check_round(round_idx)
    return base * math.tanh(round_idx / tau)


def distill_weight(round_idx: int, total_rounds: int, schedule: str = "cosine") -> float:
    """Weight of GFMFR's distillation term: ``cos(pi t / (2 T))`` (cosine) or 1 (constant)."""
    _check_round(round_idx)
    if total_rounds < 1:
        raise ValueError(f"total_rounds must be >= 1, got {total_rounds}")
    if schedule == "cosine":
        return math.cos(math.pi * round_idx / (2.0 * total_rounds))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown distillation schedule {schedule!r}; known: cosine, constant")


def _check_round(round_idx: int) -> None:
    if round_idx < 0:
        raise ValueError(f"round index must be >= 0, got {round_idx}")
