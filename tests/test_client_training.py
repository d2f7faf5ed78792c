"""Client-side training: cohort path vs per-client path, schedules, sparse state semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from client_setup import make_setup
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.client.cohort import train_cohort
from gfmfr_secure.client.local import train_client
from gfmfr_secure.client.plan import epoch_orders, hash64
from gfmfr_secure.client.state import RowStore
from gfmfr_secure.types import LocalHyper

U, I, D = 7, 40, 8


def _samples(seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 60, U)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    items = rng.integers(0, I, indptr[-1])
    labels = (rng.random(indptr[-1]) < 0.3).astype(np.float32)
    return indptr, items, labels


def _hyper(**kw) -> LocalHyper:
    base = {
        "lr_network": 0.05, "lr_items": 2.0, "weight_decay": 1e-3, "alpha": 0.1, "beta": 0.1, "distill": 0.7,
        "ema_decay": 0.9, "max_ratio": 5.0, "batch_size": 16, "epochs": 3, "shuffle_seed": 5,
    }
    base.update(kw)
    return LocalHyper(**base)


def _setup(name: str, scorer: str = "mlp"):
    return make_setup(name, U, I, D, scorer)


@pytest.mark.parametrize("scorer", ["mlp", "dot"])
@pytest.mark.parametrize("backbone", ["fedrap", "fedncf", "pfedrec"])
@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("workers", [1, 3])
def test_cohort_equals_per_client_path(backbone: str, distill: bool, workers: int, scorer: str) -> None:
    """The cohort path (compiled loops, hand-derived gradients) gives the autograd
    per-client update, on one worker thread or several, for both scorers."""
    spec, shared, store_a = _setup(backbone, scorer)
    store_b = store_a.snapshot()
    indptr, items, labels = _samples()
    extra = {"scorer": "dot", "lr_user": 0.3, "embedding_weight_decay": 0.05} if scorer == "dot" else {}
    hyper = _hyper(distill=0.7 if distill else 0.0, **extra)
    teacher = torch.rand(3, I, generator=torch.Generator().manual_seed(3)) if distill else None
    groups = np.array([0, 1, 2, -1, 0, 1, 2])
    clients = np.array([3, 0, 5, 6, 1, 2, 4])
    up = train_cohort(shared, store_a, spec, clients, indptr, items, labels, hyper, teacher=teacher, groups=groups[clients] if distill else None, workers=workers)
    for j, c in enumerate(clients):
        sl = slice(indptr[c], indptr[c + 1])
        g = int(groups[c]) if distill else -1
        one = train_client(shared, store_b, spec, int(c), items[sl], labels[sl], hyper, teacher_row=teacher[g] if (distill and g >= 0) else None, group=g)
        a, b = up.row_ptr[j], up.row_ptr[j + 1]
        np.testing.assert_array_equal(up.row_items[a:b], one.row_items)
        torch.testing.assert_close(up.item_delta[a:b], one.item_delta, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(up.head_after[j], one.head_after[0], atol=2e-6, rtol=1e-5)
        assert up.loss[j] == pytest.approx(one.loss[0], rel=1e-5)
    torch.testing.assert_close(store_a.user_embedding, store_b.user_embedding, atol=2e-6, rtol=1e-5)
    if spec.personal_items:
        np.testing.assert_array_equal(store_a.personal.keys, store_b.personal.keys)
        torch.testing.assert_close(store_a.personal.values, store_b.personal.values, atol=2e-6, rtol=1e-5)
    if distill:
        torch.testing.assert_close(store_a.ema_ratio, store_b.ema_ratio, rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_worker_threads_do_not_change_the_update(workers: int) -> None:
    """Clients share no state and each trains sequentially, so how the cohort is split
    across threads cannot change a single bit of the update."""
    spec, shared, store_a = _setup("fedrap")
    store_b = store_a.snapshot()
    indptr, items, labels = _samples(6)
    hyper = _hyper()
    teacher = torch.rand(3, I, generator=torch.Generator().manual_seed(9))
    clients = np.arange(U)
    groups = clients % 3
    ref = train_cohort(shared, store_a, spec, clients, indptr, items, labels, hyper, teacher=teacher, groups=groups, workers=1)
    threads = torch.get_num_threads()
    got = train_cohort(shared, store_b, spec, clients, indptr, items, labels, hyper, teacher=teacher, groups=groups, workers=workers)
    assert torch.get_num_threads() == threads
    for a, b in [(got.item_delta, ref.item_delta), (got.head_after, ref.head_after), (store_b.personal.values, store_a.personal.values), (store_b.user_embedding, store_a.user_embedding)]:
        assert torch.equal(a, b)
    torch.testing.assert_close(store_b.ema_ratio, store_a.ema_ratio, rtol=0, atol=0, equal_nan=True)
    np.testing.assert_array_equal(got.loss, ref.loss)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_bad_worker_counts_are_rejected(workers) -> None:
    spec, shared, store = _setup("fedncf")
    indptr, items, labels = _samples(1)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        train_cohort(shared, store, spec, np.arange(U), indptr, items, labels, _hyper(), workers=workers)


def test_repeated_rows_in_a_batch_get_every_gradient() -> None:
    """An item drawn twice in one batch is updated with the sum of both gradients (as autograd does)."""
    spec, shared, store_a = _setup("fedncf")
    store_b = store_a.snapshot()
    items = np.array([3, 3, 3, 7, 7, 1])
    labels = np.array([1, 0, 0, 1, 0, 0], dtype=np.float32)
    indptr = np.array([0, 6] + [6] * (U - 1))
    hyper = _hyper(distill=0.0, epochs=1, batch_size=8)
    up = train_cohort(shared, store_a, spec, np.array([0]), indptr, items, labels, hyper)
    one = train_client(shared, store_b, spec, 0, items, labels, hyper, teacher_row=None, group=-1)
    torch.testing.assert_close(up.item_delta, one.item_delta, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["fedrap", "fedncf"])
def test_a_lone_client_trains_a_copy_of_the_shared_head(backbone: str) -> None:
    """A cohort of one must not write through to the broadcast parameters (a [1, h, d]
    view of the shared head would look contiguous and be trained in place)."""
    spec, shared, store = _setup(backbone)
    before = shared.clone()
    indptr, items, labels = _samples(2)
    up = train_cohort(shared, store, spec, np.array([2]), indptr, items, labels, _hyper(distill=0.0))
    torch.testing.assert_close(shared.head_flat(), before.head_flat(), rtol=0, atol=0)
    torch.testing.assert_close(shared.item_table, before.item_table, rtol=0, atol=0)
    assert float(up.head_delta.abs().sum()) > 0


def test_shared_params_not_modified_and_private_rows_sparse() -> None:
    spec, shared, store = _setup("fedrap")
    before = shared.clone()
    indptr, items, labels = _samples(1)
    up = train_cohort(shared, store, spec, np.arange(U), indptr, items, labels, _hyper(distill=0.0))
    torch.testing.assert_close(shared.item_table, before.item_table, rtol=0, atol=0)
    torch.testing.assert_close(shared.head_flat(), before.head_flat(), rtol=0, atol=0)
    # exactly the (client, item) pairs that were trained are stored; everything else reads as zero
    expected = np.unique(np.repeat(np.arange(U), np.diff(indptr)) * I + items)
    np.testing.assert_array_equal(store.personal.keys, expected)
    untouched = np.setdiff1d(np.arange(U * I), expected)[:50]
    assert torch.count_nonzero(store.personal.gather(untouched)) == 0
    # uploads only carry touched rows
    assert up.row_items.size == expected.size


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 50), min_size=1, max_size=6), epochs=st.integers(1, 3))
def test_shuffles_permute_each_client_and_ignore_the_cohort(counts: list[int], epochs: int) -> None:
    """Every epoch's order permutes each client's own range, and a client's order is the
    same whether it trains in a cohort or alone (it depends on its id, not its position)."""
    counts_a = np.array(counts, dtype=np.int64)
    clients = np.arange(len(counts), dtype=np.int64) + 10
    orders = epoch_orders(clients, counts_a, epochs=epochs, seed=9)
    starts = np.concatenate([[0], np.cumsum(counts_a)])
    for c, n in enumerate(counts_a):
        mine = orders[:, starts[c] : starts[c + 1]]
        alone = epoch_orders(clients[c : c + 1], counts_a[c : c + 1], epochs=epochs, seed=9)
        np.testing.assert_array_equal(mine - starts[c], alone)
        for e in range(epochs):
            assert np.array_equal(np.sort(mine[e]), np.arange(starts[c], starts[c] + n))


def test_rowstore_semantics() -> None:
    rs = RowStore(4, 10, 3)
    assert torch.count_nonzero(rs.gather(np.array([0, 5, 39]))) == 0
    rs.put(np.array([12, 3]), torch.tensor([[1.0, 1, 1], [2.0, 2, 2]]))
    rs.put(np.array([3, 30]), torch.tensor([[5.0, 5, 5], [7.0, 7, 7]]))
    got = rs.gather(np.array([3, 12, 30, 4]))
    torch.testing.assert_close(got, torch.tensor([[5.0, 5, 5], [1.0, 1, 1], [7.0, 7, 7], [0.0, 0, 0]]))
    owner, items, values = rs.user_rows(np.array([3, 1, 0]))
    np.testing.assert_array_equal(owner, [0, 1, 2])
    np.testing.assert_array_equal(items, [0, 2, 3])
    torch.testing.assert_close(values, torch.tensor([[7.0, 7, 7], [1.0, 1, 1], [5.0, 5, 5]]))
    with pytest.raises(ValueError, match="unique"):
        rs.put(np.array([1, 1]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        rs.put(np.array([1]), torch.zeros(2, 3))


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(0, 4 * 9 - 1), max_size=12, unique=True), min_size=1, max_size=5),
    order=st.sampled_from(["as drawn", "ascending"]),
)
def test_rowstore_put_matches_a_dense_table(batches: list[list[int]], order: str) -> None:
    """Any sequence of inserts and overwrites reads back like a dense [U * I, d] table
    (keys in any order, or ascending as the trainers pass them: put's fast path)."""
    rs = RowStore(4, 9, 2)
    dense = torch.zeros(36, 2)
    for step, batch in enumerate(batches):
        keys = np.array(sorted(batch) if order == "ascending" else batch[::-1], dtype=np.int64)
        vals = torch.arange(keys.size * 2, dtype=torch.float32).view(-1, 2) + 100 * step
        rs.put(keys, vals)
        if keys.size:
            dense[torch.from_numpy(keys)] = vals
        assert np.all(np.diff(rs.keys) > 0)
    torch.testing.assert_close(rs.gather(np.arange(36)), dense, rtol=0, atol=0)
    # a copy, and a store rebuilt from (keys, values), read the same and are independent
    copy = rs.copy()
    rebuilt = RowStore.from_rows(4, 9, rs.keys[::-1].copy(), rs.values.flip(0))
    rs.put(np.arange(36), torch.full((36, 2), -1.0))
    for other in (copy, rebuilt):
        torch.testing.assert_close(other.gather(np.arange(36)), dense, rtol=0, atol=0)
        np.testing.assert_array_equal(other.keys, copy.keys)


def test_rowstore_slots_for_trains_rows_in_place() -> None:
    """slots_for stores a zero row for every new key (in any key order), keeps stored
    rows, and writes through buffer[slots] are what gather reads afterwards."""
    rs = RowStore(3, 10, 2)
    rs.put(np.array([4, 12]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    keys = np.array([25, 4, 7, 12])  # two new, two stored, not ascending
    slots = rs.slots_for(keys)
    buf = rs.buffer
    torch.testing.assert_close(buf[torch.from_numpy(slots)], torch.tensor([[0.0, 0], [1, 1], [0, 0], [2, 2]]))
    buf[torch.from_numpy(slots)] += torch.arange(8.0).view(4, 2)
    torch.testing.assert_close(rs.gather(keys), torch.tensor([[0.0, 1], [3, 4], [4, 5], [8, 9]]))
    np.testing.assert_array_equal(rs.keys, [4, 7, 12, 25])
    with pytest.raises(ValueError, match="unique"):
        rs.slots_for(np.array([7, 4, 7]))


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(0, 99), max_size=40), dense=st.booleans())
def test_unique_keys_equals_numpy_unique(keys: list[int], dense: bool) -> None:
    """Both paths of unique_keys (dense marking, and sorting for large key ranges) give
    np.unique's values and inverse."""
    from gfmfr_secure.client import cohort

    arr = np.array(keys, dtype=np.int64)
    expected = np.unique(arr, return_inverse=True)
    universe = 100 if dense else cohort.DENSE_KEYS + 1
    got = cohort.unique_keys(arr, universe)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1].reshape(-1), expected[1].reshape(-1))


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=6), epochs=st.integers(1, 3), seed=st.integers(0, 2**64 - 1))
def test_epoch_orders_follow_the_hash_definition(counts: list[int], epochs: int, seed: int) -> None:
    """The compiled per-client shuffle equals its vectorised definition: each client's
    samples in ascending order of ``hash64(seed, client, epoch, position) >> 24``, ties in
    position order (one stable sort of the packed (owner, key) over the cohort)."""
    counts_a = np.array(counts, dtype=np.int64)
    clients = np.arange(len(counts), dtype=np.int64) * 7 + 3
    owner = np.repeat(np.arange(len(counts)), counts_a)
    starts = np.concatenate([[0], np.cumsum(counts_a)[:-1]])
    pos = np.arange(counts_a.sum()) - starts[owner]
    got = epoch_orders(clients, counts_a, epochs=epochs, seed=seed)
    for e in range(epochs):
        keys = hash64(seed, clients[owner], e, pos)
        packed = (owner.astype(np.uint64) << np.uint64(40)) | (keys >> np.uint64(24))
        np.testing.assert_array_equal(got[e], np.argsort(packed, kind="stable"))
