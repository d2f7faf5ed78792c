"""The recommender of every backbone, defined once: scoring function, loss and its terms.

Every trainer and scorer of the project builds this module (the compiled client loop,
:mod:`gfmfr_secure.client.kernel`, is the one fast path written by hand; a test holds it
to this module). Notation, for user ``u`` and item row ``i``::

    x_ui = C[i] + P_u[i]                          # [d]; P_u only with personal items (FedRAP)
    dot:  l_ui = (e_u + w2) . x_ui + b2           # w2 is the shared part of the user vector
    mlp:  l_ui = w2 . relu(W1u e_u + W1i x_ui + b1) + b2

``C`` is the shared item table, ``P_u`` the user's personal item table (stored sparsely:
rows never written read as zero), ``e_u`` the user embedding (zero and frozen when the
backbone has none) and ``(W1u, W1i, b1, w2, b2)`` the head, shared or the client's own.
Under ``dot`` the first layer ``(W1u, W1i, b1)`` is unused and frozen, and the hidden
size equals ``d``. The loss of one example ``j = (u, i, y, q)`` is::

    base_j = BCE(l_j, y_j)
             - alpha mean_d (P_u[i] - C[i])^2 + beta mean_d |C[i]|      (FedRAP regularisers)
             + 0.5 wd (|C[i]|^2 + |P_u[i]|^2)                           (dot scorer's L2 on rows)
    kl_j   = KL([q_j, 1 - q_j] || [sigmoid(l_j), sigmoid(-l_j)])          (distillation)
    loss   = mean_j (base_j + lambda kl_j)

with ``lambda`` the distillation weight of the step. Every term depends on example ``j``
alone, so per-example gradients (Opacus) are exact. The weight decay of the user vector
and of the head is the optimiser's (:meth:`Recommender.param_groups`), not a loss term.

The contract is RecBole's: :meth:`Recommender.calculate_loss`, :meth:`Recommender.predict`
and :meth:`Recommender.full_sort_predict`. Every parameter lives in an ``nn.Embedding``
or ``nn.Linear``, the layers Opacus computes per-example gradients for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gfmfr_secure.errors import ConfigError
from gfmfr_secure.models.backbones import BackboneSpec
from gfmfr_secure.models.params import flatten_heads

__all__ = ["SCORERS", "LossTerms", "LossWeights", "RecBatch", "Recommender", "check_scorer"]

#: Scoring functions the recommender knows (``model.scorer``).
SCORERS = ("dot", "mlp")


def check_scorer(scorer: str) -> str:
    """Return ``scorer`` if known; raise :class:`ConfigError` listing the known ones."""
    if scorer not in SCORERS:
        raise ConfigError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
    return scorer


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms besides the BCE (0 switches a term off).

    Attributes
    ----------
    alpha : FedRAP's ``-alpha MSE(P, C)``; used only by backbones with FedRAP's regularisers.
    beta : FedRAP's ``beta |C|_1 / d``; used only by backbones with FedRAP's regularisers.
    l2 : ``dot`` scorer: ``0.5 l2 (|C[i]|^2 + |P_u[i]|^2)`` per example
        (``train.embedding_weight_decay``); ignored by ``mlp``.
    """

    alpha: float = 0.0
    beta: float = 0.0
    l2: float = 0.0


@dataclass(frozen=True)
class RecBatch:
    """A batch of examples, indices local to the module.

    Attributes
    ----------
    users : int64 [B] user slot of each example (row of the module's user embedding).
    items : int64 [B] item row of each example (row of the module's item table).
    labels : float32 [B] 1 for an interaction, 0 for a negative.
    teacher : float32 [B] teacher preference ``q_j`` of each example, or None (no KL term).
    """

    users: torch.Tensor
    items: torch.Tensor
    labels: torch.Tensor
    teacher: torch.Tensor | None = None


@dataclass(frozen=True)
class LossTerms:
    """Per-example loss terms.

    Attributes
    ----------
    logits : [B] ``l_j``.
    base : [B] ``base_j`` (BCE and regularisers).
    kl : [B] ``kl_j``, or None when the batch has no teacher.
    """

    logits: torch.Tensor
    base: torch.Tensor
    kl: torch.Tensor | None


