"""The server's work in one round, from aggregates only.

Input is an :class:`~gfmfr_secure.types.AggregateResult` (and, for the paper's
server-side grouping under ``plain``, the per-client features that backend exposes);
the client state store is never an argument here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from gfmfr_secure.models.params import SharedParams, unflatten_heads
from gfmfr_secure.server.fusion import GroupFusion
from gfmfr_secure.server.fusion_training import train_fusion
from gfmfr_secure.server.teacher import fused_preferences
from gfmfr_secure.types import AggregateResult

__all__ = ["ServerState", "apply_fedavg_", "group_targets", "update_teacher_"]


@dataclass
class ServerState:
    """What the server keeps between rounds.

    Attributes
    ----------
    shared : global shared parameters.
    fusion : the group fusion module (None when distillation is off).
    teacher : [G, I] group preference scores broadcast to clients (None before the first round).
    assignment : int64 [U] group the server placed each client in (server-side grouping; -1 = none).
    n_groups : G.
    """

    shared: SharedParams
    fusion: GroupFusion | None
    teacher: torch.Tensor | None
    assignment: np.ndarray
    n_groups: int


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the previous setting.

    Fusion training is thousands of small steps. With passive OpenMP waiting, a second
    thread costs more in wake-ups than it saves. On the 2-core machine a round's eager
    fusion takes about 3 s on one thread and about 13 s on two (compiled: 1.65 s and
    11 s). The Numba loop for ``moe`` keeps its BLAS on one thread too.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def apply_fedavg_(shared: SharedParams, agg: AggregateResult, *, items: str = "mean") -> None:
    """Apply the cohort's deltas to ``shared`` (in place).

    The head moves by the weighted mean of its deltas (FedAvg). The item table moves
    by the mean (``items="mean"``) or by the sum (``"sum"``) of the item deltas: a
    row's delta is nonzero only for the clients that touched it, so the mean shrinks
    each row's step by the cohort size, while the sum is what centralised gradient
    descent on the sum of the users' losses would take (``train.item_aggregation``).
    """
    if agg.weight_total <= 0:
        raise ValueError(f"aggregation weights sum to {agg.weight_total}; nothing to average")
    if items == "sum":  # with sample weights: the weighted mean times the cohort size
        shared.item_table.add_(agg.item_sum * (agg.n_clients / agg.weight_total))
    elif items == "mean":
        shared.item_table.add_(agg.item_sum / agg.weight_total)
    else:
        raise ValueError(f"unknown item aggregation {items!r}; known: mean, sum")
    if agg.head_sum is not None:
        shared.set_head_flat_(shared.head_flat() + agg.head_sum / agg.weight_total)


def group_targets(
    shared_before: SharedParams, agg: AggregateResult
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's averaged item table and output layer, from group sums.

    A client's trained table is ``C + delta``, so the group average is ``C`` plus the
    group's mean delta (``C`` = the table broadcast at the start of the round).

    Returns
    -------
    targets : [G, I, d] group-averaged item tables.
    out_weight : [G, h] group-averaged output-layer weights.
    out_bias : [G] group-averaged output-layer biases.
    mask : bool [G] groups with at least one member.
    """
    if agg.group_counts is None or agg.group_item_sum is None:
        raise ValueError("group-wise targets need group sums from the aggregation backend")
    counts = agg.group_counts
    mask = counts > 0
    denom = counts.clamp(min=1).view(-1, 1, 1)
    targets = shared_before.item_table.unsqueeze(0) + agg.group_item_sum / denom
    w2 = shared_before.w2.expand(counts.numel(), -1).clone()
    b2 = shared_before.b2.expand(counts.numel()).clone()
    if agg.group_head_sum is not None:
        head_mean = agg.group_head_sum / counts.clamp(min=1).unsqueeze(1)
        _, _, _, w2_delta, b2_delta = unflatten_heads(head_mean, shared_before.latent_dim)
        w2 = w2 + w2_delta
        b2 = b2 + b2_delta
    return targets, w2, b2, mask


def update_teacher_(
    state: ServerState,
    shared_before: SharedParams,
    agg: AggregateResult,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    optimizer: str,
    generator: torch.Generator,
    compiled: bool = False,
) -> list[float]:
    """Train the fusion module on the group targets and refresh the teacher's preferences.

    Groups without members this round keep their previous preference row (or 0.5
    before they ever had members).
    """
    if state.fusion is None:
        raise ValueError("the server has no fusion module (distillation is off)")
    targets, w2, b2, mask = group_targets(shared_before, agg)
    with _single_thread():
        losses = train_fusion(
            state.fusion,
            targets,
            group_mask=mask,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            optimizer=optimizer,
            generator=generator,
            compiled=compiled,
        )
    q = fused_preferences(state.fusion, w2, b2)  # in item chunks: no [G, I, width] intermediates at scale
    if state.teacher is None:
        state.teacher = torch.full_like(q, 0.5)
    state.teacher[mask] = q[mask]
    return losses
