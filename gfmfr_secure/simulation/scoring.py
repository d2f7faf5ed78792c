"""Client-side scoring of all items, batched over users (used for evaluation).

In a deployment each client scores items on its own device with its private state
and the broadcast model; the simulation does the same for a chunk of users at once,
with the project's :class:`~gfmfr_secure.models.recommender.Recommender` over all items
(:meth:`~gfmfr_secure.models.recommender.Recommender.full_sort_predict`), with the
clients' own heads when they keep them private.
"""

from __future__ import annotations

import torch

from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.models.backbones import BackboneSpec
from gfmfr_secure.models.params import SharedParams, unflatten_heads
from gfmfr_secure.models.recommender import Recommender

__all__ = ["broadcast_model", "score_users"]


def broadcast_model(shared: SharedParams, store: ClientStateStore, backbone: BackboneSpec, users: torch.Tensor, *, scorer: str) -> Recommender:
    """The broadcast model seen by ``users`` [B] over all ``I`` items: user slot ``j`` is ``users[j]``.

    Returns
    -------
    Recommender with ``U = B``, ``R = I``, the users' embeddings, their stored personal
    rows and the broadcast head (private heads are passed to ``full_sort_predict``); its
    parameters are the broadcast tensors themselves (``copy=False``): read them only.
    """
    users = users.to(torch.long)
    head = (shared.w1_user, shared.w1_item, shared.b1, shared.w2, shared.b2)
    personal = None
    if backbone.personal_items:
        if store.personal is not None and len(store.personal):
            owner, items, values = store.personal.user_rows(users.numpy())
            personal = (torch.from_numpy(owner * shared.n_items + items), values)
        else:
            personal = (torch.empty(0, dtype=torch.long), torch.empty(0, shared.latent_dim))
    # scoring only reads the parameters: the module holds the broadcast tensors, not copies
    return Recommender(backbone, scorer, shared.item_table, store.user_embedding[users], head, personal=personal, copy=False)


@torch.no_grad()
def score_users(shared: SharedParams, store: ClientStateStore, backbone: BackboneSpec, users: torch.Tensor, *, scorer: str) -> torch.Tensor:
    """Predicted interaction logits of ``users`` for every item.

    Parameters
    ----------
    users : int64 [B] distinct user ids.
    scorer : ``dot`` or ``mlp`` (:class:`~gfmfr_secure.config.ModelConfig`).

    Returns
    -------
    Tensor [B, I] logits (monotone in the predicted probability, so rankings are identical).

    Raises
    ------
    ConfigError
        On an unknown scorer.
    ValueError
        When the backbone has private heads and the store holds none.
    """
    users = users.to(torch.long)
    model = broadcast_model(shared, store, backbone, users, scorer=scorer)
    heads = None
    if backbone.private_head:
        if store.heads is None:
            raise ValueError("backbone has a private head but the client store holds none")
        heads = unflatten_heads(store.heads[users], shared.latent_dim)
    return model.full_sort_predict(torch.arange(users.numel()), heads)  # type: ignore[arg-type]
