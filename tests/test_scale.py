"""Scale: memory grows with the cohort and the interactions, not with users x items.

A 1% cohort of a 5,000-user population over 2,000 items trains GFMFR with oblivious
grouping for a few rounds: client state exists only for the sampled clients, negatives
are drawn for the cohort only, and the resident memory a run adds stays below what one
dense users x items float table would take. The per-client row store, the chunked
teacher and the sampled evaluation set are checked on their own.
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from gfmfr_secure.client.state import ClientRows
from gfmfr_secure.config import config_from_dict, with_overrides
from gfmfr_secure.data import leave_one_out, make_synthetic
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.server.fusion import GroupFusion
from gfmfr_secure.server.teacher import fused_preferences, group_preferences
from gfmfr_secure.roles import client as client_role
from gfmfr_secure.simulation import loop

USERS, ITEMS = 5000, 2000
ROUNDS = 3


def _cfg(*extra: str):
    return with_overrides(config_from_dict({"method": "gfmfr"}), [
        f"train.rounds={ROUNDS}", "train.client_fraction=0.01", "train.local_epochs=1", "train.selection=last",
        "grouping.method=oblivious", "grouping.num_groups=2", "grouping.min_group_size=2", "fusion.server_epochs=1",
        "fusion.embedding_dim=8", "eval.ks=[10]", "eval.chunk_users=256", *extra,
    ])  # fmt: skip


def _hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/self/status")


@pytest.fixture(scope="module")
def population():
    data = make_synthetic(USERS, ITEMS, n_groups=2, mean_interactions=24, text_dim=8, image_dim=6, seed=11)
    return data, leave_one_out(data)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resident high-water mark")
def test_a_one_percent_round_holds_state_and_memory_for_the_cohort_only(population, monkeypatch) -> None:
    data, split = population
    cfg = _cfg()
    # one round first: imports, compiled kernels and the allocator's first pages are not the run's growth
    loop.run_federated(with_overrides(cfg, ["train.rounds=1"]), data, split, progress=False)

    cohorts: list[np.ndarray] = []
    drawn: list[np.ndarray] = []
    sample_training = client_role.sample_training

    def spy(split_, n_neg, rng, users=None, exclude_heldout=False):
        samples = sample_training(split_, n_neg, rng, users=users, exclude_heldout=exclude_heldout)
        cohorts.append(np.asarray(users))
        drawn.append(np.unique(samples.users))
        return samples

    monkeypatch.setattr(client_role, "sample_training", spy)
    dense_bytes = USERS * ITEMS * 4  # one float32 users x items table: 40 MB
    tracemalloc.start()
    _hwm_reset()
    before = _status_kib("VmRSS") * 1024
    run = loop.run_federated(cfg, data, split, progress=False)
    grown = _status_kib("VmHWM") * 1024 - before
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert len(cohorts) == ROUNDS and all(c is not None and c.size for c in cohorts)
    for cohort, users in zip(cohorts, drawn, strict=True):
        assert np.array_equal(users, np.sort(cohort))  # negatives (and positives) for the cohort only
    sampled = np.unique(np.concatenate(cohorts))
    assert sampled.size < 0.05 * USERS
    store = run.store
    # personal item rows and head changes exist for sampled clients only
    personal_users = np.unique(store.personal.keys // ITEMS)
    assert np.isin(personal_users, sampled).all() and personal_users.size > 0
    assert np.array_equal(store.head_offset.clients(), sampled)
    dense_head_offset = USERS * store.head_offset.shape[1] * 4
    assert store.head_offset.nbytes < dense_head_offset / 10
    # no dense users x items (or users x head) structure on the way: numpy's peak and the resident growth
    assert traced_peak < dense_bytes / 4, f"numpy peak {traced_peak / 2**20:.1f} MiB"
    assert grown < dense_bytes, f"a 1% run added {grown / 2**20:.1f} MiB resident (a dense users x items table: {dense_bytes / 2**20:.0f} MiB)"
    assert dense_head_offset > dense_bytes  # the check above would have caught the old [U, H] head changes


def test_client_rows_index_like_a_table_and_store_written_rows_only() -> None:
    default = torch.tensor([1.0, float("nan")])
    rows = ClientRows(6, default)
    rows[torch.tensor([4, 1])] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    rows[2] = torch.tensor([5.0, 6.0])
    rows[np.array([4])] = torch.tensor([[7.0, 8.0]])
    assert rows.shape == (6, 2) and len(rows) == 3 and rows.clients().tolist() == [1, 2, 4]
    assert torch.equal(rows[4], torch.tensor([7.0, 8.0]))
    expected = torch.tensor([[1.0, float("nan")], [3.0, 4.0], [5.0, 6.0]])
    assert torch.equal(rows[0:3].nan_to_num(-1), expected.nan_to_num(-1))
    assert rows.nbytes == 6 * 8 + 3 * 2 * 4
    dense = torch.stack([rows[u] for u in range(6)])
    again = ClientRows.from_dense(dense, default)
    assert again.clients().tolist() == [1, 2, 4] and torch.equal(again[0:6].nan_to_num(-1), dense.nan_to_num(-1))
    restored = ClientRows.from_state_tensors(rows.state_tensors())
    copied = rows.copy()
    rows[1] = torch.tensor([0.0, 0.0])  # neither the restored nor the copied rows move
    for other in (restored, copied):
        assert torch.equal(other[1], torch.tensor([3.0, 4.0])) and other.clients().tolist() == [1, 2, 4]
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        rows[torch.tensor([6])]
    with pytest.raises(TypeError, match="integer"):
        rows[torch.tensor([True, False])]


def test_chunked_teacher_equals_the_whole_grid() -> None:
    g = torch.Generator().manual_seed(0)
    fusion = GroupFusion.from_features(3, 8, text=torch.randn(50, 5, generator=g), image=torch.randn(50, 4, generator=g), n_items=50, embedding_dim=8, operator="moe", generator=g)
    w, b = torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    with torch.no_grad():
        whole = group_preferences(fusion.forward_all(), w, b)
    assert torch.equal(fused_preferences(fusion, w, b), whole)  # 50 items: one chunk, the same computation
    torch.testing.assert_close(fused_preferences(fusion, w, b, chunk_items=7), whole, rtol=1e-5, atol=1e-6)


def test_large_populations_rank_a_fixed_sample_of_users(population) -> None:
    data, split = population
    assert loop.evaluation_users(split, 0, 0) is None and loop.evaluation_users(split, USERS, 0) is None
    sample = loop.evaluation_users(split, 700, 0)
    assert sample.size == 700 and np.all(np.diff(sample) > 0) and np.all(split.test_items[sample] >= 0)
    assert np.array_equal(sample, loop.evaluation_users(split, 700, 0))
    assert not np.array_equal(sample, loop.evaluation_users(split, 700, 1))
    run = loop.run_federated(_cfg("train.rounds=1", "eval.max_users=700", "distill.enabled=false", "grouping.method=none", "method=fedrap"), data, split, progress=False)
    assert run.metrics["test"]["users"] == 700
    assert run.metrics["val"]["users"] == int((split.val_items[sample] >= 0).sum())
    with pytest.raises(ConfigError, match="eval.max_users"):
        _cfg("eval.max_users=-1")
