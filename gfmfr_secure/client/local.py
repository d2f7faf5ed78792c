"""Per-client local training with plain autograd: what one client on its own machine runs.

This is the reference implementation of the client's round: the project's
:class:`~gfmfr_secure.models.recommender.Recommender` over the client's own rows,
``torch.optim.SGD`` and the module's loss. :func:`gfmfr_secure.client.cohort.train_cohort`
must give the same update for the same inputs (tested); it is the fast path for
simulation. :func:`client_model` and :func:`client_update` are shared with the DP-SGD
client (:mod:`gfmfr_secure.client.dpsgd`).
"""

from __future__ import annotations

import numpy as np
import torch

from gfmfr_secure.client.plan import epoch_orders
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.models.backbones import BackboneSpec
from gfmfr_secure.models.params import SharedParams, unflatten_heads
from gfmfr_secure.models.recommender import LossWeights, RecBatch, Recommender
from gfmfr_secure.types import CohortUpdate, LocalHyper

__all__ = ["client_model", "client_sgd", "client_update", "train_client"]


def client_model(
    shared: SharedParams, store: ClientStateStore, backbone: BackboneSpec, client: int, local_items: np.ndarray, hyper: LocalHyper
) -> Recommender:
    """The client's model over its local rows: user slot 0, item row ``r`` = ``local_items[r]``.

    Parameters
    ----------
    local_items : int64 [R] sorted item ids the client trains.

    Returns
    -------
    Recommender with ``U = 1`` and ``R`` rows: copies of the broadcast rows and head (or
    the client's private head), its user embedding and its personal rows.

    Raises
    ------
    ValueError
        When the backbone has a private head and the store holds none.
    """
    d, n_items = shared.latent_dim, shared.n_items
    li = torch.from_numpy(np.asarray(local_items, dtype=np.int64))
    if backbone.private_head:
        if store.heads is None:
            raise ValueError("backbone has a private head but the client store holds none")
        head = tuple(t[0] for t in unflatten_heads(store.heads[client : client + 1], d))
    else:
        head = (shared.w1_user, shared.w1_item, shared.b1, shared.w2, shared.b2)
    personal = None
    if backbone.personal_items:
        personal = (torch.arange(li.numel()), store.personal.gather(client * n_items + np.asarray(local_items, dtype=np.int64)))
    return Recommender(
        backbone,
        hyper.scorer,
        shared.item_table[li],
        store.user_embedding[client : client + 1],
        head,  # type: ignore[arg-type]
        personal=personal,
        weights=LossWeights(alpha=hyper.alpha, beta=hyper.beta, l2=hyper.embedding_weight_decay),
    )


def client_sgd(model: Recommender, hyper: LocalHyper) -> list[dict]:
    """SGD parameter groups of a client's model for this round's ``hyper``."""
    return model.param_groups(
        lr_head=hyper.lr_network,
        weight_decay=hyper.weight_decay,
        lr_user=hyper.lr_user,
        user_weight_decay=hyper.embedding_weight_decay,
        lr_items=hyper.lr_items,
    )


@torch.no_grad()
def client_update(
    model: Recommender,
    shared: SharedParams,
    store: ClientStateStore,
    backbone: BackboneSpec,
    client: int,
    local_items: np.ndarray,
    *,
    n_samples: int,
    group: int,
    loss: float,
) -> CohortUpdate:
    """Write the trained model's private parts back into ``store``; return its upload.

    Returns
    -------
    CohortUpdate with a single client: item deltas of ``local_items``, the head after
    training (and its delta when shared).
    """
    n_items = shared.n_items
    local_items = np.asarray(local_items, dtype=np.int64)
    head_after = model.head_flat()
    if backbone.user_embedding:
        store.user_embedding[client] = model.user_embedding.weight.detach()[0]
    if model.personal_embedding is not None:
        store.personal.put(client * n_items + local_items, model.personal_embedding.weight.detach())
    if backbone.private_head:
        store.heads[client] = head_after[0]
    item_delta = model.item_embedding.weight.detach() - shared.item_table[torch.from_numpy(local_items)]
    return CohortUpdate(
        clients=np.array([client], dtype=np.int64),
        n_samples=np.array([n_samples], dtype=np.int64),
        row_ptr=np.array([0, local_items.size], dtype=np.int64),
        row_items=local_items,
        item_delta=item_delta,
        head_delta=None if backbone.private_head else head_after - shared.head_flat()[None],
        head_after=head_after,
        group=np.array([group], dtype=np.int64),
        loss=np.array([loss]),
    )


def train_client(
    shared: SharedParams,
    store: ClientStateStore,
    backbone: BackboneSpec,
    client: int,
    items: np.ndarray,
    labels: np.ndarray,
    hyper: LocalHyper,
    *,
    teacher_row: torch.Tensor | None = None,
    group: int = -1,
) -> CohortUpdate:
    """Train one client for one round.

    Parameters
    ----------
    shared : broadcast global parameters (not modified).
    store : client state; only this client's entries are read and written.
    client : user id.
    items, labels : int64 [m], float32 [m] this round's samples (positives + negatives).
    teacher_row : [I] the preference scores of the client's group, or None.
    group : the client's group (-1 = none: no distillation).

    Returns
    -------
    CohortUpdate with a single client.
    """
    items = np.asarray(items, dtype=np.int64)
    local_items, inverse = np.unique(items, return_inverse=True)
    rows_all = torch.from_numpy(inverse.reshape(-1))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    model = client_model(shared, store, backbone, client, local_items, hyper)
    opt = torch.optim.SGD(client_sgd(model, hyper))
    distilling = teacher_row is not None and hyper.distill > 0 and group >= 0
    q_all = teacher_row[torch.from_numpy(items)].float() if distilling else None
    ema = float(store.ema_ratio[client])

    orders = epoch_orders(np.array([client]), np.array([items.size]), epochs=hyper.epochs, seed=hyper.shuffle_seed)
    batches = [order[b : b + hyper.batch_size] for order in orders for b in range(0, items.size, hyper.batch_size)]
    losses = []
    for batch in batches:
        s = torch.from_numpy(batch)
        rows = rows_all[s]
        terms = model.loss_terms(RecBatch(torch.zeros_like(rows), rows, y_all[s], q_all[s] if q_all is not None else None))
        base = terms.base.mean()
        loss = base
        if terms.kl is not None:
            kl = terms.kl.mean()
            ratio = min(base.item() / (kl.item() + 1e-8), hyper.max_ratio)
            ema = ratio if np.isnan(ema) else hyper.ema_decay * ema + (1 - hyper.ema_decay) * ratio
            loss = base + (ema * hyper.distill) * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    store.ema_ratio[client] = ema
    return client_update(model, shared, store, backbone, client, local_items, n_samples=items.size, group=group, loss=float(np.mean(losses)) if losses else 0.0)