def _own(t: torch.Tensor, copy: bool) -> torch.Tensor:
    t = t.detach().float()
    return t.clone() if copy else t


def _table(values: torch.Tensor, trainable: bool, copy: bool) -> nn.Embedding:
    """``nn.Embedding`` over ``values`` [n, d] (a copy unless ``copy`` is False; no RNG drawn)."""
    return nn.Embedding.from_pretrained(_own(values, copy), freeze=not trainable)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, trainable: bool, copy: bool) -> nn.Linear:
    """``nn.Linear`` holding ``weight`` [out, in] and ``bias`` [out] (copies unless ``copy`` is False; no RNG drawn)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(_own(weight, copy), requires_grad=trainable)
    if bias is not None:
        layer.bias = nn.Parameter(_own(bias, copy), requires_grad=trainable)
    return layer


class Recommender(nn.Module):
    """One backbone's recommender over ``R`` item rows and ``U`` users sharing one head.

    A client's model is ``U = 1`` over the rows it trains; client-side scoring is the
    broadcast model over all ``I`` items and a chunk of users (one module per user when
    the heads are private); the centralised model is all users and items.

    Parameters
    ----------
    backbone : which parts exist and whether FedRAP's regularisers apply.
    scorer : ``"dot"`` or ``"mlp"``.
    item_rows : [R, d] shared item rows ``C`` (trained).
    user_embedding : [U, d] user embeddings ``e_u`` (trained when the backbone has them).
    head : ``(W1u [h, d], W1i [h, d], b1 [h], w2 [h], b2 [1])``; ``h = d`` under ``dot``.
    personal : ``(keys int64 [K], values [K, d])``, the stored personal rows keyed by
        ``user * R + row`` (strictly increasing), or None; required iff the backbone has
        personal items. Keys not stored read as zero rows.
    weights : loss weights (:class:`LossWeights`).
    copy : the module trains copies of the given tensors (default). False: its parameters
        are the given tensors themselves, for scoring without copying; an optimiser step
        would then write into them.

    Raises
    ------
    ConfigError
        On an unknown scorer, shapes that do not fit, or personal rows missing or given
        against the backbone.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        scorer: str,
        item_rows: torch.Tensor,
        user_embedding: torch.Tensor,
        head: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        *,
        personal: tuple[torch.Tensor, torch.Tensor] | None = None,
        weights: LossWeights = LossWeights(),
        copy: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.scorer = check_scorer(scorer)
        self.dot = scorer == "dot"
        w1u, w1i, b1, w2, b2 = head
        n_rows, d = item_rows.shape
        h = w1i.shape[0]
        if user_embedding.ndim != 2 or user_embedding.shape[1] != d:
            raise ConfigError(f"user_embedding must be [U, {d}], got {tuple(user_embedding.shape)}")
        if w1u.shape != (h, d) or w1i.shape != (h, d) or b1.shape != (h,) or w2.shape != (h,) or b2.numel() != 1:
            shapes = [tuple(t.shape) for t in head]
            raise ConfigError(f"head shapes {shapes} do not fit d = {d} (expected [h, d], [h, d], [h], [h], [1])")
        if self.dot and h != d:
            raise ConfigError(f"the dot scorer needs hidden size = latent size, got h = {h}, d = {d}")
        if (personal is not None) != backbone.personal_items:
            raise ConfigError(f"backbone {backbone.name!r} {'needs' if backbone.personal_items else 'has no'} personal item rows")
        self.n_rows, self.latent_dim = int(n_rows), int(d)
        self.item_embedding = _table(item_rows, True, copy)
        self.user_embedding = _table(user_embedding, backbone.user_embedding, copy)
        self.user_layer = _linear(w1u, None, not self.dot, copy)
        self.item_layer = _linear(w1i, b1, not self.dot, copy)
        self.output_layer = _linear(w2.reshape(1, -1), b2.reshape(1), True, copy)
        self.personal_embedding: nn.Embedding | None = None
        if personal is not None:
            keys, values = personal
            keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1)
            if values.shape != (keys.numel(), d):
                raise ConfigError(f"personal values must be [{keys.numel()}, {d}], got {tuple(values.shape)}")
            if keys.numel() and (bool((keys[1:] <= keys[:-1]).any()) or int(keys[0]) < 0 or int(keys[-1]) >= user_embedding.shape[0] * n_rows):
                raise ConfigError(f"personal keys must be strictly increasing in [0, U * R) = [0, {user_embedding.shape[0] * n_rows})")
            self.register_buffer("personal_keys", keys, persistent=False)
            self.personal_embedding = _table(values, True, copy)
        fedrap = backbone.fedrap_regularisers
        self.alpha = float(weights.alpha) if fedrap and personal is not None else 0.0
        self.beta = float(weights.beta) if fedrap else 0.0
        self.l2 = float(weights.l2) if self.dot else 0.0

    # ------------------------------------------------------------------ parameters

    def param_groups(self, *, lr_head: float, weight_decay: float, lr_user: float, user_weight_decay: float, lr_items: float) -> list[dict]:
        """``torch.optim.SGD`` parameter groups of the trained parameters.

        ``mlp``: head and user embedding at ``lr_head`` with ``weight_decay``. ``dot``: the
        user vector (``e_u`` and ``w2``) at ``lr_user`` with ``user_weight_decay``, ``b2`` at
        ``lr_user`` without decay. Item rows (shared and personal) at ``lr_items``, no
        decay (their L2 is a loss term). Frozen parameters are left out.
        """
        user = [self.user_embedding.weight] if self.backbone.user_embedding else []
        tables = [self.item_embedding.weight] + ([self.personal_embedding.weight] if self.personal_embedding is not None else [])
        if self.dot:
            groups = [
                {"params": [self.output_layer.weight, *user], "lr": lr_user, "weight_decay": user_weight_decay},
                {"params": [self.output_layer.bias], "lr": lr_user, "weight_decay": 0.0},
            ]
        else:
            head = [self.user_layer.weight, self.item_layer.weight, self.item_layer.bias, self.output_layer.weight, self.output_layer.bias]
            groups = [{"params": head + user, "lr": lr_head, "weight_decay": weight_decay}]
        return groups + [{"params": tables, "lr": lr_items, "weight_decay": 0.0}]

    def head_flat(self) -> torch.Tensor:
        """The head as one [1, H] row (order of :meth:`SharedParams.head_flat`), detached."""
        return flatten_heads(
            self.user_layer.weight.detach()[None],
            self.item_layer.weight.detach()[None],
            self.item_layer.bias.detach()[None],
            self.output_layer.weight.detach().reshape(1, -1),
            self.output_layer.bias.detach().reshape(1),
        )

    # ------------------------------------------------------------------ scoring

    def _personal_rows(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor | None:
        """``P_u[i]`` of each pair: [B, d] (zero rows where none is stored), or None."""
        if self.personal_embedding is None:
            return None
        keys = users * self.n_rows + items
        if self.personal_keys.numel() == 0:
            return torch.zeros(keys.numel(), self.latent_dim)
        pos = torch.searchsorted(self.personal_keys, keys).clamp_(max=self.personal_keys.numel() - 1)
        found = self.personal_keys[pos] == keys
        rows = self.personal_embedding(pos)
        return rows if bool(found.all()) else torch.where(found[:, None], rows, torch.zeros_like(rows))

    def _logits(self, e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``l`` for user embeddings ``e`` [B, d] and item vectors ``x`` [B, d]: [B]."""
        if self.dot:
            return self.output_layer(x).squeeze(-1) + (e * x).sum(-1)
        return self.output_layer(torch.relu(self.user_layer(e) + self.item_layer(x))).squeeze(-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of the pairs ``(users[j], items[j])``.

        Parameters
        ----------
        users, items : int64 [B] user slots and item rows.

        Returns
        -------
        torch.Tensor
            [B] logits ``l_ui``.
        """
        return self.loss_inputs(users, items)[0]

    def loss_inputs(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits [B], shared rows ``C[i]`` [B, d], personal rows ``P_u[i]`` [B, d] or None)."""
        c = self.item_embedding(items)
        p = self._personal_rows(users, items)
        x = c + p if p is not None else c
        return self._logits(self.user_embedding(users), x), c, p

    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of the pairs ``(users[j], items[j])``: [B] (RecBole's ``predict``)."""
        return self.forward(users, items)

    def full_sort_predict(
        self,
        users: torch.Tensor,
        heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits of ``users`` [B] (user slots) for every item row: [B, R].

        Written as matrix products over the whole table (the personal rows are added
        where stored), so that scoring every item costs one ``[B, d] x [d, R]`` product
        (``dot``) or one ``[B, R, h]`` activation (``mlp``); a test holds it to
        :meth:`predict`.

        Parameters
        ----------
        users : int64 [B] user slots, distinct.
        heads : the users' own heads ``(W1u [B, h, d], W1i [B, h, d], b1 [B, h], w2 [B, h],
            b2 [B])``, to score many clients that each keep a private head at once; None =
            the module's head.
        """
        users = users.to(torch.long)
        if heads is None:
            w1u, w1i = self.user_layer.weight, self.item_layer.weight  # [h, d]
            b1, w2, b2 = self.item_layer.bias, self.output_layer.weight.reshape(-1), self.output_layer.bias  # [h], [h], [1]
        else:
            w1u, w1i, b1, w2, b2 = heads
            if w1i.shape[0] != users.numel():
                raise ConfigError(f"heads hold {w1i.shape[0]} users' heads for {users.numel()} users")
            b2 = b2.reshape(-1, 1)  # [B, 1]
        table = self.item_embedding.weight  # [R, d]
        e = self.user_embedding(users)  # [B, d]
        owner = items = values = None
        if self.personal_embedding is not None and self.personal_keys.numel():
            slot_of = torch.full((self.user_embedding.num_embeddings,), -1, dtype=torch.long)
            slot_of[users] = torch.arange(users.numel())
            owner = slot_of[self.personal_keys // self.n_rows]
            keep = owner >= 0
            owner, items, values = owner[keep], (self.personal_keys % self.n_rows)[keep], self.personal_embedding.weight[keep]
        if self.dot:
            vec = e + w2  # [B, d]
            scores = vec @ table.T + b2  # [B, R]
            if owner is not None:
                scores[owner, items] += (values * vec[owner]).sum(1)
            return scores
        item_term = torch.matmul(table if heads is None else table.unsqueeze(0), w1i.transpose(-1, -2))  # [R, h] or [B, R, h]
        user_term = torch.matmul(w1u, e.unsqueeze(-1)).squeeze(-1) + b1  # [B, h]
        # [B, R, h], written once
        z = item_term.add_(user_term.unsqueeze(-2)) if item_term.ndim == 3 else item_term + user_term.unsqueeze(-2)
        if owner is not None:
            w1i_rows = w1i if heads is None else w1i[owner]  # [h, d] or [n, h, d]
            z[owner, items] += torch.matmul(w1i_rows, values.unsqueeze(-1)).squeeze(-1)
        return torch.matmul(torch.relu_(z), w2.unsqueeze(-1)).squeeze(-1) + b2

    # ------------------------------------------------------------------ loss

    def loss_terms(self, batch: RecBatch) -> LossTerms:
        """Per-example ``base_j`` and ``kl_j`` (module docstring) of ``batch``."""
        logits, c, p = self.loss_inputs(batch.users, batch.items)
        base = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        if self.alpha and p is not None:
            base = base - self.alpha * (p - c).square().mean(1)
        if self.beta:
            base = base + self.beta * c.abs().mean(1)
        if self.l2:
            sq = c.square().sum(1) + (p.square().sum(1) if p is not None else 0.0)
            base = base + (0.5 * self.l2) * sq
        kl = None
        if batch.teacher is not None:
            q = batch.teacher
            kl = torch.xlogy(q, q) + torch.xlogy(1 - q, 1 - q) - q * F.logsigmoid(logits) - (1 - q) * F.logsigmoid(-logits)
        return LossTerms(logits=logits, base=base, kl=kl)

    def per_example_loss(self, batch: RecBatch, distill_weight: float = 0.0) -> torch.Tensor:
        """``base_j + lambda kl_j``: [B] (the KL term only with a teacher and ``lambda != 0``)."""
        terms = self.loss_terms(batch)
        if terms.kl is None or not distill_weight:
            return terms.base
        return terms.base + distill_weight * terms.kl

    def calculate_loss(self, batch: RecBatch, distill_weight: float = 0.0) -> torch.Tensor:
        """The batch's loss ``mean_j (base_j + lambda kl_j)``, a scalar (RecBole's ``calculate_loss``)."""
        return self.per_example_loss(batch, distill_weight).mean()
