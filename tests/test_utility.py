"""Utility floors: the federated models learn, measured against popularity on the same split.

These guard the property the privacy-utility tables rest on: a federated model that
does not beat popularity has not learned, and every trade-off would compare noise
with noise. The figures in docs/baselines.md are the full-scale version.
"""

from __future__ import annotations

import numpy as np
import pytest

from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import InteractionData, leave_one_out
from gfmfr_secure.data.preprocess import restrict
from gfmfr_secure.metrics import evaluate_ranking
from gfmfr_secure.references import build_reference
from gfmfr_secure.simulation.loop import run_federated


def sparse_subsample(data: InteractionData, n_users: int = 300, n_items: int = 400, max_per_user: int = 20, seed: int = 0) -> InteractionData:
    """A sparse slice: ``n_users`` random users, their ``n_items`` most popular items,
    and each user's latest ``max_per_user`` interactions among those."""
    rng = np.random.default_rng(seed)
    keep_users = np.zeros(data.n_users, dtype=bool)
    keep_users[rng.choice(data.n_users, size=n_users, replace=False)] = True
    rows = keep_users[data.users]
    popularity = np.bincount(data.items[rows], minlength=data.n_items)
    keep_items = np.zeros(data.n_items, dtype=bool)
    keep_items[np.argsort(-popularity, kind="stable")[:n_items]] = True
    rows &= keep_items[data.items]
    idx = np.flatnonzero(rows)
    # newest first within each user (row order breaks timestamp ties, as the split does)
    idx = idx[np.lexsort((-idx, -data.timestamps[idx], data.users[idx]))]
    users = data.users[idx]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    rank = np.arange(idx.size) - np.repeat(starts, np.diff(np.r_[starts, idx.size]))
    keep = np.zeros(data.users.size, dtype=bool)
    keep[idx[rank < max_per_user]] = True
    final_users = np.zeros(data.n_users, dtype=bool)
    final_users[np.unique(data.users[keep])] = True
    final_items = np.zeros(data.n_items, dtype=bool)
    final_items[np.unique(data.items[keep])] = True
    return restrict(data, keep, final_users, final_items)


@pytest.mark.dataset
@pytest.mark.slow
def test_federated_mf_beats_popularity_on_a_sparse_slice(ml100k: InteractionData) -> None:
    """300 users x 400 items, <= 20 interactions per user: FedAvg with the dot scorer
    (default settings) beats popularity on test NDCG@10 (measured: 0.069 vs 0.038)."""
    data = sparse_subsample(ml100k)
    assert data.n_users == 300 and data.n_items <= 400
    assert np.bincount(data.users).max() <= 20
    split = leave_one_out(data)
    popularity = evaluate_ranking(build_reference("popularity", split).score_fn, split, "test", ks=(10,))
    cfg = with_overrides(config_from_dict({"method": "fedncf"}), ["model.backbone=fedncf", "distill.enabled=false", "train.rounds=50"])
    run = run_federated(cfg, data, split, progress=False)
    assert run.metrics["best_round"] >= 10
    assert run.metrics["test"]["NDCG@10"] > 1.3 * popularity["NDCG@10"]
    assert run.metrics["test"]["HR@10"] > popularity["HR@10"]
