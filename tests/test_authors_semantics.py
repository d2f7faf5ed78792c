"""The measurement scripts about the authors' code: the semantics re-implementation and the data export."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from evaluations.authors_semantics import lowest_id_negatives, train
from evaluations.export_authors_format import interactions_table, to_width
from gfmfr_secure.data.split import leave_one_out
from gfmfr_secure.data.synthetic import make_synthetic


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_runs_rounds_with_distillation_and_is_seeded() -> None:
    data = make_synthetic(24, 30, n_groups=2, mean_interactions=8, seed=3)
    kwargs = {"rounds": 2, "n_groups": 2, "original_eval": True, "seed": 1, "log": lambda _: None}
    first = train(data, **kwargs)
    again = train(data, **kwargs)
    assert [r["round"] for r in first] == [0, 1]
    assert first[0]["ratio"] is None  # no teacher before round 1
    assert first[1]["ratio"] is not None and math.isfinite(first[1]["ratio"])
    assert sum(first[1]["group_sizes"]) == 24
    for rec in first:
        assert 0.0 <= rec["test"]["NDCG@10"] <= rec["test"]["HR@10"] <= 1.0
        assert 0.0 <= rec["test_original_eval"]["HR@10"] <= 1.0
    assert [r["test"] for r in first] == [r["test"] for r in again]
    assert [r["loss"] for r in first] == [r["loss"] for r in again]


def test_fedrap_only_has_no_groups() -> None:
    data = make_synthetic(16, 25, n_groups=2, mean_interactions=6, seed=4)
    records = train(data, rounds=1, distill=False, seed=0, log=lambda _: None)
    assert "group_sizes" not in records[0] and records[0]["ratio"] is None


def test_lowest_id_negatives_follow_the_published_rule() -> None:
    data = make_synthetic(12, 30, n_groups=2, mean_interactions=6, seed=5)
    split = leave_one_out(data)
    samples = lowest_id_negatives(split, 4, np.random.default_rng(0))
    branches = set()
    for u in range(split.n_users):
        rows = slice(samples.indptr[u], samples.indptr[u + 1])
        items, labels = samples.items[rows], samples.labels[rows]
        pos = split.train_items[split.train_indptr[u] : split.train_indptr[u + 1]]
        assert np.array_equal(items[labels == 1], pos)
        owned = set(pos) | {int(split.val_items[u]), int(split.test_items[u])}
        admissible = [i for i in range(split.n_items) if i not in owned]
        negatives = items[labels == 0]
        assert negatives.size == 4 * pos.size
        branches.add(len(admissible) >= negatives.size)
        if len(admissible) >= negatives.size:
            assert negatives.tolist() == admissible[: negatives.size]  # the lowest ids
        else:  # too few admissible items: drawn with replacement, held-out items never
            assert set(negatives.tolist()) <= set(admissible)
    assert branches == {True, False}  # both rules exercised


def test_export_reproduces_the_split() -> None:
    data = make_synthetic(15, 30, n_groups=2, mean_interactions=7, seed=6)
    split = leave_one_out(data)
    table = interactions_table(split)
    assert np.all(np.diff(table[:, 0]) >= 0)  # sorted by user
    again = leave_one_out(
        dataclasses.replace(
            data,
            users=table[:, 0].copy(),
            items=table[:, 1].copy(),
            ratings=np.ones(len(table), np.float32),
            timestamps=table[:, 3].copy(),
        )
    )
    for name in ("train_indptr", "train_items", "val_items", "test_items"):
        assert np.array_equal(getattr(again, name), getattr(split, name)), name


def test_export_widths() -> None:
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    padded, kept = to_width(x, 12)
    assert padded.shape == (30, 12) and kept == 1.0 and np.array_equal(padded[:, :8], x)
    reduced, kept = to_width(x, 4)
    assert reduced.shape == (30, 4) and 0.0 < kept < 1.0
