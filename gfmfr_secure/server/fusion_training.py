"""Training of the group fusion module: the server's regression each round.

:func:`train_fusion` fits a :class:`~gfmfr_secure.server.fusion.GroupFusion` to
each group's averaged shared item table (MSE over group x item pairs) with a
fresh optimiser per call (:data:`OPTIMIZERS`: plain SGD or Adam), walking the
items in shuffled batches that cover every active group at once.

The default ``moe`` operator with plain SGD on feature modalities runs as one
compiled Numba loop over all epochs and batches (:mod:`gfmfr_secure.server.fusion_kernel`):
the same batches and hand-derived gradients, matrix products on single-threaded
BLAS, no per-operation dispatch; about 2x faster than the eager steps (1.55 against
3.3 s per round on the default setting), equal to them up to float rounding (tested).
Numba caches the compiled loop on disk, so only the first process pays its
compilation (a few seconds).

With ``compiled=True`` each SGD step (gather the batch, hand-derived forward and
backward, parameter update) runs as one graph compiled by ``torch.compile``
(inductor, C++ wrapper), which removes the per-operation dispatch of some 200 small
kernels per step: about 1.8x faster on the default GFMFR setting, after a one-off
compilation of about 15-25 s per process (two graphs: full batches and the last,
smaller one). The arithmetic is the same; the fused kernels round differently, so
results agree with the eager path to float tolerance, not bit for bit (and are
themselves reproducible).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from gfmfr_secure.errors import ConfigError, DataError
from gfmfr_secure.server.fusion import GroupFusion, _check_dim

__all__ = ["OPTIMIZERS", "PlainSGD", "Stepper", "compiled_supported", "kernel_supported", "train_fusion"]


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


@torch.no_grad()
def _sgd_step_(
    module: GroupFusion,
    params: list[nn.Parameter],
    sources: list[Tensor],
    items: Tensor,
    targets: Tensor,
    lr: float,
    weight_decay: float,
) -> Tensor:
    """One plain-SGD step on the batch ``items`` for all groups, in place; returns the loss.

    ``sources`` are the item modalities' input matrices ``[I, D]``, ``targets`` the
    groups' tables ``[G, I, d]``; the update is :class:`PlainSGD`'s. Written as one
    function so that ``torch.compile`` can turn the whole step into a single graph.
    """
    rows = [src.index_select(0, items) for src in sources]
    found = module.grid_mse_grads(None, items, rows, targets.index_select(1, items))
    if found is None:
        raise ConfigError(f"operator {module.operator!r} has no hand-derived backward to compile")
    loss, grads = found
    for p in params:
        p.mul_(1.0 - lr * weight_decay).sub_(grads[p], alpha=lr)
    return loss


_COMPILED_STEP: Callable[..., Tensor] | None = None


def _compiled_step() -> Callable[..., Tensor]:
    """:func:`_sgd_step_` compiled once per process (parameters are graph inputs, so
    every module of the same architecture reuses the graph)."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(_sgd_step_, dynamic=False, options={"cpp_wrapper": True})
    return _COMPILED_STEP


