"""The singleton-group attack on oblivious grouping, and the minimum group size that stops it.

A group of one client releases that client's exact update as its "group sum". A server that
places a centroid next to one client (or plain bad luck on a small cohort) gets such a group.
With ``grouping.min_group_size`` the group counts are summed first, groups below the floor are
merged into their nearest group, and no released group sum covers fewer clients than the floor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out, make_synthetic
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.server.grouping import merge_small_groups
from gfmfr_secure.roles import client as client_role
from gfmfr_secure.roles.active import ActiveServer
from gfmfr_secure.simulation.loop import run_federated

SMALL = [
    "train.rounds=2", "train.local_epochs=1", "train.batch_size=16", "train.lr=0.05", "train.item_lr_scale=20",
    "fusion.server_epochs=1", "fusion.embedding_dim=16", "model.latent_dim=8", "grouping.num_groups=3",
    "eval.ks=[5,10]", "train.patience=0", "grouping.method=oblivious", "aggregation.neighbours=8",
    "train.selection=last",
]
VICTIM_POSITION, TRAP = 0, 2


def _cfg(*extra: str):
    return with_overrides(config_from_dict({"method": "gfmfr"}), SMALL + list(extra))


@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    floor=st.integers(2, 15),
    with_centroids=st.booleans(),
    seed=st.integers(0, 100),
)
@settings(max_examples=200, deadline=None)
def test_merged_groups_all_reach_the_floor(counts: list[int], floor: int, with_centroids: bool, seed: int) -> None:
    c = np.asarray(counts, dtype=np.float64)
    centroids = np.random.default_rng(seed).normal(size=(c.size, 4)) if with_centroids else None
    target = merge_small_groups(c, centroids, floor)
    assert np.array_equal(target[target], target)  # every group maps to a group that keeps its own id
    merged = np.bincount(target, weights=c, minlength=c.size)
    kept = np.unique(target)
    assert merged.sum() == c.sum()
    assert (merged[kept] >= floor).all() or kept.size == 1  # one group left: the caller releases nothing


def _trap_nearest_centroid(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """A server that shaped the centroids so that one client alone is nearest to centroid TRAP."""
    groups = _real_nearest(features, centroids)
    groups[groups == TRAP] = (TRAP + 1) % centroids.shape[0]
    groups[VICTIM_POSITION] = TRAP
    return groups


_real_nearest = client_role.nearest_centroid


def _attack(monkeypatch, tiny_synthetic, backend: str, floor_on: bool) -> tuple[list[float], list[float]]:
    """Run 2 rounds; in round 1 the victim is alone in group TRAP. Returns, per released view of
    round 1, the released group counts and the gap between each group sum and the victim's update."""
    split = leave_one_out(tiny_synthetic)
    monkeypatch.setattr(client_role, "nearest_centroid", _trap_nearest_centroid)
    # without the floor (the old behaviour) every group is released whatever its size
    active = None if floor_on else ActiveServer(merge_groups=lambda counts, centroids, floor: np.arange(len(counts)))
    victim: dict[str, torch.Tensor] = {}

    def capture(upload, t):
        if t == 1:
            a, b = int(upload.row_ptr[VICTIM_POSITION]), int(upload.row_ptr[VICTIM_POSITION + 1])
            dense = torch.zeros(split.n_items, upload.item_delta.shape[1])
            dense[torch.from_numpy(upload.row_items[a:b])] = upload.item_delta[a:b]
            victim["item"] = dense
        return upload

    views = []
    run_federated(_cfg(f"aggregation.backend={backend}"), tiny_synthetic, split, progress=False, upload_hook=capture, callbacks=[views.append], active_server=active)
    server = [v for v in views if v.observer == "server" and v.round == 1]
    assert server, "round 1 released nothing"
    received = server[0].received
    counts = received["group_counts"].tolist()
    gaps = [float((received["group_item_sum"][g] - victim["item"]).abs().max()) for g in range(len(counts))]
    return counts, gaps


@pytest.mark.parametrize("backend", ["masking", "plain"])
def test_singleton_group_attack(monkeypatch, tiny_synthetic, backend: str) -> None:
    with monkeypatch.context() as m:  # without the floor: the trap group's sum is the victim's update
        counts, gaps = _attack(m, tiny_synthetic, backend, floor_on=False)
        assert counts[TRAP] == pytest.approx(1.0, abs=1e-3)
        assert gaps[TRAP] < 1e-3
    counts, gaps = _attack(monkeypatch, tiny_synthetic, backend, floor_on=True)
    assert all(c < 0.5 or c >= 10 for c in counts), counts  # no released group below the floor
    assert min(gaps) > 1e-2  # and no released sum equals the victim's update


def test_no_released_group_below_the_floor_on_ml100k_like_cohorts() -> None:
    """Poisson cohorts of about 40 over G = 5 groups (small groups are common): every released
    group count is 0 or at least the floor, in every round; the privacy block states the floor."""
    data = make_synthetic(200, 120, n_groups=5, mean_interactions=15, text_dim=8, image_dim=6, seed=3)
    split = leave_one_out(data)
    views = []
    run = run_federated(
        _cfg("grouping.num_groups=5", "train.client_fraction=0.2", "train.rounds=4", "grouping.min_group_size=10"),
        data, split, progress=False, callbacks=[views.append],
    )
    released = [c for v in views if v.observer == "server" for c in v.received["group_counts"].tolist()]
    assert released and all(c < 0.5 or c >= 10 for c in released), released
    floor = run.metrics["privacy"]["group_floor"]
    assert floor["min_group_size"] == 10 and floor["smallest_released_group"] >= 10
    assert floor["rounds_with_merged_groups"] >= 1  # the cohorts did produce small groups
    assert all(h.get("group_sizes") is None or min(s for s in h["group_sizes"] if s >= 0.5) >= 10 for h in run.history)


def test_floor_is_validated_and_loud(tiny_synthetic) -> None:
    with pytest.raises(ConfigError, match=r"grouping.min_group_size: must be >= 2"):
        _cfg("grouping.min_group_size=1")
    split = leave_one_out(tiny_synthetic)
    with pytest.raises(ConfigError, match=r"grouping.min_group_size=10 exceeds the 6 clients that can take part"):
        run_federated(_cfg(), tiny_synthetic, split, progress=False, participants=np.arange(6))
