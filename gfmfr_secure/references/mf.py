"""Centralised dot-product matrix factorisation trained with BPR: a reference for accuracy.

Model: user vectors ``P`` ([U, d]) and item vectors ``Q`` ([I, d]); the score of
item ``i`` for user ``u`` is ``P[u] . Q[i]``. Loss (Rendle et al., BPR, 2009),
over every training positive ``(u, i)`` paired with ``negatives`` items ``j``
drawn afresh each epoch uniformly from outside ``u``'s training positives (the
project's negatives rule, :func:`gfmfr_secure.data.negatives.sample_outside`):

    L = mean over pairs (u, i, j) of
        softplus(s_uj - s_ui) + weight_decay * (|P[u]|^2 + |Q[i]|^2 + |Q[j]|^2)

Training is full-batch: one Adam step per epoch on the exact gradient of ``L``,
computed in user chunks as dense products (scores ``S = P_c Q^T``, then
``dL/dP_c = G Q`` and ``dL/dQ += G^T P_c`` with ``G = dL/dS`` scattered from
the pairs), so an epoch costs a few matrix products and no Python loop over
users or samples. The epoch is selected on validation NDCG@10 (evaluated every
``eval_every`` epochs, early stopping after ``patience`` evaluations without a
gain); learning rate and weight decay are selected on validation by
:func:`select_mf`. The test split is never seen: training and selection run
on :func:`gfmfr_secure.references.ease.blank_test` of the split.

Defaults (``MFSettings()``) were selected on ML-100K-mm validation; the grid
and its figures are in ``docs/baselines.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gfmfr_secure.data import Split
from gfmfr_secure.data.negatives import sample_outside
from gfmfr_secure.errors import ConfigError, DataError
from gfmfr_secure.metrics import evaluate_ranking
from gfmfr_secure.references.ease import blank_test
from gfmfr_secure.rng import numpy_rng, torch_generator
from gfmfr_secure.simulation.selection import ValidationSelector

__all__ = ["MFModel", "MFResult", "MFSelection", "MFSettings", "bpr_loss_and_grads", "select_mf", "train_mf"]


@dataclass(frozen=True)
class MFSettings:
    """Hyper-parameters of :func:`train_mf` (defaults selected on ML-100K-mm validation).

    Attributes
    ----------
    dim : int
        Latent size d.
    lr : float
        Adam step size.
    weight_decay : float
        L2 weight on the embeddings of each sampled pair (see the module docstring).
    negatives : int
        Negatives drawn per training positive each epoch.
    max_epochs : int
        Upper bound on full-batch epochs.
    eval_every : int
        Validate every this many epochs (and after the last).
    patience : int
        Validations without a better NDCG@10 before stopping (0 = never stop early).
    init_std : float
        Standard deviation of the Gaussian initialisation.
    chunk_users : int
        Users whose [chunk, I] score block is formed at once (memory, not results).
    """

    dim: int = 64
    lr: float = 0.01
    weight_decay: float = 0.003
    negatives: int = 1
    max_epochs: int = 300
    eval_every: int = 10
    patience: int = 5
    init_std: float = 0.1
    chunk_users: int = 1024

    def __post_init__(self) -> None:
        for name in ("dim", "negatives", "max_epochs", "eval_every", "chunk_users"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"MF setting {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"MF setting patience must be an integer >= 0, got {self.patience!r}")
        for name in ("lr", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"MF setting {name} must be a finite number > 0, got {value!r}")
        wd = self.weight_decay
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise ConfigError(f"MF setting weight_decay must be a finite number >= 0, got {wd!r}")


@dataclass(frozen=True)
class MFModel:
    """Trained factors: ``users`` [U, d] and ``items`` [I, d] (float32)."""

    users: Tensor
    items: Tensor

    def scorer(self) -> Callable[[Tensor], Tensor]:
        """``users: int64 [B] -> scores [B, I]`` (dot products), for :func:`evaluate_ranking`."""
        return lambda u: self.users[u.to(torch.int64)] @ self.items.T


@dataclass(frozen=True)
class MFResult:
    """A trained MF model with its validation record.

    Attributes
    ----------
    model : MFModel
        Factors of the validation-selected epoch.
    settings : MFSettings
    best_epoch : int
        0-based epoch selected by validation NDCG@10.
    val : dict[str, float]
        Validation metrics of that epoch.
    history : list of dict
        ``{"epoch", "loss"}`` for every epoch, with ``"val_ndcg10"`` where validated.
    """

    model: MFModel
    settings: MFSettings
    best_epoch: int
    val: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def bpr_loss_and_grads(
    users_f: Tensor,
    items_f: Tensor,
    pair_users: Tensor,
    pos: Tensor,
    neg: Tensor,
    weight_decay: float,
    chunk_users: int,
) -> tuple[float, Tensor, Tensor]:
    """Mean BPR loss with L2 over the pairs, and its exact gradient.

    Parameters
    ----------
    users_f : Tensor, shape [U, d]
    items_f : Tensor, shape [I, d]
    pair_users : Tensor, shape [N], int64
        User of each pair, ascending (pairs grouped by user).
    pos, neg : Tensor, shape [N], int64
        Positive and negative item of each pair.
    weight_decay : float
        L2 weight per pair and embedding.
    chunk_users : int
        Users per dense [chunk, I] score block.

    Returns
    -------
    (loss, grad_users [U, d], grad_items [I, d])
    """
    n_users, n_items = users_f.shape[0], items_f.shape[0]
    n_pairs = pair_users.numel()
    grad_u = torch.zeros_like(users_f)
    grad_i = torch.zeros_like(items_f)
    bounds = torch.searchsorted(pair_users, torch.arange(0, n_users + chunk_users, chunk_users).clamp_(max=n_users))
    total = 0.0
    for c, lo in enumerate(range(0, n_users, chunk_users)):
        hi = min(lo + chunk_users, n_users)
        a, b = int(bounds[c]), int(bounds[c + 1])
        block = users_f[lo:hi]  # [B, d]
        scores = (block @ items_f.T).view(-1)  # [B * I]
        local = (pair_users[a:b] - lo) * n_items
        flat_pos, flat_neg = local + pos[a:b], local + neg[a:b]
        diff = scores[flat_neg] - scores[flat_pos]  # s_uj - s_ui, [n]
        total += float(F.softplus(diff).sum())
        coef = torch.sigmoid(diff) / n_pairs  # dL/ds_uj = -dL/ds_ui
        g = torch.zeros_like(scores).index_add_(0, flat_neg, coef).index_add_(0, flat_pos, -coef)
        g = g.view(hi - lo, n_items)  # dL/dS, [B, I]
        grad_u[lo:hi] = g @ items_f
        grad_i += g.T @ block
    if weight_decay:
        user_count = torch.bincount(pair_users, minlength=n_users).to(users_f.dtype)  # [U]
        item_count = (torch.bincount(pos, minlength=n_items) + torch.bincount(neg, minlength=n_items)).to(items_f.dtype)
        sq_u, sq_i = users_f.square().sum(1), items_f.square().sum(1)
        total += weight_decay * float(user_count @ sq_u + item_count @ sq_i)
        grad_u += (2.0 * weight_decay / n_pairs) * user_count.unsqueeze(1) * users_f
        grad_i += (2.0 * weight_decay / n_pairs) * item_count.unsqueeze(1) * items_f
    return total / n_pairs, grad_u, grad_i


def train_mf(
    split: Split,
    settings: MFSettings = MFSettings(),
    seed: int = 0,
    *,
    ks: Sequence[int] = (10, 20, 50),
) -> MFResult:
    """Train BPR-MF on the training interactions; select the epoch on validation.

    Parameters
    ----------
    split : Split
        Its test items are blanked before training starts.
    settings : MFSettings
    seed : int
        Root seed (initialisation and per-epoch negatives).
    ks : sequence of int
        Cut-offs of the validation metrics (must include 10).

    Raises
    ------
    ConfigError
        The loss or the factors stop being finite (lower ``lr``); 10 missing from ``ks``.
    DataError
        No training interaction, or no user with a validation item.
    """
    if 10 not in ks:
        raise ConfigError(f"selection uses validation NDCG@10: ks must include 10, got {tuple(ks)}")
    visible = blank_test(split)
    n_users, n_items = int(visible.n_users), int(visible.n_items)
    counts = np.diff(visible.train_indptr)
    if counts.sum() == 0:
        raise DataError("the split has no training interaction: nothing to train MF on")
    # pairs grouped by user: each positive repeated `negatives` times
    k = settings.negatives
    pair_users_np = np.repeat(np.arange(n_users, dtype=np.int64), counts * k)
    pos = torch.from_numpy(np.repeat(visible.train_items, k))
    pair_users = torch.from_numpy(pair_users_np)

    gen = torch_generator(seed, "mf", "init")
    users_f = torch.nn.Parameter(torch.randn(n_users, settings.dim, generator=gen) * settings.init_std)
    items_f = torch.nn.Parameter(torch.randn(n_items, settings.dim, generator=gen) * settings.init_std)
    opt = torch.optim.Adam([users_f, items_f], lr=settings.lr, foreach=True)
    selector = ValidationSelector(settings.patience)
    history: list[dict[str, Any]] = []
    with torch.no_grad():
        for epoch in range(settings.max_epochs):
            neg_np = sample_outside(
                visible.train_indptr, visible.train_items, pair_users_np, n_items, numpy_rng(seed, "mf-negatives", epoch)
            )
            loss, grad_u, grad_i = bpr_loss_and_grads(
                users_f.data, items_f.data, pair_users, pos, torch.from_numpy(neg_np), settings.weight_decay, settings.chunk_users
            )
            if not math.isfinite(loss):
                raise ConfigError(f"MF diverged at epoch {epoch} (loss {loss}); lower the learning rate (now {settings.lr:g})")
            users_f.grad, items_f.grad = grad_u, grad_i
            opt.step()
            rec: dict[str, Any] = {"epoch": epoch, "loss": loss}
            history.append(rec)
            if (epoch + 1) % settings.eval_every == 0 or epoch == settings.max_epochs - 1:
                if not (bool(torch.isfinite(users_f).all()) and bool(torch.isfinite(items_f).all())):
                    raise ConfigError(f"MF factors are not finite at epoch {epoch}; lower the learning rate (now {settings.lr:g})")
                model = MFModel(users_f.data, items_f.data)
                val = evaluate_ranking(model.scorer(), visible, "val", ks=ks, chunk_size=settings.chunk_users)
                rec["val_ndcg10"] = val["NDCG@10"]
                snapshot = lambda: MFModel(users_f.data.clone(), items_f.data.clone())  # noqa: E731
                if selector.observe(epoch, val, snapshot):
                    break
    assert selector.snapshot is not None and selector.best_val is not None  # the last epoch is validated
    return MFResult(selector.snapshot, settings, selector.best_round, selector.best_val, history)


@dataclass(frozen=True)
class MFSelection:
    """The validation-selected MF run of a grid.

    Attributes
    ----------
    best : MFResult
    grid : tuple of (lr, weight_decay, validation NDCG@10, best epoch), in grid order.
    """

    best: MFResult
    grid: tuple[tuple[float, float, float, int], ...]


def select_mf(
    split: Split,
    lrs: Sequence[float] = (MFSettings.lr,),
    weight_decays: Sequence[float] = (MFSettings.weight_decay,),
    base: MFSettings = MFSettings(),
    seed: int = 0,
    *,
    ks: Sequence[int] = (10, 20, 50),
) -> MFSelection:
    """Train MF for every (lr, weight_decay) and keep the best by validation NDCG@10.

    Ties go to the first setting in grid order (lr-major). The test split is
    never seen (:func:`train_mf` blanks it).

    Raises
    ------
    ConfigError
        An empty grid or an invalid value.
    """
    lrs, weight_decays = tuple(lrs), tuple(weight_decays)
    if not lrs or not weight_decays:
        raise ConfigError("the MF grid is empty: give at least one learning rate and one weight decay")
    best: MFResult | None = None
    grid: list[tuple[float, float, float, int]] = []
    for lr in lrs:
        for wd in weight_decays:
            result = train_mf(split, dataclasses.replace(base, lr=lr, weight_decay=wd), seed, ks=ks)
            grid.append((float(lr), float(wd), result.val["NDCG@10"], result.best_epoch))
            if best is None or result.val["NDCG@10"] > best.val["NDCG@10"]:
                best = result
    assert best is not None
    return MFSelection(best, tuple(grid))
