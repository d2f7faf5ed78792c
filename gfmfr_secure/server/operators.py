"""Fusion operators: fuse ``k`` vectors of size ``d`` into one (GFMFR's server model).

Five operators are registered in :data:`FUSION_OPERATORS` (``sum``, ``mlp``,
``gate``, ``attention``, ``moe``); :func:`register_fusion_operator` adds more.
Every operator works on explicit per-pair token lists (:meth:`FusionOperator.forward`)
and on the Cartesian product of row tokens (groups) and column tokens (items)
(:meth:`FusionOperator.forward_grid`), where it may exploit the grid: additively
separable operators (``sum``, ``gate``) never build a per-pair tensor before the
final broadcast add. ``sum``, ``mlp``, ``gate`` and ``moe`` also give a
hand-derived backward on the grid (:meth:`FusionOperator.grid_vjp`), which the
fusion training uses instead of autograd; ``attention`` keeps autograd.

Operators are built with ``skip_init`` and initialised by the owning
:class:`~gfmfr_secure.server.fusion.GroupFusion` from its own generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gfmfr_secure.errors import ConfigError

__all__ = [
    "FUSION_OPERATORS",
    "AttentionFusion",
    "FusionOperator",
    "GateFusion",
    "GridBackward",
    "MLPFusion",
    "MoEFusion",
    "OperatorOptions",
    "SeparableBackward",
    "SumFusion",
    "get_fusion_operator",
    "register_fusion_operator",
]


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """An ``nn.Linear`` built without drawing from the global RNG (initialised later)."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features)


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
    :meth:`separable_vjp` (operators that are a sum of a row-only and a
    column-only term: it gives :meth:`separable_grid` and the grid backward) or
    :meth:`forward_grid` / :meth:`grid_vjp` (to share per-token work across the
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
        """``(r [R, d], c [C, d])`` with ``out[i, j] = r[i] + c[j]``, or None if not separable.

        The forward half of :meth:`separable_vjp`; separable operators implement that one.
        """
        found = self.separable_vjp(rows, cols)
        return None if found is None else found[0]

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

    def separable_vjp(
        self, rows: Sequence[Tensor], cols: Sequence[Tensor]
    ) -> tuple[tuple[Tensor, Tensor], SeparableBackward]:
        """Row sum ``[R, d]`` and column sum ``[C, d]``, and their backward."""

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

    def separable_vjp(
        self, rows: Sequence[Tensor], cols: Sequence[Tensor]
    ) -> tuple[tuple[Tensor, Tensor], SeparableBackward]:
        """Row term ``[R, d]`` (with the bias) and column term ``[C, d]``, and their backward."""
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
        """``[R, d]`` x a, ``[C, d]`` x b -> ``[R, C, d]`` (the forward half of :meth:`grid_vjp`)."""
        found = self.grid_vjp(rows, cols)
        if found is None:  # an expert without a grid backward: every pair on its own
            return super().forward_grid(rows, cols)
        return found[0]

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
