"""Per-client local training with plain autograd: what one client on its own machine runs.

This is the reference implementation of the client's round: a small module over the
client's own rows, ``torch.optim.SGD`` and the loss written with torch's functional
ops. :func:`gfmfr_secure.client.cohort.train_cohort` must give the same update for the
same inputs (tested); it is the fast path for simulation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gfmfr_secure.client.plan import epoch_orders
from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.models.backbones import BackboneSpec
from gfmfr_secure.models.params import SharedParams, flatten_heads, unflatten_heads
from gfmfr_secure.types import CohortUpdate, LocalHyper

__all__ = ["train_client"]


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
    d, n_items = shared.latent_dim, shared.n_items
    items = np.asarray(items, dtype=np.int64)
    local_items, inverse = np.unique(items, return_inverse=True)
    rows_all = torch.from_numpy(inverse.reshape(-1))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    li = torch.from_numpy(local_items)

    c_loc = torch.nn.Parameter(shared.item_table[li].clone())
    p_loc = (
        torch.nn.Parameter(store.personal.gather(client * n_items + local_items)) if backbone.personal_items else None
    )
    if backbone.private_head:
        head = [t[0].clone() for t in unflatten_heads(store.heads[client : client + 1], d)]
    else:
        head = [shared.w1_user.clone(), shared.w1_item.clone(), shared.b1.clone(), shared.w2.clone(), shared.b2.clone()]
    w1u, w1i, b1, w2, b2 = (torch.nn.Parameter(t) for t in head)
    emb = torch.nn.Parameter(store.user_embedding[client].clone())

    tables = [c_loc] + ([p_loc] if p_loc is not None else [])
    dot = hyper.scorer == "dot"
    if dot:  # the user vector e + w2 and the bias at the user lr; the unused first layer stays out
        user_vec = [w2] + ([emb] if backbone.user_embedding else [])
        groups = [
            {"params": user_vec, "lr": hyper.lr_user, "weight_decay": hyper.embedding_weight_decay},
            {"params": [b2], "lr": hyper.lr_user, "weight_decay": 0.0},
        ]
    else:
        dense = [w1u, w1i, b1, w2, b2] + ([emb] if backbone.user_embedding else [])
        groups = [{"params": dense, "lr": hyper.lr_network, "weight_decay": hyper.weight_decay}]
    opt = torch.optim.SGD(groups + [{"params": tables, "lr": hyper.lr_items, "weight_decay": 0.0}])
    distilling = teacher_row is not None and hyper.distill > 0 and group >= 0
    q_all = teacher_row[torch.from_numpy(items)].float() if distilling else None
    alpha, beta = (hyper.alpha, hyper.beta) if backbone.fedrap_regularisers else (0.0, 0.0)
    ema = float(store.ema_ratio[client])

    orders = epoch_orders(np.array([client]), np.array([items.size]), epochs=hyper.epochs, seed=hyper.shuffle_seed)
    batches = [order[b : b + hyper.batch_size] for order in orders for b in range(0, items.size, hyper.batch_size)]
    losses = []
    for batch in batches:
        s = torch.from_numpy(batch)
        rows = rows_all[s]
        y = y_all[s]
        c_b = c_loc[rows]
        x = c_b + p_loc[rows] if p_loc is not None else c_b
        if dot:
            logit = x @ (emb + w2) + b2
        else:
            z = x @ w1i.T + (w1u @ emb + b1)
            logit = torch.relu(z) @ w2 + b2
        base = F.binary_cross_entropy_with_logits(logit, y)
        if dot and hyper.embedding_weight_decay:  # L2 on the batch's rows, a mean like the loss
            sq = (c_b**2).sum(1) + ((p_loc[rows] ** 2).sum(1) if p_loc is not None else 0.0)
            base = base + 0.5 * hyper.embedding_weight_decay * sq.mean()
        if alpha and p_loc is not None:
            base = base - alpha * F.mse_loss(p_loc[rows], c_b)
        if beta:
            base = base + beta * F.l1_loss(c_b, torch.zeros_like(c_b))
        loss = base
        if distilling:
            q = q_all[s]
            log_pred = torch.stack([F.logsigmoid(logit), F.logsigmoid(-logit)], dim=1)
            target = torch.stack([q, 1 - q], dim=1)
            kl = F.kl_div(log_pred, target, reduction="batchmean")
            ratio = min(base.item() / (kl.item() + 1e-8), hyper.max_ratio)
            ema = ratio if np.isnan(ema) else hyper.ema_decay * ema + (1 - hyper.ema_decay) * ratio
            loss = base + (ema * hyper.distill) * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    with torch.no_grad():
        head_after = flatten_heads(w1u[None], w1i[None], b1[None], w2[None], b2.reshape(1))
        if backbone.user_embedding:
            store.user_embedding[client] = emb.detach()
        store.ema_ratio[client] = ema
        if p_loc is not None:
            store.personal.put(client * n_items + local_items, p_loc.detach())
        if backbone.private_head:
            store.heads[client] = head_after[0]
        item_delta = c_loc.detach() - shared.item_table[li]
    return CohortUpdate(
        clients=np.array([client], dtype=np.int64),
        n_samples=np.array([items.size], dtype=np.int64),
        row_ptr=np.array([0, local_items.size], dtype=np.int64),
        row_items=local_items,
        item_delta=item_delta,
        head_delta=None if backbone.private_head else head_after - shared.head_flat()[None],
        head_after=head_after,
        group=np.array([group], dtype=np.int64),
        loss=np.array([np.mean(losses) if losses else 0.0]),
    )
