"""The teacher: each group's preference for every item (GFMFR).

After the fusion module is trained, the server scores every item for every group
with that group's averaged output layer ``w2_g, b2_g`` (the last layer of the
clients' prediction head, averaged over the group's members):
``q_g[i] = sigmoid(w2_g . F_g[i] + b2_g)``. Clients distil towards ``q_{g(u)}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gfmfr_secure.errors import DataError

__all__ = ["TEACHER_CHUNK_ITEMS", "fused_preferences", "group_preferences"]

#: Items fused at once for the teacher: its transient memory is ``G x chunk x width``, not
#: ``G x I x width`` (ML-100K's 1,682 items are one chunk).
TEACHER_CHUNK_ITEMS = 8192


def group_preferences(fused: Tensor, out_weight: Tensor, out_bias: Tensor) -> Tensor:
    """Group preference of every item: ``q = sigmoid(fused @ w + b)``.

    Parameters
    ----------
    fused : Tensor, shape [G, I, d]
        Fused item representations per group (``GroupFusion.forward_all()``).
    out_weight : Tensor, shape [G, d]
        Each group's averaged output-layer weight.
    out_bias : Tensor, shape [G]
        Each group's averaged output-layer bias.

    Returns
    -------
    Tensor, shape [G, I]
        ``q[g, i] = sigmoid(sum_k fused[g, i, k] * out_weight[g, k] + out_bias[g])``
        in ``(0, 1)``, in the common floating dtype of the inputs.

    Raises
    ------
    DataError
        Shapes that disagree, or NaN/inf in any input.
    """
    for name, t in (("fused", fused), ("out_weight", out_weight), ("out_bias", out_bias)):
        if not isinstance(t, Tensor):
            raise DataError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise DataError(f"{name} must have a floating dtype, got {t.dtype}")
    if fused.ndim != 3:
        raise DataError(f"fused must have shape [G, I, d], got {list(fused.shape)}")
    n_groups, _, dim = fused.shape
    if tuple(out_weight.shape) != (n_groups, dim):
        raise DataError(
            f"out_weight must have shape [G, d] = [{n_groups}, {dim}] to match fused "
            f"{list(fused.shape)}, got {list(out_weight.shape)}"
        )
    if tuple(out_bias.shape) != (n_groups,):
        raise DataError(f"out_bias must have shape [G] = [{n_groups}], got {list(out_bias.shape)}")
    for name, t in (("fused", fused), ("out_weight", out_weight), ("out_bias", out_bias)):
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{name} contains NaN/inf entries")
    logits = torch.einsum("gid,gd->gi", fused, out_weight) + out_bias[:, None]
    return torch.sigmoid(logits)


@torch.no_grad()
def fused_preferences(fusion: Any, out_weight: Tensor, out_bias: Tensor, chunk_items: int = TEACHER_CHUNK_ITEMS) -> Tensor:
    """:func:`group_preferences` of ``fusion.forward_all()``, computed ``chunk_items`` items at a time.

    Parameters
    ----------
    fusion : a :class:`~gfmfr_secure.server.fusion.GroupFusion` (``G`` groups, ``I`` items).
    out_weight : Tensor, shape [G, d]; out_bias : Tensor, shape [G].
    chunk_items : items per chunk (>= 1); with ``I <= chunk_items`` this is exactly
        ``group_preferences(fusion.forward_all(), out_weight, out_bias)``.

    Returns
    -------
    Tensor, shape [G, I].
    """
    if chunk_items < 1:
        raise DataError(f"chunk_items must be >= 1, got {chunk_items}")
    n_items = int(fusion.n_items)
    if n_items <= chunk_items:
        return group_preferences(fusion.forward_all(), out_weight, out_bias)
    out = torch.empty(int(fusion.n_groups), n_items, dtype=out_weight.dtype)
    for start in range(0, n_items, chunk_items):
        items = torch.arange(start, min(start + chunk_items, n_items))
        out[:, start : start + items.numel()] = group_preferences(fusion.forward_grid(None, items), out_weight, out_bias)
    return out
