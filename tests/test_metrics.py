"""Full-ranking metrics: golden values, pessimistic ties, masking, properties."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.errors import DataError
from gfmfr_secure.metrics import (
    evaluate_ranking,
    metrics_from_ranks,
    pessimistic_ranks,
    train_mask,
)


def make_split(
    train: list[list[int]], val: list[int], test: list[int], n_items: int
) -> SimpleNamespace:
    """Split-like object (the fields of gfmfr_secure.data.Split) from per-user lists."""
    lengths = [len(items) for items in train]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.array([i for items in train for i in sorted(items)], dtype=np.int64)
    return SimpleNamespace(
        n_users=len(train),
        n_items=n_items,
        train_indptr=indptr,
        train_items=flat,
        val_items=np.array(val, dtype=np.int64),
        test_items=np.array(test, dtype=np.int64),
    )


def table_scorer(scores: torch.Tensor, calls: list[list[int]] | None = None):
    """score_fn returning rows of a fixed [U, I] score table."""

    def score_fn(users: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(users.tolist())
        return scores[users]

    return score_fn


# --------------------------------------------------------------------------- pessimistic_ranks


def test_ranks_golden_with_exclusion_and_ties():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.7, 0.1, 0.3],  # target 2; item 0 scores higher but is excluded
            [0.2, 0.8, 0.8, 0.4, 0.9],  # target 1; item 2 ties, item 4 is higher
        ]
    )
    targets = torch.tensor([2, 1])
    exclude = torch.zeros(2, 5, dtype=torch.bool)
    exclude[0, 0] = True
    assert pessimistic_ranks(scores, targets, exclude).tolist() == [0, 2]
    no_exclusion = torch.zeros(2, 5, dtype=torch.bool)
    assert pessimistic_ranks(scores, targets, no_exclusion).tolist() == [1, 2]


def test_constant_scorer_gets_the_worst_rank():
    scores = torch.zeros(3, 6)
    targets = torch.tensor([0, 3, 5])
    exclude = torch.zeros(3, 6, dtype=torch.bool)
    exclude[1, [0, 1]] = True
    # Every non-excluded item ties with the target and ranks above it.
    assert pessimistic_ranks(scores, targets, exclude).tolist() == [5, 3, 5]


def test_target_is_never_excluded():
    scores = torch.tensor([[0.1, 0.5, 0.3]])
    exclude = torch.tensor([[False, True, True]])  # the target (1) is flagged too
    assert pessimistic_ranks(scores, torch.tensor([1]), exclude).tolist() == [0]
    assert pessimistic_ranks(scores, torch.tensor([0]), exclude).tolist() == [0]


def test_minus_infinity_scores_rank_last():
    scores = torch.tensor([[-math.inf, 0.0, -math.inf, 1.0]])
    exclude = torch.zeros(1, 4, dtype=torch.bool)
    assert pessimistic_ranks(scores, torch.tensor([0]), exclude).tolist() == [3]


def test_nan_scores_raise():
    scores = torch.tensor([[0.1, 0.2], [float("nan"), 0.3]])
    with pytest.raises(ValueError, match="NaN.*row 1"):
        pessimistic_ranks(scores, torch.tensor([0, 1]), torch.zeros(2, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    ("scores", "targets", "exclude", "message"),
    [
        (torch.zeros(4), torch.tensor([0]), torch.zeros(4, dtype=torch.bool), "shape"),
        (torch.zeros(2, 3), torch.tensor([0]), torch.zeros(2, 3, dtype=torch.bool), "targets"),
        (torch.zeros(1, 3), torch.tensor([3]), torch.zeros(1, 3, dtype=torch.bool), r"\[0, 3\)"),
        (torch.zeros(1, 3), torch.tensor([0]), torch.zeros(1, 3), "bool"),
        (
            torch.zeros(1, 3, dtype=torch.int64),
            torch.tensor([0]),
            torch.zeros(1, 3, dtype=torch.bool),
            "floating",
        ),
    ],
)
def test_ranks_reject_bad_inputs(scores, targets, exclude, message):
    with pytest.raises(ValueError, match=message):
        pessimistic_ranks(scores, targets, exclude)


# --------------------------------------------------------------------------- metrics_from_ranks


def test_metrics_golden():
    ranks = torch.tensor([0, 2, 1, 7])
    m = metrics_from_ranks(ranks, ks=(1, 3, 10))
    assert m["HR@1"] == pytest.approx(1 / 4)
    assert m["HR@3"] == pytest.approx(3 / 4)
    assert m["HR@10"] == pytest.approx(4 / 4)
    assert m["NDCG@1"] == pytest.approx((1 / math.log2(2)) / 4)
    assert m["NDCG@3"] == pytest.approx(
        (1 / math.log2(2) + 1 / math.log2(4) + 1 / math.log2(3)) / 4
    )
    assert m["NDCG@10"] == pytest.approx(
        (1 / math.log2(2) + 1 / math.log2(4) + 1 / math.log2(3) + 1 / math.log2(9)) / 4
    )
    assert m["MRR@3"] == pytest.approx((1 / 1 + 1 / 3 + 1 / 2) / 4)
    assert m["MRR@10"] == pytest.approx((1 / 1 + 1 / 3 + 1 / 2 + 1 / 8) / 4)
    for k in (1, 3, 10):
        assert m[f"Recall@{k}"] == m[f"HR@{k}"]


def test_metric_keys_are_metric_major():
    m = metrics_from_ranks(torch.tensor([0]), ks=(10, 20))
    assert list(m) == [
        "HR@10",
        "HR@20",
        "NDCG@10",
        "NDCG@20",
        "Recall@10",
        "Recall@20",
        "MRR@10",
        "MRR@20",
    ]
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize(
    ("ranks", "ks", "message"),
    [
        (torch.tensor([], dtype=torch.int64), (10,), "empty"),
        (torch.tensor([0, -1]), (10,), ">= 0"),
        (torch.tensor([0.0]), (10,), "integer"),
        (torch.tensor([0]), (), "at least one"),
        (torch.tensor([0]), (0,), ">= 1"),
        (torch.tensor([0]), (5, 5), "distinct"),
    ],
)
def test_metrics_reject_bad_inputs(ranks, ks, message):
    with pytest.raises(ValueError, match=message):
        metrics_from_ranks(ranks, ks)


# --------------------------------------------------------------------------- evaluate_ranking

# user 0: train {0, 1}, val 2, test 3; user 1: train {4}, test 5; user 2: train {0}, val 1.
MASK_SPLIT = make_split(train=[[0, 1], [4], [0]], val=[2, -1, 1], test=[3, 5, -1], n_items=6)
MASK_SCORES = torch.tensor(
    [
        [9.0, 8.0, 7.5, 7.0, 6.0, 1.0],
        [1.0, 2.0, 3.0, 4.0, 9.0, 5.0],
        [9.0, 3.0, 4.0, 1.0, 2.0, 3.0],
    ]
)


def test_evaluate_masks_train_and_val_items_for_test():
    calls: list[list[int]] = []
    m = evaluate_ranking(table_scorer(MASK_SCORES, calls), MASK_SPLIT, "test", ks=(1, 2))
    # user 0: items 0, 1 (train) and 2 (val) are masked, so the test item 3 is on top;
    # user 1: item 4 (train) is masked, so item 5 is on top. User 2 has no test item.
    assert calls == [[0, 1]]
    assert m["users"] == 2
    assert m["HR@1"] == 1.0
    assert m["NDCG@1"] == pytest.approx(1 / math.log2(2))


def test_evaluate_val_masks_train_only():
    m = evaluate_ranking(table_scorer(MASK_SCORES), MASK_SPLIT, "val", ks=(1, 3))
    # user 0: val item 2 (7.5) beats everything not in training -> rank 0;
    # user 2: val item 1 (3.0): item 0 masked, item 2 (4.0) above, item 5 (3.0) ties -> rank 2.
    assert m["users"] == 2
    assert m["HR@1"] == pytest.approx(1 / 2)
    assert m["HR@3"] == pytest.approx(2 / 2)
    assert m["NDCG@3"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 2)
    assert m["MRR@3"] == pytest.approx((1 / 1 + 1 / 3) / 2)


def test_train_mask_matches_csr():
    mask = train_mask(
        torch.tensor([2, 0]),
        torch.as_tensor(MASK_SPLIT.train_indptr),
        torch.as_tensor(MASK_SPLIT.train_items),
        6,
    )
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[0, 0] = True
    expected[1, [0, 1]] = True
    assert torch.equal(mask, expected)


def test_evaluate_rejects_bad_arguments():
    scorer = table_scorer(MASK_SCORES)
    with pytest.raises(ValueError, match="which"):
        evaluate_ranking(scorer, MASK_SPLIT, "train")
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_ranking(scorer, MASK_SPLIT, chunk_size=0)
    with pytest.raises(ValueError, match=r"shape \[2, 6\]"):
        evaluate_ranking(lambda users: torch.zeros(len(users), 5), MASK_SPLIT)
    empty = make_split(train=[[0]], val=[-1], test=[-1], n_items=3)
    with pytest.raises(DataError, match="no user has a test item"):
        evaluate_ranking(lambda users: torch.zeros(len(users), 3), empty)
    broken = make_split(train=[[0]], val=[-1], test=[2], n_items=3)
    broken.train_indptr = np.array([0, 5], dtype=np.int64)
    with pytest.raises(DataError, match="train_indptr"):
        evaluate_ranking(lambda users: torch.zeros(len(users), 3), broken)


# --------------------------------------------------------------------------- properties


@st.composite
def split_and_scores(draw):
    """A random split (some users without val / test items) and integer scores with many ties."""
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(3, 9))
    train, val, test = [], [], []
    for u in range(n_users):
        perm = draw(st.permutations(range(n_items)))
        n_train = draw(st.integers(0, n_items - 2))
        train.append(sorted(perm[:n_train]))
        val.append(perm[n_train] if draw(st.booleans()) else -1)
        test.append(perm[n_train + 1] if u == 0 or draw(st.booleans()) else -1)
    values = draw(
        st.lists(st.integers(0, 3), min_size=n_users * n_items, max_size=n_users * n_items)
    )
    scores = torch.tensor(values, dtype=torch.float32).reshape(n_users, n_items)
    return make_split(train, val, test, n_items), scores


def brute_force_ranks(split: SimpleNamespace, scores: torch.Tensor, which: str) -> torch.Tensor:
    """Per-user loop straight from the definition (reference for the vectorised code)."""
    targets = split.val_items if which == "val" else split.test_items
    ranks = []
    for u in range(split.n_users):
        t = int(targets[u])
        if t < 0:
            continue
        masked = set(split.train_items[split.train_indptr[u] : split.train_indptr[u + 1]].tolist())
        if which == "test" and split.val_items[u] >= 0:
            masked.add(int(split.val_items[u]))
        ranks.append(
            sum(
                1
                for j in range(split.n_items)
                if j != t and j not in masked and scores[u, j] >= scores[u, t]
            )
        )
    return torch.tensor(ranks, dtype=torch.int64)


@settings(max_examples=60, deadline=None)
@given(split_and_scores(), st.sampled_from(["val", "test"]))
def test_matches_brute_force_and_chunking_does_not_matter(case, which):
    split, scores = case
    if not (getattr(split, f"{which}_items") >= 0).any():
        which = "test"
    ks = (1, 2, 5)
    expected = metrics_from_ranks(brute_force_ranks(split, scores, which), ks)
    for chunk in (1, 2, 1024):
        got = evaluate_ranking(table_scorer(scores), split, which, ks=ks, chunk_size=chunk)
        assert got.pop("users") == int((getattr(split, f"{which}_items") >= 0).sum())
        assert got == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(split_and_scores(), st.randoms(use_true_random=False))
def test_relabelling_items_changes_nothing(case, rnd):
    split, scores = case
    perm = list(range(split.n_items))
    rnd.shuffle(perm)
    pi = np.array(perm, dtype=np.int64)  # old item i -> new item pi[i]
    relabelled_scores = torch.empty_like(scores)
    relabelled_scores[:, torch.as_tensor(pi)] = scores
    train = [
        pi[split.train_items[split.train_indptr[u] : split.train_indptr[u + 1]]].tolist()
        for u in range(split.n_users)
    ]
    relabel = lambda held: [int(pi[i]) if i >= 0 else -1 for i in held]
    relabelled = make_split(
        train, relabel(split.val_items), relabel(split.test_items), split.n_items
    )
    before = evaluate_ranking(table_scorer(scores), split, "test", ks=(1, 3))
    after = evaluate_ranking(table_scorer(relabelled_scores), relabelled, "test", ks=(1, 3))
    assert after == before


@settings(max_examples=40, deadline=None)
@given(split_and_scores(), st.sampled_from(["val", "test"]))
def test_perfect_scorer_scores_one(case, which):
    split, _ = case
    targets = getattr(split, f"{which}_items")
    if not (targets >= 0).any():
        return
    perfect = torch.zeros(split.n_users, split.n_items)
    has = np.nonzero(targets >= 0)[0]
    perfect[torch.as_tensor(has), torch.as_tensor(targets[has])] = 1.0
    m = evaluate_ranking(table_scorer(perfect), split, which, ks=(1, 5))
    assert m.pop("users") == len(has)
    assert all(v == 1.0 for v in m.values())


@settings(max_examples=60, deadline=None)
@given(split_and_scores(), st.sampled_from(["val", "test"]), st.data())
def test_infinite_scores_and_user_subsets_match_brute_force(case, which, data):
    split, scores = case
    if not (getattr(split, f"{which}_items") >= 0).any():
        which = "test"
    # some entries at +-inf (ties between infinities count against the model, as finite ties do)
    marks = data.draw(st.lists(st.sampled_from([0.0, math.inf, -math.inf]), min_size=scores.numel(), max_size=scores.numel()))
    marks = torch.tensor(marks).reshape(scores.shape)
    scores = torch.where(marks == 0, scores, marks)
    subset = data.draw(st.lists(st.integers(0, split.n_users - 1), unique=True))
    ranks = brute_force_ranks(split, scores, which)
    has = np.flatnonzero(getattr(split, f"{which}_items") >= 0)
    keep = np.isin(has, subset)
    if not keep.any():
        with pytest.raises(DataError, match="of the given ones"):
            evaluate_ranking(table_scorer(scores), split, which, users=np.array(subset, dtype=np.int64))
        return
    expected = metrics_from_ranks(ranks[torch.from_numpy(keep)], (1, 2, 5))
    got = evaluate_ranking(table_scorer(scores), split, which, ks=(1, 2, 5), chunk_size=2, users=torch.tensor(subset))
    assert got.pop("users") == int(keep.sum())
    assert got == pytest.approx(expected)


def test_evaluate_counts_a_twice_masked_item_once_and_never_masks_the_target():
    # user 0 lists item 1 twice among its training items and its validation item 2 there too;
    # user 1 lists its own test item 3 among its training items: it is ranked, not masked
    split = make_split(train=[[1, 1, 2], [3]], val=[2, -1], test=[0, 3], n_items=5)
    scores = torch.tensor([[1.0, 5.0, 5.0, 2.0, 0.0], [0.0, 4.0, 0.0, 3.0, 1.0]])
    m = evaluate_ranking(table_scorer(scores), split, "test", ks=(1, 2))
    # user 0: items 1, 2 masked; item 3 (2.0) above the target (1.0): rank 1. user 1: item 1 above: rank 1
    assert m["HR@1"] == 0.0 and m["HR@2"] == 1.0
