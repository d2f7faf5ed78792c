"""Client-side scoring of all items, batched over users (used for evaluation).

In a deployment each client scores items on its own device with its private state
and the broadcast model; the simulation does the same for a chunk of users at once.
"""

from __future__ import annotations

import torch

from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.models.backbones import BackboneSpec
from gfmfr_secure.models.params import SharedParams, unflatten_heads

__all__ = ["score_users"]


@torch.no_grad()
def score_users(
    shared: SharedParams, store: ClientStateStore, backbone: BackboneSpec, users: torch.Tensor, *, scorer: str = "mlp"
) -> torch.Tensor:
    """Predicted interaction logits of ``users`` for every item.

    Parameters
    ----------
    users : int64 [B] user ids.
    scorer : ``dot`` or ``mlp`` (:class:`~gfmfr_secure.config.ModelConfig`).

    Returns
    -------
    Tensor [B, I] logits (monotone in the predicted probability, so rankings are identical).
    """
    users = users.to(torch.long)
    table = shared.item_table  # [I, d]
    emb = store.user_embedding[users]  # [B, d]
    if scorer == "dot":
        return _score_dot(shared, store, backbone, users, emb)
    if scorer != "mlp":
        raise ValueError(f"unknown scorer {scorer!r}; known: dot, mlp")
    if backbone.private_head:
        w1u, w1i, b1, w2, b2 = unflatten_heads(store.heads[users], shared.latent_dim)
        z = torch.matmul(table.unsqueeze(0), w1i.transpose(1, 2))  # [B, I, h]
        z += (torch.bmm(w1u, emb.unsqueeze(2)).squeeze(2) + b1).unsqueeze(1)
        return torch.bmm(torch.relu_(z), w2.unsqueeze(2)).squeeze(2) + b2.unsqueeze(1)
    item_term = table @ shared.w1_item.T  # [I, h]
    user_term = emb @ shared.w1_user.T + shared.b1  # [B, h]
    z = item_term.unsqueeze(0) + user_term.unsqueeze(1)  # [B, I, h], written once
    if backbone.personal_items and store.personal is not None and len(store.personal):
        owner, items, values = store.personal.user_rows(users.numpy())
        if owner.size:
            z[torch.from_numpy(owner), torch.from_numpy(items)] += values @ shared.w1_item.T
    return torch.relu_(z) @ shared.w2 + shared.b2


def _score_dot(shared: SharedParams, store: ClientStateStore, backbone: BackboneSpec, users: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """``(e_u + w2) . (C[i] + P_u[i]) + b2`` for every item: [B, I]."""
    if backbone.private_head:
        _, _, _, w2, b2 = unflatten_heads(store.heads[users], shared.latent_dim)  # [B, d], [B]
    else:
        w2, b2 = shared.w2.unsqueeze(0), shared.b2.reshape(1)
    vec = emb + w2  # [B, d]
    scores = vec @ shared.item_table.T + b2.reshape(-1, 1)  # [B, I]
    if backbone.personal_items and store.personal is not None and len(store.personal):
        owner, items, values = store.personal.user_rows(users.numpy())
        if owner.size:
            o = torch.from_numpy(owner)
            scores[o, torch.from_numpy(items)] += (values * vec[o]).sum(dim=1)
    return scores