def compiled_supported(operator: str, optimizer: str) -> bool:
    """Whether ``train_fusion(..., compiled=True)`` can run this operator and optimiser.

    The compiled step is plain SGD through a hand-derived backward: ``optimizer`` must
    be ``sgd`` and the operator one of ``sum``, ``mlp``, ``gate``, ``moe``.
    """
    return optimizer == "sgd" and operator in {"sum", "mlp", "gate", "moe"}


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
    compiled: bool = False,
    kernel: bool = True,
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
    compiled : bool
        Run each step as a graph compiled by ``torch.compile`` (module docstring).
        Needs ``optimizer="sgd"`` and an operator with a hand-derived backward
        (:func:`compiled_supported`), and a C++ compiler. Rounds in which some group
        has no members run eagerly (their batch shapes would need further graphs).
    kernel : bool
        When ``compiled`` is off, train the ``moe`` operator with plain SGD on feature
        modalities as one Numba loop (:mod:`gfmfr_secure.server.fusion_kernel`,
        :func:`kernel_supported`): the same batches and gradients, about 2x faster than
        the eager steps. False always runs the eager steps.

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
    if compiled and not compiled_supported(module.operator, optimizer):
        raise ConfigError(
            "compiled fusion training needs optimizer='sgd' and one of the operators "
            f"sum, mlp, gate, moe; got optimizer={optimizer!r}, operator={module.operator!r}"
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
    # Every path walks the same shuffles: one permutation of the items per epoch.
    perms = torch.stack([torch.randperm(module.n_items, generator=generator) for _ in range(epochs)])
    module.train()

    if kernel and not compiled and kernel_supported(module, optimizer):
        # imported here: importing Numba takes about 0.5 s
        from gfmfr_secure.server.fusion_kernel import train_moe_sgd

        losses_np = np.zeros(epochs, dtype=np.float64)
        with threadpool_limits(limits=1, user_api="blas"):  # one core, as the eager steps (step.py)
            train_moe_sgd(
                perms.numpy().astype(np.int64), items_per_batch, active.numpy().astype(np.int64),
                np.ascontiguousarray(active_targets.numpy()), *_moe_arrays(module), float(lr),
                float(weight_decay), losses_np,
            )
        return [_epoch_loss(float(v), e, optimizer, lr) for e, v in enumerate(losses_np)]

    opt = OPTIMIZERS[optimizer](params, lr, weight_decay)
    # Operators with a hand-derived backward (sum, mlp, gate, moe) skip autograd; the
    # gradients are the same (tested), only the per-operation overhead goes.
    manual = True

    if compiled and group_idx is None:
        from torch._inductor.exc import InductorError  # here: importing the compiler takes ~1 s

        compiled_step = _compiled_step()

        def step(items: Tensor) -> Tensor:
            try:
                return compiled_step(module, params, sources, items, active_targets, lr, weight_decay)
            except InductorError as err:
                raise ConfigError(
                    "compiling the fusion step failed (fusion.compile=true needs a working C++ "
                    f"compiler; set fusion.compile=false to train eagerly): {err}"
                ) from err

    else:

        def step(items: Tensor) -> Tensor:
            nonlocal manual
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
            return loss.detach()

    losses: list[float] = []
    for epoch in range(epochs):
        perm = perms[epoch].to(device)
        total = 0.0
        for start in range(0, module.n_items, items_per_batch):
            items = perm[start : start + items_per_batch]
            total += float(step(items)) * items.numel()
        losses.append(_epoch_loss(total / module.n_items, epoch, optimizer, lr))
    return losses


def kernel_supported(module: GroupFusion, optimizer: str) -> bool:
    """Whether :func:`train_fusion` can run ``module`` as the Numba loop: the ``moe``
    operator, plain SGD, item tokens from feature matrices (not the learnable item-ID
    embedding), float32 parameters on the CPU."""
    return (
        optimizer == "sgd"
        and module.operator == "moe"
        and "item_id" not in module.modalities
        and module.group_embedding.dtype == torch.float32
        and module.group_embedding.device.type == "cpu"
    )


def _moe_arrays(module: GroupFusion) -> tuple:
    """The module's parameters and item features as NumPy views, in :func:`train_moe_sgd`'s order.

    The views share memory with the parameters, so the loop trains them in place.
    """
    moe = module.fusion
    _, mlp, gate = moe.experts  # the sum expert has no parameters

    def v(t: Tensor) -> np.ndarray:
        return t.detach().numpy()

    items = module.modalities[1:]
    group = module.projections["group"]
    return (
        v(module.group_embedding), v(group.weight), v(group.bias),
        tuple(v(module._item_source(name)) for name in items),
        tuple(v(module.projections[name].weight) for name in items),
        tuple(v(module.projections[name].bias) for name in items),
        v(mlp.fc1.weight), v(mlp.fc1.bias), v(mlp.fc2.weight), v(mlp.fc2.bias),
        tuple(v(g.weight) for g in gate.gates), tuple(v(g.bias) for g in gate.gates),
        v(gate.fuse.weight), v(gate.fuse.bias),
        v(moe.router_fc1.weight), v(moe.router_fc1.bias), v(moe.router_fc2.weight), v(moe.router_fc2.bias),
    )


def _epoch_loss(value: float, epoch: int, optimizer: str, lr: float) -> float:
    """``value``, or FloatingPointError when it is NaN or infinite."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"train_fusion: loss became {value} in epoch {epoch} "
            f"(optimizer={optimizer}, lr={lr}); lower the learning rate"
        )
    return value
