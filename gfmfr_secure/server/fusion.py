"""The group fusion module trained on the server each round (GFMFR).

For every (group, item) pair the module fuses ``k`` vectors of size ``d``:

- the group token: a learnable group embedding ``[G, E]`` projected ``E -> d``;
- one token per item modality: the item's text features ``[I, Dt]`` projected
  ``Dt -> d`` and/or its image features ``[I, Dv]`` projected ``Dv -> d``; with no
  modality at all, a learnable item-ID embedding ``[I, E]`` projected ``E -> d``
  takes their place (an ID-only server model), so the output still depends on
  the item.

So ``k = 3`` with text and image, and ``k = 2`` otherwise. The fusion operators
(:data:`FUSION_OPERATORS`) are written for any ``k >= 2``.

It is trained (:func:`train_fusion`) to regress each group's averaged shared
item table (``[G, I, d]``, MSE over all group x item pairs). Two paths compute
the same function:

- :meth:`GroupFusion.forward` for explicit ``(group, item)`` pairs;
- :meth:`GroupFusion.forward_grid` / :meth:`GroupFusion.forward_all` for the
  Cartesian product of groups and items. Every item's projections are computed
  once and shared by all groups, and each operator exploits the structure of the
  grid (additively separable operators such as ``sum`` and ``gate`` never touch
  a per-pair tensor before the final broadcast add). Training uses this path.

Item features are set with :meth:`GroupFusion.set_item_features` (or built in
with :meth:`GroupFusion.from_features`). They are non-persistent buffers: they
move with ``.to(...)`` but are not part of ``state_dict()``, which therefore
holds exactly the learned parameters that the server releases.

Initialisation draws only from the ``generator`` given to the constructor and
leaves the global torch RNG untouched: linear weights xavier-normal, biases
zero, embeddings normal with the xavier standard deviation
``sqrt(2 / (rows + cols))`` (the authors apply xavier-normal to embeddings too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gfmfr_secure.errors import ConfigError, DataError

__all__ = [
    "FUSION_OPERATORS",
    "OPTIMIZERS",
    "AttentionFusion",
    "FusionOperator",
    "GateFusion",
    "GroupFusion",
    "MLPFusion",
    "MoEFusion",
    "OperatorOptions",
    "PlainSGD",
    "SumFusion",
    "get_fusion_operator",
    "register_fusion_operator",
    "train_fusion",
]


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """An ``nn.Linear`` built without drawing from the global RNG (initialised later)."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features)


# --------------------------------------------------------------------------- operators


@dataclass(frozen=True)
class OperatorOptions:
    """Hyper-parameters of the operators that have any.

    Attributes
    ----------
    attention_heads : int
        Heads of :class:`AttentionFusion`; must divide ``d``. (The authors' module
        ends up with one head over a ``3d``-wide concatenation; ours attends over
        ``d``-wide tokens, where several heads are the usual choice.)
    router_hidden : int or None
        Hidden width of the :class:`MoEFusion` router; None means ``d`` (as the
        authors).
    """

    attention_heads: int = 4
    router_hidden: int | None = None


