"""The measurement script that re-implements the authors' training semantics runs and is seeded."""

from __future__ import annotations

import math

import pytest
import torch

from evaluations.authors_semantics import train
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
