"""The teacher: each group's preference for every item (GFMFR).

After the fusion module is trained, the server scores every item for every group
with that group's averaged output layer ``w2_g, b2_g`` (the last layer of the
clients' prediction head, averaged over the group's members):
``q_g[i] = sigmoid(w2_g . F_g[i] + b2_g)``. Clients distil towards ``q_{g(u)}``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gfmfr_secure.errors import DataError

__all__ = ["group_preferences"]


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
