"""Client-side scoring equals the model's forward pass, item by item."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.models import get_backbone, init_shared_params
from gfmfr_secure.models.params import unflatten_heads
from gfmfr_secure.rng import numpy_rng, torch_generator
from gfmfr_secure.simulation.scoring import score_users

U, I, D = 5, 30, 6


@pytest.mark.parametrize("scorer", ["mlp", "dot"])
@pytest.mark.parametrize("name", ["fedrap", "fedncf", "pfedrec"])
def test_scores_match_direct_forward(name: str, scorer: str) -> None:
    spec = get_backbone(name)
    shared = init_shared_params(I, D, torch_generator(0, "t"), scorer=scorer)
    store = ClientStateStore.create(U, I, D, user_embedding=spec.user_embedding, personal_items=spec.personal_items,
                                    private_head=shared.head_flat() if spec.private_head else None, generator=torch_generator(0, "u"))
    if spec.personal_items:
        keys = np.unique(numpy_rng(0, "k").integers(0, U * I, 40))
        store.personal.put(keys, torch.randn(keys.size, D, generator=torch_generator(0, "p")))
    if spec.private_head:
        store.heads += 0.1 * torch.randn(store.heads.shape, generator=torch_generator(0, "h"))
    users = torch.tensor([3, 0, 4])
    got = score_users(shared, store, spec, users, scorer=scorer)
    for row, u in enumerate(users.tolist()):
        if spec.private_head:
            w1u, w1i, b1, w2, b2 = (t[0] for t in unflatten_heads(store.heads[u : u + 1], D))
        else:
            w1u, w1i, b1, w2, b2 = shared.w1_user, shared.w1_item, shared.b1, shared.w2, shared.b2
        p = store.personal.gather(u * I + np.arange(I)) if spec.personal_items else torch.zeros(I, D)
        x = shared.item_table + p
        if scorer == "dot":
            expected = x @ (store.user_embedding[u] + w2) + b2
        else:
            expected = torch.relu(x @ w1i.T + w1u @ store.user_embedding[u] + b1) @ w2 + b2
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)


def test_unknown_scorer_is_refused() -> None:
    spec = get_backbone("fedncf")
    shared = init_shared_params(I, D, torch_generator(0, "t"))
    store = ClientStateStore.create(U, I, D, user_embedding=True, personal_items=False, private_head=None, generator=torch_generator(0, "u"))
    with pytest.raises(ConfigError, match="unknown scorer 'cosine'; known: dot, mlp"):
        score_users(shared, store, spec, torch.tensor([0]), scorer="cosine")
