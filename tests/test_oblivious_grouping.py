"""Oblivious grouping, client side: each client compares the broadcast centroids with its own
head change of the round that produced them, so a drift of the whole cohort between rounds
does not move everyone into one group."""

from __future__ import annotations

import numpy as np
import torch

from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out, make_synthetic
from gfmfr_secure.simulation.loop import oblivious_groups, run_federated


def _store(n_users: int) -> ClientStateStore:
    return ClientStateStore.create(
        n_users, 5, 2, user_embedding=True, personal_items=False, private_head=None, generator=torch.Generator().manual_seed(0)
    )


def test_centroids_are_compared_with_the_changes_of_their_own_round() -> None:
    store = _store(4)
    init = np.array([2, 2, 0, 1])
    cohort = np.array([0, 1, 2])
    first = torch.tensor([[1.0, 0.0], [9.0, 0.0], [5.0, 5.0]])
    assert oblivious_groups(store, cohort, first, None, init).tolist() == [2, 2, 0]  # no centroids yet: the random partition

    centroids = np.array([[0.0, 0.0], [10.0, 0.0]])  # the first round's group means
    drifted = first + torch.tensor([100.0, 100.0])  # this round, the whole cohort moved
    cohort = np.array([0, 1, 3])  # user 3 was not sampled before
    groups = oblivious_groups(store, cohort, drifted, centroids, init)
    assert groups.tolist() == [0, 1, 1]  # users 0 and 1 by their first-round change; user 3 keeps its random group
    # measured with this round's changes, every client would have chosen centroid 1
    assert torch.equal(store.head_offset[torch.tensor([0, 1, 3])], drifted)
    assert torch.equal(store.head_offset[2], first[2])


def test_oblivious_grouping_keeps_several_groups_over_rounds() -> None:
    # the default learning rates: the cohort's head change drifts between rounds
    data = make_synthetic(200, 100, n_groups=3, mean_interactions=20, text_dim=8, image_dim=6, seed=3)
    cfg = with_overrides(config_from_dict({"method": "gfmfr"}), [
        "train.rounds=5", "train.local_epochs=2", "train.selection=last", "fusion.server_epochs=1", "fusion.embedding_dim=8",
        "model.latent_dim=16", "grouping.method=oblivious", "grouping.num_groups=3", "grouping.min_group_size=2", "eval.ks=[10]",
    ])  # fmt: skip
    run = run_federated(cfg, data, leave_one_out(data), progress=False)
    sizes = [r["group_sizes"] for r in run.history]
    assert all(sum(s) == 200 for s in sizes)
    # compared with the current round's changes, every client was in one group from round 1 on
    assert all(max(s) <= 0.6 * 200 for s in sizes), sizes
