"""Leave-one-out split: golden tables, timestamp ties, short histories, a reference check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.data import IdMap, InteractionData, Split, leave_one_out, load_dataset
from gfmfr_secure.errors import ConfigError, DataError


def make_data(rows: list[tuple[int, int, int]], n_users: int, n_items: int) -> InteractionData:
    """InteractionData from (user, item, timestamp) rows in file order."""
    arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return InteractionData(
        name="hand",
        n_users=n_users,
        n_items=n_items,
        users=arr[:, 0].copy(),
        items=arr[:, 1].copy(),
        ratings=np.ones(arr.shape[0], dtype=np.float32),
        timestamps=arr[:, 2].copy(),
        user_map=IdMap(np.arange(n_users)),
        item_map=IdMap(np.arange(n_items)),
    )


def train_lists(split: Split) -> list[list[int]]:
    return [
        split.train_items[split.train_indptr[u] : split.train_indptr[u + 1]].tolist()
        for u in range(split.n_users)
    ]


def test_golden_tiny_movielens_folder(ml_folder):
    split = leave_one_out(load_dataset(ml_folder))
    # item index = movie id - 1. User 2 rated movies 5 and 3 at the same time (150):
    # the later row (movie 3) is the test item, movie 5 the validation item.
    assert split.test_items.tolist() == [3, 2, 3, 2]
    assert split.val_items.tolist() == [2, 4, -1, 1]  # user 3 has two ratings: no validation
    assert train_lists(split) == [[0, 1], [0], [1], [0, 4]]
    assert split.train_indptr.tolist() == [0, 2, 3, 4, 6]
    assert split.train_users.tolist() == [0, 0, 1, 2, 3, 3]
    assert split.train_counts().tolist() == [2, 1, 1, 2]


HAND_ROWS = [  # (user, item, timestamp), file order matters for ties
    (3, 0, 1),
    (0, 5, 10),
    (2, 1, 9),
    (3, 9, 4),
    (0, 2, 10),
    (1, 3, 5),
    (3, 6, 2),
    (0, 7, 10),
    (2, 4, 3),
    (3, 2, 4),
    (3, 8, 3),
]


def test_golden_ties_and_short_histories():
    split = leave_one_out(make_data(HAND_ROWS, 4, 10))
    # user 0: three rows at t=10 -> file order 5, 2, 7: test 7, val 2, train [5]
    # user 1: one row -> train only
    # user 2: two rows -> test = latest (1 at t=9), train [4], no val
    # user 3: 0@1, 6@2, 8@3, then 9@4 and 2@4 (file order 9, 2): test 2, val 9
    assert split.test_items.tolist() == [7, -1, 1, 2]
    assert split.val_items.tolist() == [2, -1, -1, 9]
    assert train_lists(split) == [[5], [3], [4], [0, 6, 8]]


def test_min_interactions_moves_short_users_to_train_plus_test():
    split = leave_one_out(make_data(HAND_ROWS, 4, 10), min_interactions=4)
    assert split.test_items.tolist() == [7, -1, 1, 2]
    assert split.val_items.tolist() == [-1, -1, -1, 9]  # user 0 has 3 < 4 rows
    assert train_lists(split) == [[2, 5], [3], [4], [0, 6, 8]]
    with pytest.raises(ConfigError, match="min_interactions must be at least 3"):
        leave_one_out(make_data(HAND_ROWS, 4, 10), min_interactions=2)


def test_empty_user_is_an_error():
    with pytest.raises(DataError, match=r"1 empty user\(s\) with no interactions: 4"):
        leave_one_out(make_data(HAND_ROWS, 5, 10))


def test_split_validates_its_arrays():
    with pytest.raises(DataError, match="train_indptr must be int64 with shape"):
        Split(2, 3, np.array([0, 1]), np.array([0]), np.array([-1, -1]), np.array([-1, -1]))
    with pytest.raises(DataError, match="test_items out of range"):
        Split(1, 3, np.array([0, 1]), np.array([0]), np.array([-1]), np.array([3]))
    minus = np.array([-1, -1, -1])
    with pytest.raises(DataError, match="train_items of user 1 are not sorted and unique"):
        Split(3, 5, np.array([0, 2, 4, 4]), np.array([3, 4, 2, 2]), minus, minus)
    # a new user may start lower than the previous one ended
    Split(3, 5, np.array([0, 2, 2, 4]), np.array([3, 4, 0, 1]), minus, minus)


def reference_split(rows, n_users, min_interactions):
    """Per-user loop, the obvious way, for comparison."""
    test, val, train = [-1] * n_users, [-1] * n_users, [[] for _ in range(n_users)]
    for u in range(n_users):
        hist = [(t, pos, i) for pos, (uu, i, t) in enumerate(rows) if uu == u]
        hist.sort()
        items = [i for _, _, i in hist]
        if len(items) >= 2:
            test[u] = items.pop()
        if len(hist) >= min_interactions:
            val[u] = items.pop()
        train[u] = sorted(items)
    return test, val, train


@st.composite
def interaction_tables(draw):
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 8))
    pairs = draw(
        st.lists(
            st.tuples(st.integers(0, n_users - 1), st.integers(0, n_items - 1)),
            min_size=1,
            max_size=40,
            unique=True,
        )
    )
    present = sorted({u for u, _ in pairs})
    relabel = {u: k for k, u in enumerate(present)}  # no empty users
    times = draw(st.lists(st.integers(0, 4), min_size=len(pairs), max_size=len(pairs)))  # many ties
    rows = [(relabel[u], i, t) for (u, i), t in zip(pairs, times, strict=True)]
    return rows, len(present), n_items, draw(st.integers(3, 5))


@settings(max_examples=60, deadline=None)
@given(interaction_tables())
def test_matches_a_per_user_reference(table):
    rows, n_users, n_items, min_inter = table
    split = leave_one_out(make_data(rows, n_users, n_items), min_interactions=min_inter)
    test, val, train = reference_split(rows, n_users, min_inter)
    assert split.test_items.tolist() == test
    assert split.val_items.tolist() == val
    assert train_lists(split) == train
    assert split.train_items.shape[0] + (split.val_items >= 0).sum() + (
        split.test_items >= 0
    ).sum() == len(rows)


def test_huge_timestamp_range_uses_the_fallback_order():
    big = 2**62
    rows = [(0, 0, -big), (0, 1, big), (0, 2, 0), (1, 0, 5)]
    split = leave_one_out(make_data(rows, 2, 3))
    assert split.test_items.tolist() == [1, -1] and split.val_items.tolist() == [2, -1]