class FusionOperator(nn.Module):
    """Fuses ``k`` vectors of size ``d`` into one.

    Subclasses implement :meth:`forward`; they may override
    :meth:`separable_grid` (operators that are a sum of a row-only and a
    column-only term) or :meth:`forward_grid` (to share per-token work across the
    grid).
    """

    def __init__(self, n_inputs: int, dim: int) -> None:
        super().__init__()
        if n_inputs < 2:
            raise ConfigError(f"a fusion operator needs n_inputs >= 2, got {n_inputs}")
        if dim < 1:
            raise ConfigError(f"fusion dim must be >= 1, got {dim}")
        self.n_inputs = n_inputs
        self.dim = dim

    def forward(self, tokens: Sequence[Tensor]) -> Tensor:
        """Fuse per-pair tokens.

        Parameters
        ----------
        tokens : sequence of k tensors, each [B, d]

        Returns
        -------
        Tensor, shape [B, d]
        """
        raise NotImplementedError

    def separable_grid(
        self, rows: Sequence[Tensor], cols: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor] | None:
        """``(r [R, d], c [C, d])`` with ``out[i, j] = r[i] + c[j]``, or None if not separable."""
        return None

    def forward_grid(self, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> Tensor:
        """Fuse every (row, column) combination.

        The token list of pair ``(i, j)`` is ``[rows[0][i], ..., cols[0][j], ...]``.

        Parameters
        ----------
        rows : sequence of a tensors, each [R, d]
            Tokens that depend on the row only (the group).
        cols : sequence of b tensors, each [C, d]
            Tokens that depend on the column only (the item); ``a + b = k``.

        Returns
        -------
        Tensor, shape [R, C, d]
        """
        parts = self.separable_grid(rows, cols)
        if parts is not None:
            r, c = parts
            return r[:, None, :] + c[None, :, :]
        n_rows, n_cols = rows[0].shape[0], cols[0].shape[0]
        expanded = [t[:, None, :].expand(n_rows, n_cols, self.dim) for t in rows]
        expanded += [t[None, :, :].expand(n_rows, n_cols, self.dim) for t in cols]
        flat = [t.reshape(n_rows * n_cols, self.dim) for t in expanded]
        return self.forward(flat).reshape(n_rows, n_cols, self.dim)

    def grid_vjp(self, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> tuple[Tensor, GridBackward] | None:
        """:meth:`forward_grid` with a hand-derived backward, or None (use autograd).

        Returns ``(out [R, C, d], backward)`` where ``backward(dout [R, C, d])`` gives
        ``(param_grads, d_rows, d_cols)``: the gradients of ``self.parameters()`` in
        order, and of each row and column token. Inputs must not require grad; the
        training loop uses it to skip autograd's per-operation bookkeeping, which
        dominates a step on these small tensors. A test checks it against autograd.
        """
        found = self.separable_vjp(rows, cols)
        if found is None:
            return None
        (r, c), back = found

        def backward(dout: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
            return back(dout.sum(1), dout.sum(0))

        return r[:, None, :] + c[None, :, :], backward

    def separable_vjp(
        self, rows: Sequence[Tensor], cols: Sequence[Tensor]
    ) -> tuple[tuple[Tensor, Tensor], SeparableBackward] | None:
        """:meth:`separable_grid` with a hand-derived backward, or None.

        Returns ``((r [R, d], c [C, d]), backward)`` with ``out[i, j] = r[i] + c[j]``;
        ``backward(d_r [R, d], d_c [C, d])`` (the row and column sums of ``dout``) gives
        ``(param_grads, d_rows, d_cols)`` as in :meth:`grid_vjp`.
        """
        return None


GridBackward = Callable[[Tensor], tuple[list[Tensor], list[Tensor], list[Tensor]]]
SeparableBackward = Callable[[Tensor, Tensor], tuple[list[Tensor], list[Tensor], list[Tensor]]]
OperatorFactory = Callable[[int, int, OperatorOptions], FusionOperator]
_F = TypeVar("_F", bound=OperatorFactory)

FUSION_OPERATORS: dict[str, OperatorFactory] = {}


def register_fusion_operator(name: str) -> Callable[[_F], _F]:
    """Decorator registering ``factory(n_inputs, dim, options) -> FusionOperator`` under ``name``.

    Raises
    ------
    ConfigError
        ``name`` is already registered.
    """

    def decorator(factory: _F) -> _F:
        if name in FUSION_OPERATORS:
            raise ConfigError(
                f"fusion operator {name!r} is already registered ({FUSION_OPERATORS[name]!r})"
            )
        FUSION_OPERATORS[name] = factory
        return factory

    return decorator


def get_fusion_operator(name: str) -> OperatorFactory:
    """The factory registered under ``name``.

    Raises
    ------
    ConfigError
        Unknown name; the message lists the known ones.
    """
    if name not in FUSION_OPERATORS:
        raise ConfigError(
            f"unknown fusion operator {name!r}; known: {', '.join(sorted(FUSION_OPERATORS))}"
        )
    return FUSION_OPERATORS[name]


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


@register_fusion_operator("sum")
class SumFusion(FusionOperator):
    """Elementwise sum of the ``k`` tokens (no parameters)."""

    def __init__(self, n_inputs: int, dim: int, options: OperatorOptions | None = None) -> None:
        super().__init__(n_inputs, dim)

    def forward(self, tokens: Sequence[Tensor]) -> Tensor:
        """``[B, d]`` x k -> ``[B, d]``."""
        return _sum(tokens)

    def separable_grid(
        self, rows: Sequence[Tensor], cols: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor] | None:
        """Row sum ``[R, d]`` and column sum ``[C, d]``."""
        return self.separable_vjp(rows, cols)[0]

    def separable_vjp(
        self, rows: Sequence[Tensor], cols: Sequence[Tensor]
    ) -> tuple[tuple[Tensor, Tensor], SeparableBackward]:
        def backward(d_r: Tensor, d_c: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
            return [], [d_r] * len(rows), [d_c] * len(cols)

        return (_sum(rows), _sum(cols)), backward


@register_fusion_operator("mlp")
class MLPFusion(FusionOperator):
    """Concatenate, then ``Linear(k d, 2d) -> ReLU -> Linear(2d, d)``.

    On a grid the first layer splits into a row term and a column term (its
    weight acts blockwise on the concatenation), so only the ReLU and the second
    layer run per pair.
    """

    def __init__(self, n_inputs: int, dim: int, options: OperatorOptions | None = None) -> None:
        super().__init__(n_inputs, dim)
        self.fc1 = _linear(n_inputs * dim, 2 * dim)
        self.fc2 = _linear(2 * dim, dim)

    def forward(self, tokens: Sequence[Tensor]) -> Tensor:
        """``[B, d]`` x k -> ``[B, d]``."""
        return self.fc2(F.relu(self.fc1(torch.cat(list(tokens), dim=-1))))

    def forward_grid(self, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> Tensor:
        """``[R, d]`` x a, ``[C, d]`` x b -> ``[R, C, d]``."""
        return self.grid_vjp(rows, cols)[0]

    def grid_vjp(self, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> tuple[Tensor, GridBackward]:
        split = len(rows) * self.dim
        w1, w2 = self.fc1.weight, self.fc2.weight
        row_in, col_in = torch.cat(list(rows), dim=-1), torch.cat(list(cols), dim=-1)
        hidden = (F.linear(row_in, w1[:, :split], self.fc1.bias)[:, None, :] + F.linear(col_in, w1[:, split:])[None, :, :]).relu_()
        out = F.linear(hidden, w2, self.fc2.bias)  # [R, C, d]

        def backward(dout: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
            flat_h = hidden.reshape(-1, hidden.shape[-1])
            g_w2 = dout.reshape(-1, self.dim).T @ flat_h
            g_b2 = dout.sum((0, 1))
            dz = torch.ops.aten.threshold_backward(dout @ w2, hidden, 0.0)  # [R, C, 2d]
            dz_row, dz_col = dz.sum(1), dz.sum(0)
            g_w1 = torch.cat([dz_row.T @ row_in, dz_col.T @ col_in], dim=1)
            d_rows = (dz_row @ w1[:, :split]).split(self.dim, dim=-1)
            d_cols = (dz_col @ w1[:, split:]).split(self.dim, dim=-1)
            return [g_w1, dz_row.sum(0), g_w2, g_b2], list(d_rows), list(d_cols)

        return out, backward


@register_fusion_operator("gate")
class GateFusion(FusionOperator):
    """Gate each token (its own ``Linear(d, d)`` + sigmoid), concatenate, ``Linear(k d, d)``.

    The result is a sum of per-token terms, hence separable on a grid.
    """

    def __init__(self, n_inputs: int, dim: int, options: OperatorOptions | None = None) -> None:
        super().__init__(n_inputs, dim)
        self.gates = nn.ModuleList(_linear(dim, dim) for _ in range(n_inputs))
        self.fuse = _linear(n_inputs * dim, dim)

    def _gated(self, tokens: Sequence[Tensor], offset: int) -> Tensor:
        return torch.cat(
            [torch.sigmoid(self.gates[offset + j](t)) for j, t in enumerate(tokens)], dim=-1
        )

    def forward(self, tokens: Sequence[Tensor]) -> Tensor:
        """``[B, d]`` x k -> ``[B, d]``."""
        return self.fuse(self._gated(tokens, 0))

    def separable_grid(
        self, rows: Sequence[Tensor], cols: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor] | None:
        """Row term ``[R, d]`` (with the bias) and column term ``[C, d]``."""
        return self.separable_vjp(rows, cols)[0]

    def separable_vjp(
        self, rows: Sequence[Tensor], cols: Sequence[Tensor]
    ) -> tuple[tuple[Tensor, Tensor], SeparableBackward]:
        split = len(rows) * self.dim
        weight = self.fuse.weight
        tokens = list(rows) + list(cols)
        gated = [torch.sigmoid(gate(t)) for gate, t in zip(self.gates, tokens)]
        row_g, col_g = torch.cat(gated[: len(rows)], dim=-1), torch.cat(gated[len(rows) :], dim=-1)
        r = F.linear(row_g, weight[:, :split], self.fuse.bias)
        c = F.linear(col_g, weight[:, split:])

        def backward(d_r: Tensor, d_c: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
            g_fuse = torch.cat([d_r.T @ row_g, d_c.T @ col_g], dim=1)
            d_gated = list((d_r @ weight[:, :split]).split(self.dim, dim=-1)) + list((d_c @ weight[:, split:]).split(self.dim, dim=-1))
            grads: list[Tensor] = []
            d_tokens: list[Tensor] = []
            for gate, t, s, ds in zip(self.gates, tokens, gated, d_gated):
                dz = torch.ops.aten.sigmoid_backward(ds, s)  # ds * s * (1 - s)
                grads += [dz.T @ t, dz.sum(0)]
                d_tokens.append(dz @ gate.weight)
            return grads + [g_fuse, d_r.sum(0)], d_tokens[: len(rows)], d_tokens[len(rows) :]

        return (r, c), backward


@register_fusion_operator("attention")
class AttentionFusion(FusionOperator):
    """Multi-head self-attention over the ``k`` tokens of each pair, mean over tokens, ``Linear(d, d)``.

    The sequence attended over is the ``k`` modality tokens of one (group, item)
    pair, so pairs never mix. (The authors' code feeds a 2-D ``[batch, 3d]``
    tensor to ``nn.MultiheadAttention``, which treats the batch as the sequence:
    every item attends over the other items of its mini-batch, and the result
    depends on how the batch was drawn. We do not reproduce that.)

    Per pair: ``q, k, v = in_proj(tokens)``, scaled dot-product attention per
    head, ``out_proj``, mean over the ``k`` tokens, then ``fc``. Since
    ``out_proj`` is affine and the output is linear in the attention weights, the
    mean over query tokens is taken on the weights first:
    ``mean_q sum_j A[q, j] v_j = sum_j (mean_q A[q, j]) v_j``.

    On a grid, the projections are computed once per row token and once per
    column token, and the score blocks that pair a row token with a column token
    are matrix products over all rows x columns at once; only the softmax and
    the weighted sum of values run per pair.
    """

    def __init__(self, n_inputs: int, dim: int, options: OperatorOptions | None = None) -> None:
        super().__init__(n_inputs, dim)
        heads = (options or OperatorOptions()).attention_heads
        if heads < 1 or dim % heads != 0:
            raise ConfigError(
                f"attention_heads={heads} must be >= 1 and divide the latent dim {dim}"
            )
        self.heads = heads
        self.head_dim = dim // heads
        self.in_proj = _linear(dim, 3 * dim)
        self.out_proj = _linear(dim, dim)
        self.fc = _linear(dim, dim)

    def _qkv(self, tokens: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens ``[n, d]`` x t -> q, k, v, each ``[n, t, h, hd]`` (q already scaled)."""
        x = self.in_proj(torch.stack(list(tokens), dim=-2))  # [n, t, 3d]
        x = x.reshape(x.shape[0], x.shape[1], 3, self.heads, self.head_dim)
        q, k, v = x.unbind(dim=2)
        return q / math.sqrt(self.head_dim), k, v

    def _finish(self, pooled: Tensor) -> Tensor:
        """Pooled heads ``[..., h, hd]`` -> fused ``[..., d]``."""
        return self.fc(self.out_proj(pooled.reshape(*pooled.shape[:-2], self.dim)))

    def forward(self, tokens: Sequence[Tensor]) -> Tensor:
        """``[B, d]`` x k -> ``[B, d]``."""
        q, k, v = self._qkv(tokens)  # [B, k, h, hd]
        weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k), dim=-1)
        pooled = torch.einsum("bhk,bkhd->bhd", weights.mean(dim=-2), v)
        return self._finish(pooled)

    def forward_grid(self, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> Tensor:
        """``[R, d]`` x a, ``[C, d]`` x b -> ``[R, C, d]``."""
        qr, kr, vr = self._qkv(rows)  # [R, a, h, hd]
        qc, kc, vc = self._qkv(cols)  # [C, b, h, hd]
        n_rows, n_cols, a, b = qr.shape[0], qc.shape[0], qr.shape[1], qc.shape[1]
        h = self.heads
        s_rr = torch.einsum("rqhd,rkhd->rhqk", qr, kr)[:, None].expand(n_rows, n_cols, h, a, a)
        s_rc = torch.einsum("rqhd,ckhd->rchqk", qr, kc)  # [R, C, h, a, b]
        s_cr = torch.einsum("cqhd,rkhd->rchqk", qc, kr)  # [R, C, h, b, a]
        s_cc = torch.einsum("cqhd,ckhd->chqk", qc, kc)[None].expand(n_rows, n_cols, h, b, b)
        scores = torch.cat(
            [torch.cat([s_rr, s_rc], dim=-1), torch.cat([s_cr, s_cc], dim=-1)], dim=-2
        )  # [R, C, h, k, k]
        weights = torch.softmax(scores, dim=-1).mean(dim=-2)  # [R, C, h, k]
        pooled = torch.einsum("rchk,rkhd->rchd", weights[..., :a], vr) + torch.einsum(
            "rchk,ckhd->rchd", weights[..., a:], vc
        )
        return self._finish(pooled)


@register_fusion_operator("moe")
class MoEFusion(FusionOperator):
    """Mixture of the ``sum``, ``mlp`` and ``gate`` experts with a per-sample router.

    ``router = Linear(3d, h) -> ReLU -> Linear(h, 3) -> softmax`` reads the
    concatenated expert outputs; the output is the routing-weighted sum of the
    expert outputs. Routing weights are per sample. (The authors average the
    softmax weights over the mini-batch, so every item of a batch gets the same
    mixture and the result depends on the batch; they also apply softmax twice
    and use dropout 0.5 in the router. We route each pair on its own, apply one
    softmax and use no dropout, which keeps the module deterministic.)

    On a grid the router's first layer is split per expert, and separable experts
    contribute a row term plus a column term to it.
    """

    def __init__(self, n_inputs: int, dim: int, options: OperatorOptions | None = None) -> None:
        super().__init__(n_inputs, dim)
        opts = options or OperatorOptions()
        hidden = dim if opts.router_hidden is None else opts.router_hidden
        if hidden < 1:
            raise ConfigError(f"router_hidden must be >= 1, got {hidden}")
        self.experts = nn.ModuleList(
            [SumFusion(n_inputs, dim), MLPFusion(n_inputs, dim), GateFusion(n_inputs, dim)]
        )
        n_experts = len(self.experts)
        self.router_fc1 = _linear(n_experts * dim, hidden)
        self.router_fc2 = _linear(hidden, n_experts)

    def _expert_list(self) -> list[FusionOperator]:
        return cast(list[FusionOperator], list(self.experts))

    def _mix(self, outs: list[Tensor], pre: Tensor) -> Tensor:
        weights = torch.softmax(self.router_fc2(F.relu(pre)), dim=-1)  # [..., n_experts]
        return (torch.stack(outs, dim=-1) * weights.unsqueeze(-2)).sum(dim=-1)

    def forward(self, tokens: Sequence[Tensor]) -> Tensor:
        """``[B, d]`` x k -> ``[B, d]``."""
        outs = [expert(tokens) for expert in self._expert_list()]
        return self._mix(outs, self.router_fc1(torch.cat(outs, dim=-1)))

    def forward_grid(self, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> Tensor:
        """``[R, d]`` x a, ``[C, d]`` x b -> ``[R, C, d]``."""
        weight = self.router_fc1.weight
        outs: list[Tensor] = []
        pre: Tensor = self.router_fc1.bias  # [h], broadcast over the grid
        for e, expert in enumerate(self._expert_list()):
            block = weight[:, e * self.dim : (e + 1) * self.dim]
            parts = expert.separable_grid(rows, cols)
            if parts is not None:
                r, c = parts
                outs.append(r[:, None, :] + c[None, :, :])
                term = F.linear(r, block)[:, None, :] + F.linear(c, block)[None, :, :]
            else:
                out = expert.forward_grid(rows, cols)
                outs.append(out)
                term = F.linear(out, block)
            pre = pre + term
        return self._mix(outs, pre)

    def grid_vjp(self, rows: Sequence[Tensor], cols: Sequence[Tensor]) -> tuple[Tensor, GridBackward] | None:
        # Separable experts (sum, gate) enter the router's first layer as a row term plus a
        # column term, so its products (forward and backward) run on [R] and [C] rows
        # instead of the [R, C] grid; only the mlp expert needs the full grid.
        experts = self._expert_list()
        n_exp, dim = len(experts), self.dim
        w_r1 = self.router_fc1.weight
        blocks = [w_r1[:, e * dim : (e + 1) * dim] for e in range(n_exp)]
        outs: list[Tensor] = []
        pieces: list[tuple[Tensor, Tensor] | None] = []
        backs: list[Callable[..., tuple[list[Tensor], list[Tensor], list[Tensor]]]] = []
        pre_rows: Tensor | None = None
        pre_cols: Tensor | None = None
        pre_grid: Tensor | None = None
        for expert, blk in zip(experts, blocks):
            sep = expert.separable_vjp(rows, cols)
            if sep is not None:
                (r, c), back_rc = sep
                pieces.append((r, c))
                backs.append(back_rc)
                outs.append(r[:, None, :] + c[None, :, :])
                t_r, t_c = F.linear(r, blk), F.linear(c, blk)
                pre_rows = t_r if pre_rows is None else pre_rows + t_r
                pre_cols = t_c if pre_cols is None else pre_cols + t_c
                continue
            found = expert.grid_vjp(rows, cols)
            if found is None:
                return None
            out_e, back = found
            pieces.append(None)
            backs.append(back)
            outs.append(out_e)
            t = F.linear(out_e, blk)
            pre_grid = t if pre_grid is None else pre_grid + t
        pre = self.router_fc1.bias.expand(len(rows[0]), len(cols[0]), -1)
        if pre_rows is not None and pre_cols is not None:
            pre = pre + pre_rows[:, None, :] + pre_cols[None, :, :]
        if pre_grid is not None:
            pre = pre + pre_grid
        act = pre.relu()  # [R, C, h]
        weights = torch.softmax(F.linear(act, self.router_fc2.weight, self.router_fc2.bias), dim=-1)  # [R, C, n_experts]
        per_expert = torch.stack(outs, dim=-2)  # [R, C, n_experts, d]
        out = (per_expert * weights.unsqueeze(-1)).sum(-2)

        def backward(dout: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
            d_w = (per_expert * dout.unsqueeze(-2)).sum(-1)  # [R, C, n_experts]
            d_logit = weights * (d_w - (weights * d_w).sum(-1, keepdim=True))
            g_r2 = d_logit.reshape(-1, n_exp).T @ act.reshape(-1, act.shape[-1])
            d_pre = torch.ops.aten.threshold_backward(d_logit @ self.router_fc2.weight, act, 0.0)  # [R, C, h]
            d_pre_rows, d_pre_cols = d_pre.sum(1), d_pre.sum(0)
            weighted = dout.unsqueeze(-2) * weights.unsqueeze(-1)  # [R, C, n_experts, d]
            grads: list[Tensor] = []
            g_r1: list[Tensor] = []
            d_rows: list[Tensor] = []
            d_cols: list[Tensor] = []
            for e, (blk, piece, back) in enumerate(zip(blocks, pieces, backs)):
                if piece is not None:
                    r, c = piece
                    g_r1.append(d_pre_rows.T @ r + d_pre_cols.T @ c)
                    d_r = weighted[:, :, e].sum(1) + d_pre_rows @ blk
                    d_c = weighted[:, :, e].sum(0) + d_pre_cols @ blk
                    g_params, dr, dc = back(d_r, d_c)
                else:
                    g_r1.append(d_pre.reshape(-1, d_pre.shape[-1]).T @ outs[e].reshape(-1, dim))
                    g_params, dr, dc = back(weighted[:, :, e] + d_pre @ blk)
                grads += g_params
                d_rows = list(dr) if e == 0 else [acc + g for acc, g in zip(d_rows, dr)]
                d_cols = list(dc) if e == 0 else [acc + g for acc, g in zip(d_cols, dc)]
            grads += [torch.cat(g_r1, dim=1), d_pre_rows.sum(0), g_r2, d_logit.sum((0, 1))]
            return grads, d_rows, d_cols

        return out, backward


# --------------------------------------------------------------------------- module


def _as_feature_tensor(x: Tensor | np.ndarray, name: str, rows: int, cols: int) -> Tensor:
    """Validate item features ``[rows, cols]`` and return them as float32."""
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise DataError(f"{name} features must be 2-D [n_items, dim], got shape {tuple(t.shape)}")
    if t.shape[0] != rows:
        raise DataError(f"{name} features have {t.shape[0]} rows but n_items={rows}")
    if t.shape[1] != cols:
        raise DataError(f"{name} features have {t.shape[1]} columns but {name}_dim={cols}")
    if t.is_complex():
        raise DataError(f"{name} features must be real numbers, got dtype {t.dtype}")
    t = t.detach().to(torch.float32)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
        raise DataError(
            f"{name} features have {int(bad.sum())} NaN/inf entries (first item rows: {first})"
        )
    return t.contiguous()


def _check_dim(value: int | None, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


class GroupFusion(nn.Module):
    """Group-wise multimodal fusion: ``(group, item) -> [d]`` (GFMFR's server model).

    Parameters
    ----------
    n_groups : int
        ``G``.
    latent_dim : int
        ``d``, the size of the client item tables the module regresses.
    embedding_dim : int
        ``E``, size of the group embedding (and of the item-ID embedding when no
        modality is used).
    text_dim, image_dim : int or None
        ``Dt``, ``Dv``; None disables the modality.
    n_items : int
        ``I``.
    operator : str
        A key of :data:`FUSION_OPERATORS`: ``sum``, ``mlp``, ``gate``,
        ``attention`` or ``moe``.
    generator : torch.Generator or None
        Source of the initial weights. None uses a fresh generator seeded with 0,
        so construction is deterministic either way; the global RNG is never used.
    options : OperatorOptions or None
        Operator hyper-parameters (attention heads, router width).

    Attributes
    ----------
    modalities : tuple of str
        Token order: ``("group", "text", "image")``, ``("group", "text")``,
        ``("group", "image")`` or ``("group", "item_id")``.
    group_embedding : Parameter [G, E]
    item_embedding : Parameter [I, E] or None
        Only in the ID-only configuration.
    projections : ModuleDict
        One ``Linear(*, d)`` per entry of ``modalities``.
    fusion : FusionOperator

    Notes
    -----
    Item features are set after construction with :meth:`set_item_features`
    (or use :meth:`from_features`); they are stored as non-persistent buffers
    ``text_features [I, Dt]`` and ``image_features [I, Dv]``.
    """

    def __init__(
        self,
        n_groups: int,
        latent_dim: int,
        *,
        embedding_dim: int = 512,
        text_dim: int | None,
        image_dim: int | None,
        n_items: int,
        operator: str = "moe",
        generator: torch.Generator | None = None,
        options: OperatorOptions | None = None,
    ) -> None:
        super().__init__()
        _check_dim(n_groups, "n_groups")
        _check_dim(latent_dim, "latent_dim")
        _check_dim(embedding_dim, "embedding_dim")
        _check_dim(n_items, "n_items")
        _check_dim(text_dim, "text_dim", allow_none=True)
        _check_dim(image_dim, "image_dim", allow_none=True)
        factory = get_fusion_operator(operator)
        self.n_groups = n_groups
        self.latent_dim = latent_dim
        self.embedding_dim = embedding_dim
        self.n_items = n_items
        self.text_dim = text_dim
        self.image_dim = image_dim
        self.operator = operator

        in_dims: dict[str, int] = {"group": embedding_dim}
        if text_dim is not None:
            in_dims["text"] = text_dim
        if image_dim is not None:
            in_dims["image"] = image_dim
        if len(in_dims) == 1:
            in_dims["item_id"] = embedding_dim
        self.modalities: tuple[str, ...] = tuple(in_dims)

        self.group_embedding = nn.Parameter(torch.empty(n_groups, embedding_dim))
        self.item_embedding: nn.Parameter | None = None
        if "item_id" in in_dims:
            self.item_embedding = nn.Parameter(torch.empty(n_items, embedding_dim))
        self.projections = nn.ModuleDict(
            {m: _linear(dim, latent_dim) for m, dim in in_dims.items()}
        )
        self.fusion = factory(len(in_dims), latent_dim, options or OperatorOptions())
        self.register_buffer("text_features", None, persistent=False)
        self.register_buffer("image_features", None, persistent=False)
        self.reset_parameters(generator)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_features(
        cls,
        n_groups: int,
        latent_dim: int,
        *,
        text: Tensor | np.ndarray | None,
        image: Tensor | np.ndarray | None,
        n_items: int | None = None,
        embedding_dim: int = 512,
        operator: str = "moe",
        generator: torch.Generator | None = None,
        options: OperatorOptions | None = None,
    ) -> GroupFusion:
        """Build a module whose dims are read from the features, and set them.

        ``text`` ``[I, Dt]`` and ``image`` ``[I, Dv]`` (either may be None);
        ``n_items`` is required only when both are None.
        """
        shapes = [tuple(np.shape(f)) for f in (text, image) if f is not None]
        if n_items is None:
            if not shapes:
                raise ConfigError("n_items is required when neither text nor image is given")
            if len(shapes[0]) != 2:
                raise DataError(f"item features must be 2-D [n_items, dim], got shape {shapes[0]}")
            n_items = int(shapes[0][0])

        def dim_of(f: Tensor | np.ndarray | None, name: str) -> int | None:
            if f is None:
                return None
            shape = tuple(np.shape(f))
            if len(shape) != 2:
                raise DataError(f"{name} features must be 2-D [n_items, dim], got shape {shape}")
            return int(shape[1])

        module = cls(
            n_groups,
            latent_dim,
            embedding_dim=embedding_dim,
            text_dim=dim_of(text, "text"),
            image_dim=dim_of(image, "image"),
            n_items=n_items,
            operator=operator,
            generator=generator,
            options=options,
        )
        module.set_item_features(text=text, image=image)
        return module

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every parameter from ``generator`` (None: a generator seeded with 0)."""
        gen = generator
        if gen is None:
            gen = torch.Generator()
            gen.manual_seed(0)
        for emb in (self.group_embedding, self.item_embedding):
            if emb is not None:
                std = math.sqrt(2.0 / (emb.shape[0] + emb.shape[1]))
                nn.init.normal_(emb, 0.0, std, generator=gen)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight, generator=gen)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_item_features(
        self, text: Tensor | np.ndarray | None = None, image: Tensor | np.ndarray | None = None
    ) -> None:
        """Store the item features as buffers (float32, on the module's device).

        Parameters
        ----------
        text : Tensor or ndarray, shape [I, Dt], or None
            Required exactly when the module was built with ``text_dim``.
        image : Tensor or ndarray, shape [I, Dv], or None
            Required exactly when the module was built with ``image_dim``.

        Raises
        ------
        DataError
            A feature matrix is missing, unexpected, of the wrong shape, or not finite.
        """
        device = self.group_embedding.device
        for name, value, dim in (("text", text, self.text_dim), ("image", image, self.image_dim)):
            if dim is None:
                if value is not None:
                    raise DataError(
                        f"{name} features given but the module was built with {name}_dim=None"
                    )
                continue
            if value is None:
                raise DataError(
                    f"the module was built with {name}_dim={dim} but no {name} features were given"
                )
            setattr(
                self,
                f"{name}_features",
                _as_feature_tensor(value, name, self.n_items, dim).to(device),
            )

    # ------------------------------------------------------------------ tokens

    def _item_source(self, name: str) -> Tensor:
        """The matrix that item modality ``name`` projects: ``[I, Dt]``, ``[I, Dv]`` or ``[I, E]``."""
        if name == "item_id" and self.item_embedding is not None:
            return self.item_embedding
        source = getattr(self, f"{name}_features")
        if source is None:
            raise DataError(
                f"item features for modality {name!r} are not set; "
                "call set_item_features(text=..., image=...) first"
            )
        return source

    def _item_tokens(self, item_idx: Tensor | None) -> list[Tensor]:
        """Projected item tokens, each ``[n, d]`` (``n = I`` when ``item_idx`` is None)."""
        rows = []
        for name in self.modalities[1:]:
            source = self._item_source(name)
            rows.append(source if item_idx is None else source.index_select(0, item_idx))
        return self._project_items(rows)

    def _project_items(self, rows: Sequence[Tensor]) -> list[Tensor]:
        """Project raw item rows (one matrix per item modality, in order) to ``[n, d]`` tokens."""
        return [self.projections[name](x) for name, x in zip(self.modalities[1:], rows)]

    def _group_tokens(self, group_idx: Tensor | None) -> list[Tensor]:
        emb = self.group_embedding
        rows = emb if group_idx is None else emb.index_select(0, group_idx)
        return [self.projections["group"](rows)]

    def _check_index(self, idx: Tensor, name: str, size: int) -> Tensor:
        if not isinstance(idx, Tensor):
            raise DataError(f"{name} must be a torch.LongTensor, got {type(idx).__name__}")
        if idx.dtype != torch.long:
            raise DataError(f"{name} must have dtype torch.long, got {idx.dtype}")
        if idx.ndim != 1:
            raise DataError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise DataError(
                f"{name} must lie in 0..{size - 1}, got range [{int(idx.min())}, {int(idx.max())}]"
            )
        return idx

    # ------------------------------------------------------------------ forward

    def forward(self, group_idx: Tensor, item_idx: Tensor) -> Tensor:
        """Fused vectors of explicit (group, item) pairs.

        Parameters
        ----------
        group_idx : LongTensor, shape [B]
        item_idx : LongTensor, shape [B]

        Returns
        -------
        Tensor, shape [B, d]
        """
        self._check_index(group_idx, "group_idx", self.n_groups)
        self._check_index(item_idx, "item_idx", self.n_items)
        if group_idx.shape != item_idx.shape:
            raise DataError(
                f"group_idx has shape {tuple(group_idx.shape)} but item_idx has {tuple(item_idx.shape)}"
            )
        return self.fusion(self._group_tokens(group_idx) + self._item_tokens(item_idx))

    def forward_grid(
        self, group_idx: Tensor | None = None, item_idx: Tensor | None = None
    ) -> Tensor:
        """Fused vectors of every (group, item) combination of the given ids.

        Each item's projections are computed once and shared by all groups.

        Parameters
        ----------
        group_idx : LongTensor, shape [G'], or None (all groups)
        item_idx : LongTensor, shape [I'], or None (all items)

        Returns
        -------
        Tensor, shape [G', I', d]
        """
        if group_idx is not None:
            self._check_index(group_idx, "group_idx", self.n_groups)
        if item_idx is not None:
            self._check_index(item_idx, "item_idx", self.n_items)
        return self._grid(group_idx, item_idx)

    def _grid(self, group_idx: Tensor | None, item_idx: Tensor | None) -> Tensor:
        """:meth:`forward_grid` without the index checks."""
        return self.fusion.forward_grid(self._group_tokens(group_idx), self._item_tokens(item_idx))

    def forward_all(self) -> Tensor:
        """Fused vectors of all groups x all items: ``[G, I, d]``."""
        return self.forward_grid(None, None)

    @torch.no_grad()
    def grid_mse_grads(
        self, group_idx: Tensor | None, item_idx: Tensor, raw_items: Sequence[Tensor], targets: Tensor
    ) -> tuple[Tensor, dict[nn.Parameter, Tensor]] | None:
        """MSE of the grid ``group_idx x item_idx`` against ``targets`` and its gradients, by hand.

        Parameters
        ----------
        group_idx : LongTensor [G'] or None (all groups)
        item_idx : LongTensor [b]
        raw_items : the rows ``item_idx`` of each item modality's input matrix ([b, D] each).
        targets : [G', b, d]

        Returns
        -------
        ``(loss, {parameter: gradient})`` with the gradient of every parameter, equal to
        what autograd gives for ``F.mse_loss(forward_grid(...), targets)``; None when the
        operator has no hand-derived backward.
        """
        emb = self.group_embedding if group_idx is None else self.group_embedding.index_select(0, group_idx)
        names = self.modalities[1:]
        proj_g = self.projections["group"]
        item_proj = [self.projections[name] for name in names]
        found = self.fusion.grid_vjp(self._group_tokens(group_idx), self._project_items(raw_items))
        if found is None:
            return None
        out, backward = found
        diff = out - targets
        loss = diff.square().mean()
        op_grads, d_rows, d_cols = backward(diff.mul_(2.0 / diff.numel()))
        grads: dict[nn.Parameter, Tensor] = dict(zip(self.fusion.parameters(), op_grads))
        d_group = d_rows[0]
        grads[proj_g.weight] = d_group.T @ emb
        grads[proj_g.bias] = d_group.sum(0)
        d_emb = d_group @ proj_g.weight
        if group_idx is None:
            grads[self.group_embedding] = d_emb
        else:
            grads[self.group_embedding] = torch.zeros_like(self.group_embedding).index_add_(0, group_idx, d_emb)
        for name, pr, x, d_tok in zip(names, item_proj, raw_items, d_cols):
            grads[pr.weight] = d_tok.T @ x
            grads[pr.bias] = d_tok.sum(0)
            if name == "item_id" and self.item_embedding is not None:
                grads[self.item_embedding] = torch.zeros_like(self.item_embedding).index_add_(0, item_idx, d_tok @ pr.weight)
        return loss, grads


# --------------------------------------------------------------------------- training


class Stepper(Protocol):
    """What :func:`train_fusion` needs from an optimiser."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> object: ...


class PlainSGD:
    """SGD without momentum, with L2 weight decay, in two in-place kernels per step.

    ``p <- p * (1 - lr * wd) - lr * grad``, which is ``torch.optim.SGD(lr=lr,
    weight_decay=wd)``'s update ``p - lr * (grad + wd * p)`` regrouped (equal up to
    rounding). Parameters without a gradient are skipped, as there. Written out
    because the fusion step is thousands of tiny optimiser steps per round, where
    the generic optimiser's bookkeeping costs as much as the arithmetic.
    """

    def __init__(
        self, params: Sequence[nn.Parameter], lr: float, weight_decay: float = 0.0
    ) -> None:
        self.params = list(params)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every gradient."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        params: list[Tensor] = [p for p in self.params if p.grad is not None]
        if not params:
            return
        grads: list[Tensor] = [cast(Tensor, p.grad) for p in params]
        if self.weight_decay:
            torch._foreach_mul_(params, 1.0 - self.lr * self.weight_decay)
        torch._foreach_add_(params, grads, alpha=-self.lr)


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float, float], Stepper]] = {
    "sgd": lambda params, lr, weight_decay: PlainSGD(params, lr, weight_decay),
    "adam": lambda params, lr, weight_decay: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay, foreach=True
    ),
}


def train_fusion(
    module: GroupFusion,
    targets: Tensor,
    *,
    group_mask: Tensor | None = None,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 0.002,
    weight_decay: float = 1e-4,
    optimizer: str = "sgd",
    generator: torch.Generator,
) -> list[float]:
    """Fit the fusion module to each group's averaged item table (MSE).

    Every epoch shuffles the items with ``generator`` and walks through them in
    batches of ``ceil(batch_size / G_active)`` items; each batch covers those
    items for *all* active groups at once (:meth:`GroupFusion.forward_grid`), so
    a batch holds about ``batch_size`` (group, item) pairs and every item's
    projections are computed once per batch. The loss of a batch is the mean
    squared error over its pairs and the ``d`` coordinates.

    Parameters
    ----------
    module : GroupFusion
        Trained in place.
    targets : Tensor, shape [G, I, d]
        Each group's averaged shared item table.
    group_mask : BoolTensor, shape [G], or None
        Groups with members this round; only their pairs enter the loss. None
        means all groups.
    epochs : int
        Passes over the items (0 trains nothing).
    batch_size : int
        Approximate number of (group, item) pairs per step.
    lr, weight_decay : float
        Optimiser settings.
    optimizer : str
        A key of :data:`OPTIMIZERS`: ``sgd`` (:class:`PlainSGD`, no momentum) or
        ``adam``; a fresh optimiser is built on each call, so no optimiser state
        carries over between rounds (as in the authors' code).
    generator : torch.Generator
        Shuffles the items.

    Returns
    -------
    list of float, length ``epochs``
        Mean training loss of each epoch (pair-weighted mean of the batch losses).

    Raises
    ------
    DataError
        Bad ``targets`` or ``group_mask`` (shape, NaN, no active group).
    ConfigError
        Bad hyper-parameters or unknown ``optimizer``.
    FloatingPointError
        The loss became NaN or infinite (usually a learning rate too large).
    """
    if not isinstance(module, GroupFusion):
        raise ConfigError(f"module must be a GroupFusion, got {type(module).__name__}")
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}")
    _check_dim(batch_size, "batch_size")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ConfigError(
            f"weight_decay must be a non-negative finite number, got {weight_decay!r}"
        )
    if optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {optimizer!r}; known: {', '.join(sorted(OPTIMIZERS))}"
        )

    params = list(module.parameters())
    device, dtype = module.group_embedding.device, module.group_embedding.dtype
    targets = torch.as_tensor(targets)
    expected = (module.n_groups, module.n_items, module.latent_dim)
    if tuple(targets.shape) != expected:
        raise DataError(
            f"targets must have shape [G, I, d] = {list(expected)}, got {list(targets.shape)}"
        )
    targets = targets.detach().to(device=device, dtype=dtype)
    if not bool(torch.isfinite(targets).all()):
        raise DataError("targets contain NaN/inf entries")
    if group_mask is None:
        active = torch.arange(module.n_groups, device=device)
    else:
        mask = torch.as_tensor(group_mask)
        if mask.dtype != torch.bool or tuple(mask.shape) != (module.n_groups,):
            raise DataError(
                f"group_mask must be a bool tensor of shape [{module.n_groups}], "
                f"got dtype {mask.dtype} and shape {list(mask.shape)}"
            )
        active = torch.nonzero(mask.to(device)).flatten()
    n_active = int(active.numel())
    if n_active == 0:
        raise DataError("group_mask selects no group: nothing to train on")
    if epochs == 0:
        return []

    group_idx = None if n_active == module.n_groups else active
    active_targets = targets if group_idx is None else targets.index_select(0, active)  # [Ga, I, d]
    # Raw item inputs per modality: fixed feature buffers, or the learnable
    # item-ID embedding of the ID-only model. Gathering each batch's rows right
    # before use keeps them in cache for the projection (faster than permuting
    # whole matrices once per epoch).
    sources = [module._item_source(name) for name in module.modalities[1:]]
    items_per_batch = max(1, math.ceil(batch_size / n_active))
    opt = OPTIMIZERS[optimizer](params, lr, weight_decay)
    # Operators with a hand-derived backward (sum, mlp, gate, moe) skip autograd; the
    # gradients are the same (tested), only the per-operation overhead goes.
    manual = True
    module.train()
    losses: list[float] = []
    for epoch in range(epochs):
        perm = torch.randperm(module.n_items, generator=generator).to(device)
        total = 0.0
        for start in range(0, module.n_items, items_per_batch):
            items = perm[start : start + items_per_batch]
            rows = [src.index_select(0, items) for src in sources]
            batch_targets = active_targets.index_select(1, items)
            found = module.grid_mse_grads(group_idx, items, rows, batch_targets) if manual else None
            if found is not None:
                loss, grads = found
                for p in params:
                    p.grad = grads[p]
            else:
                manual = False
                pred = module.fusion.forward_grid(
                    module._group_tokens(group_idx), module._project_items(rows)
                )  # [Ga, b, d]
                loss = F.mse_loss(pred, batch_targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            total += float(loss.detach()) * items.numel()
        epoch_loss = total / module.n_items
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(
                f"train_fusion: loss became {epoch_loss} in epoch {epoch} "
                f"(optimizer={optimizer}, lr={lr}); lower the learning rate"
            )
        losses.append(epoch_loss)
    return losses
