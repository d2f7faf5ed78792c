"""Shared test setup for client training: a backbone, broadcast parameters and a client store."""

from __future__ import annotations

import torch

from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.models import get_backbone, init_shared_params


def make_setup(name: str, n_users: int, n_items: int, dim: int, scorer: str = "mlp"):
    """(backbone spec, shared params, client store) with fixed seeds 1 (shared) and 2 (users)."""
    spec = get_backbone(name)
    shared = init_shared_params(n_items, dim, torch.Generator().manual_seed(1), 0.1 if scorer == "dot" else 0.01, scorer=scorer)
    store = ClientStateStore.create(
        n_users, n_items, dim,
        user_embedding=spec.user_embedding,
        personal_items=spec.personal_items,
        private_head=shared.head_flat() if spec.private_head else None,
        generator=torch.Generator().manual_seed(2),
    )
    return spec, shared, store
