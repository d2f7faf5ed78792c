"""Small shared vocabulary: what crosses the client/server boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["AdversaryView", "AggregateResult", "CohortUpdate", "Exposure", "LocalHyper"]


@dataclass(frozen=True)
class LocalHyper:
    """Hyperparameters of one round of local training (already evaluated for the round).

    Attributes
    ----------
    lr_network : learning rate of the head and the user embedding.
    lr_items : learning rate of the item-table rows (shared and personal).
    weight_decay : L2 on the head and user embedding (not on item-table rows).
    alpha, beta : FedRAP's regulariser weights for this round.
    distill : weight of the distillation term this round (``cos(pi t / 2T)``), 0 = off.
    ema_decay : decay of each client's running base/KL loss ratio.
    max_ratio : cap on each batch's base/KL ratio before it enters the running mean.
    batch_size, epochs : local minibatch size and epochs.
    shuffle_seed : per-round seed of the counter-based shuffle (identical for both paths).
    scorer : ``dot`` or ``mlp`` (:class:`~gfmfr_secure.config.ModelConfig`).
    lr_user : ``dot``: learning rate of the user vector ``e_u + w2`` and of ``b2``.
    embedding_weight_decay : ``dot``: L2 on the user vector and the batch's item rows.
    """

    lr_network: float
    lr_items: float
    weight_decay: float
    alpha: float
    beta: float
    distill: float
    ema_decay: float
    max_ratio: float
    batch_size: int
    epochs: int
    shuffle_seed: int
    scorer: str = "mlp"
    lr_user: float = 0.0
    embedding_weight_decay: float = 0.0


@dataclass(frozen=True, eq=False)
class CohortUpdate:
    """The uploads of a cohort of clients, stacked (one row per client).

    Attributes
    ----------
    clients : int64 [n] user ids.
    n_samples : int64 [n] training samples (positives + negatives) each client used.
    row_ptr : int64 [n + 1] CSR pointer of each client's touched item rows.
    row_items : int64 [R] item ids of the touched rows (sorted within a client).
    item_delta : float32 [R, d] change of the shared item table on those rows; rows
        not listed are unchanged (their delta is zero).
    head_delta : float32 [n, H] change of the shared head, or None when the head is private.
    head_after : float32 [n, H] the client's head after training (grouping feature), or None.
    group : int64 [n] group the client placed itself in (oblivious grouping), -1 if none.
    loss : float64 [n] mean training loss per client.
    """

    clients: np.ndarray
    n_samples: np.ndarray
    row_ptr: np.ndarray
    row_items: np.ndarray
    item_delta: torch.Tensor
    head_delta: torch.Tensor | None
    head_after: torch.Tensor | None
    group: np.ndarray
    loss: np.ndarray

    def __len__(self) -> int:
        return int(self.clients.size)

    @property
    def row_owner(self) -> np.ndarray:
        """int64 [R]: cohort position of each touched row."""
        return np.repeat(np.arange(self.clients.size), np.diff(self.row_ptr))

    def dense_item_delta(self, index: int, n_items: int) -> torch.Tensor:
        """The full [I, d] item-table delta of the client at cohort position ``index``."""
        out = torch.zeros(n_items, self.item_delta.shape[1])
        a, b = int(self.row_ptr[index]), int(self.row_ptr[index + 1])
        out[torch.from_numpy(self.row_items[a:b])] = self.item_delta[a:b]
        return out


class Exposure:
    """What an aggregation backend lets the server learn."""

    PER_CLIENT = "per-client"  # every individual update (plain)
    GROUP_SUMS = "group-sums"  # per-group sums and counts only (secure backends)


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """What the server receives from an aggregation backend for one round.

    Attributes
    ----------
    n_clients : number of clients aggregated.
    weight_total : sum of aggregation weights.
    item_sum : [I, d] weighted sum of item-table deltas.
    head_sum : [H] weighted sum of head deltas (None when heads are private).
    group_counts : [G] number of clients per group (None when no groups were used).
    group_item_sum : [G, I, d] per-group (unweighted) sums of item-table deltas.
    group_head_sum : [G, H] per-group sums of head deltas.
    per_client : the individual updates, only when the backend exposes them.
    """

    n_clients: int
    weight_total: float
    item_sum: torch.Tensor
    head_sum: torch.Tensor | None
    group_counts: torch.Tensor | None = None
    group_item_sum: torch.Tensor | None = None
    group_head_sum: torch.Tensor | None = None
    per_client: CohortUpdate | None = None


@dataclass(frozen=True, eq=False)
class AdversaryView:
    """Everything one adversary observed in one round (the only input an attack gets).

    Attributes
    ----------
    round : round index.
    backend : aggregation backend name.
    exposure : one of :class:`Exposure`'s values.
    observer : "server" (honest-but-curious aggregator) or "outsider" (released outputs only).
    received : what the observer received (aggregates, or per-client updates under plain).
    released : what the server published after the round (global model, group preferences, ...).
    meta : free-form facts about the round (cohort size, grouping method, ...).
    truth : ground truth for scoring attacks (e.g. the group each client chose); never
        an attack's input, and not something the observer saw.
    """

    round: int
    backend: str
    exposure: str
    observer: str
    received: dict[str, Any] = field(default_factory=dict)
    released: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    truth: dict[str, Any] = field(default_factory=dict)
