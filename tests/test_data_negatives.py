"""Training samples: exclusion, counts, layout, freshness, determinism, compatibility option."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.data import Split, leave_one_out, sample_training
from gfmfr_secure.data.negatives import sample_outside
from gfmfr_secure.errors import ConfigError, DataError
from gfmfr_secure.rng import numpy_rng


def split_from_lists(train: list[list[int]], n_items: int, val=None, test=None) -> Split:
    n_users = len(train)
    counts = [len(t) for t in train]
    return Split(
        n_users=n_users,
        n_items=n_items,
        train_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        train_items=np.array([i for t in train for i in sorted(t)], dtype=np.int64),
        val_items=np.array(val if val is not None else [-1] * n_users, dtype=np.int64),
        test_items=np.array(test if test is not None else [-1] * n_users, dtype=np.int64),
    )


@st.composite
def small_splits(draw):
    n_items = draw(st.integers(2, 12))
    n_users = draw(st.integers(1, 6))
    train = [
        sorted(draw(st.sets(st.integers(0, n_items - 1), max_size=n_items - 1)))
        for _ in range(n_users)
    ]
    heldout = [draw(st.integers(-1, n_items - 1)) for _ in range(2 * n_users)]
    return split_from_lists(train, n_items, val=heldout[:n_users], test=heldout[n_users:])


@settings(max_examples=80, deadline=None)
@given(small_splits(), st.integers(0, 5), st.integers(0, 2**32), st.booleans())
def test_never_a_training_positive_and_counts_exact(split, n_neg, seed, exclude_heldout):
    if exclude_heldout:
        # a user whose positives plus held-out items cover everything cannot be served
        for u in range(split.n_users):
            banned = set(
                split.train_items[split.train_indptr[u] : split.train_indptr[u + 1]].tolist()
            )
            banned |= {int(split.val_items[u]), int(split.test_items[u])} - {-1}
            if len(banned) >= split.n_items and split.train_counts()[u] and n_neg:
                with pytest.raises(DataError, match=f"user {u} has no admissible negative"):
                    sample_training(split, n_neg, numpy_rng(seed, "neg"), exclude_heldout=True)
                return
    s = sample_training(split, n_neg, numpy_rng(seed, "neg"), exclude_heldout=exclude_heldout)
    counts = split.train_counts()
    assert len(s) == int(counts.sum()) * (1 + n_neg)
    assert (
        s.users.dtype == s.items.dtype == s.indptr.dtype == np.int64
        and s.labels.dtype == np.float32
    )
    np.testing.assert_array_equal(np.diff(s.indptr), counts * (1 + n_neg))
    assert np.all(np.diff(s.users) >= 0)
    for u in range(split.n_users):
        rows = slice(s.indptr[u], s.indptr[u + 1])
        assert np.all(s.users[rows] == u)
        labels, items = s.labels[rows], s.items[rows]
        positives = split.train_items[split.train_indptr[u] : split.train_indptr[u + 1]]
        assert labels.tolist() == [1.0] * counts[u] + [0.0] * (counts[u] * n_neg)  # positives first
        np.testing.assert_array_equal(items[: counts[u]], positives)
        negs = items[counts[u] :]
        assert np.all((negs >= 0) & (negs < split.n_items))
        assert not np.isin(negs, positives).any()
        if exclude_heldout:
            assert not np.isin(negs, [split.val_items[u], split.test_items[u]]).any()


def test_heldout_items_are_drawn_by_default_and_excluded_on_request():
    # user 0 owns items 0..7 of 10; its val item is 8 and test item 9
    split = split_from_lists([list(range(8))], 10, val=[8], test=[9])
    default = sample_training(split, 50, numpy_rng(1, "neg"))
    negs = default.items[default.labels == 0]
    assert set(negs.tolist()) == {8, 9}  # may be drawn: a deployed model cannot know the future
    with pytest.raises(
        DataError,
        match="user 0 has no admissible negative item: all 10 items are among its training positives and held-out items",
    ):
        sample_training(split, 1, numpy_rng(1, "neg"), exclude_heldout=True)
    split2 = split_from_lists([list(range(7))], 10, val=[8], test=[9])
    compat = sample_training(split2, 50, numpy_rng(1, "neg"), exclude_heldout=True)
    assert set(compat.items[compat.labels == 0].tolist()) == {7}


def test_user_with_every_item_fails_by_name():
    split = split_from_lists([[0, 1], [0, 1, 2]], 3)
    with pytest.raises(DataError, match="user 1 has no admissible negative item: all 3 items"):
        sample_training(split, 2, numpy_rng(0, "neg"))
    # no negatives asked: nothing to draw, no error
    assert len(sample_training(split, 0, numpy_rng(0, "neg"))) == 5
    # not selected: no error either
    s = sample_training(split, 2, numpy_rng(0, "neg"), users=np.array([0]))
    assert s.indptr.tolist() == [0, 6, 6] and set(s.items[2:].tolist()) == {2}


def test_fresh_across_generators_identical_for_identical_seeds(tiny_synthetic):
    split = leave_one_out(tiny_synthetic)
    a = sample_training(split, 4, numpy_rng(3, "negatives", 0))
    b = sample_training(split, 4, numpy_rng(3, "negatives", 0))
    c = sample_training(split, 4, numpy_rng(3, "negatives", 1))
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.users, c.users)
    assert not np.array_equal(a.items, c.items)
    rng = numpy_rng(3, "negatives", 0)
    first, second = sample_training(split, 4, rng), sample_training(split, 4, rng)
    assert not np.array_equal(first.items, second.items)  # one generator, two rounds: fresh draws


def test_user_subset_layout_and_validation(tiny_synthetic):
    split = leave_one_out(tiny_synthetic)
    users = np.array([7, 2, 7, 40])
    s = sample_training(split, 3, numpy_rng(0, "neg"), users=users)
    counts = split.train_counts()
    assert sorted(set(s.users.tolist())) == [2, 7, 40]
    sizes = np.diff(s.indptr)
    assert sizes[[2, 7, 40]].tolist() == (counts[[2, 7, 40]] * 4).tolist()
    assert sizes.sum() == len(s) and np.count_nonzero(sizes) == 3
    with pytest.raises(DataError, match=r"user indices out of range \[0, 60\): \[60\]"):
        sample_training(split, 3, numpy_rng(0, "neg"), users=np.array([1, 60]))
    with pytest.raises(ConfigError, match="n_neg must be a non-negative integer"):
        sample_training(split, -1, numpy_rng(0, "neg"))


def test_negatives_are_uniform_over_admissible_items():
    # 20 items, user owns 5 of them: each of the 15 others should get ~1/15 of the draws
    owned = [0, 3, 4, 11, 19]
    split = split_from_lists([owned], 20)
    s = sample_training(split, 6000, numpy_rng(11, "neg"))
    negs = s.items[s.labels == 0]
    freq = np.bincount(negs, minlength=20)
    assert freq[owned].sum() == 0
    expected = negs.size / 15
    chi2 = float((((freq[np.setdiff1d(np.arange(20), owned)] - expected) ** 2) / expected).sum())
    assert chi2 < 36.1  # 99.9% quantile of chi-square with 14 degrees of freedom


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_sample_outside_equals_rank_lookup(data):
    n_items = data.draw(st.integers(1, 15))
    rows = data.draw(
        st.lists(st.sets(st.integers(0, n_items - 1), max_size=n_items - 1), min_size=1, max_size=5)
    )
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    excluded = np.array([i for r in rows for i in sorted(r)], dtype=np.int64)
    draw_rows = np.repeat(np.arange(len(rows)), 30).astype(np.int64)
    seed = data.draw(st.integers(0, 1000))
    got = sample_outside(indptr, excluded, draw_rows, n_items, np.random.default_rng(seed))
    # same generator state -> the same ranks; map them through the explicit admissible lists
    n_adm = np.array([n_items - len(r) for r in rows])
    ranks = np.random.default_rng(seed).integers(0, n_adm[draw_rows], dtype=np.int64)
    admissible = [np.setdiff1d(np.arange(n_items), sorted(r)) for r in rows]
    expected = [admissible[r][k] for r, k in zip(draw_rows, ranks, strict=True)]
    assert got.tolist() == expected
