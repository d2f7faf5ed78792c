"""Aggregation backends: contract tests and the sums they must reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.aggregation import AGGREGATORS, get_aggregator, group_sums
from gfmfr_secure.types import CohortUpdate, Exposure

I, D, H = 12, 3, 5


def make_update(n: int, seed: int) -> CohortUpdate:
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(I, size=rng.integers(1, I), replace=False)) for _ in range(n)]
    ptr = np.concatenate([[0], np.cumsum([r.size for r in rows])])
    return CohortUpdate(
        clients=rng.permutation(100)[:n].astype(np.int64),
        n_samples=rng.integers(1, 50, n),
        row_ptr=ptr.astype(np.int64),
        row_items=np.concatenate(rows).astype(np.int64),
        item_delta=torch.randn(int(ptr[-1]), D, generator=torch.Generator().manual_seed(seed)),
        head_delta=torch.randn(n, H, generator=torch.Generator().manual_seed(seed + 1)),
        head_after=torch.randn(n, H),
        group=np.full(n, -1, dtype=np.int64),
        loss=np.zeros(n),
    )


def dense(update: CohortUpdate) -> torch.Tensor:
    return torch.stack([update.dense_item_delta(j, I) for j in range(len(update))])  # [n, I, D]


def permuted(update: CohortUpdate, perm: np.ndarray) -> CohortUpdate:
    rows = [update.row_items[update.row_ptr[j]: update.row_ptr[j + 1]] for j in perm]
    vals = [update.item_delta[update.row_ptr[j]: update.row_ptr[j + 1]] for j in perm]
    ptr = np.concatenate([[0], np.cumsum([r.size for r in rows])])
    return CohortUpdate(update.clients[perm], update.n_samples[perm], ptr, np.concatenate(rows), torch.cat(vals),
                        update.head_delta[torch.from_numpy(perm)], update.head_after[torch.from_numpy(perm)], update.group[perm], update.loss[perm])


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_backend_contract(name: str) -> None:
    """Every backend: sums equal the plain sums; it exposes no more than it declares."""
    agg = get_aggregator(name)
    up = make_update(6, 0)
    # secure backends sum unweighted uploads of clients that each chose a group
    secure = agg.exposure != Exposure.PER_CLIENT
    w = np.ones(6) if secure else np.arange(1, 7, dtype=np.float64)
    groups = np.array([0, 1, 0, 2, 1, 0 if secure else -1])
    res = agg.aggregate(up, n_items=I, weights=w, groups=groups, n_groups=3)
    tol = 1e-3 if name == "ckks" else 1e-5  # CKKS is approximate (secagg/ckks.py documents its error)
    expected = (dense(up) * torch.tensor(w, dtype=torch.float32).view(-1, 1, 1)).sum(0)
    torch.testing.assert_close(res.item_sum, expected, atol=tol, rtol=1e-5)
    torch.testing.assert_close(res.head_sum, (up.head_delta * torch.tensor(w, dtype=torch.float32)[:, None]).sum(0), atol=tol, rtol=1e-5)
    assert res.weight_total == pytest.approx(w.sum(), abs=tol * 10)
    expected_counts = torch.tensor([3.0, 2.0, 1.0]) if secure else torch.tensor([2.0, 2.0, 1.0])
    torch.testing.assert_close(res.group_counts, expected_counts, atol=1e-3 if name == "ckks" else 1e-4, rtol=0)  # CKKS releases are flooded
    for g in range(3):
        sel = torch.from_numpy(groups == g)
        torch.testing.assert_close(res.group_item_sum[g], dense(up)[sel].sum(0), atol=tol, rtol=1e-5)
        torch.testing.assert_close(res.group_head_sum[g], up.head_delta[sel].sum(0), atol=tol, rtol=1e-5)
    if agg.exposure != Exposure.PER_CLIENT:
        assert res.per_client is None


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 8), seed=st.integers(0, 1000), data=st.data())
def test_sums_invariant_to_client_order(n: int, seed: int, data) -> None:
    up = make_update(n, seed)
    perm = np.array(data.draw(st.permutations(range(n))))
    groups = np.array(data.draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n)))
    a = get_aggregator("plain").aggregate(up, n_items=I, weights=np.ones(n), groups=groups, n_groups=3)
    b = get_aggregator("plain").aggregate(permuted(up, perm), n_items=I, weights=np.ones(n), groups=groups[perm], n_groups=3)
    torch.testing.assert_close(a.item_sum, b.item_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.group_item_sum, b.group_item_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.group_head_sum, b.group_head_sum, atol=1e-5, rtol=1e-5)


def test_group_sums_errors_and_registry() -> None:
    up = make_update(3, 1)
    with pytest.raises(ValueError, match="group ids"):
        group_sums(up, I, np.array([0, 5, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        group_sums(up, I, np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="unknown aggregation backend 'nope'; known: .*plain"):
        get_aggregator("nope")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 7), n_groups=st.integers(1, 4), seed=st.integers(0, 10_000), head=st.booleans(), write_count=st.booleans())
def test_dense_uploads_match_a_per_client_layout(n: int, n_groups: int, seed: int, head: bool, write_count: bool) -> None:
    """Each row of the dense layout is its client's block ``[I*d item delta | head | count]`` at its group, zero elsewhere."""
    from gfmfr_secure.aggregation.layout import dense_uploads
    from gfmfr_secure.privacy.release import ReleaseLayout

    up = make_update(n, seed)
    if not head:
        up = CohortUpdate(up.clients, up.n_samples, up.row_ptr, up.row_items, up.item_delta, None, None, up.group, up.loss)
    groups = np.random.default_rng(seed).integers(0, n_groups, n)
    layout = ReleaseLayout(n_groups, I, D, H if head else 0, 0.5, write_count)
    out = dense_uploads(up, layout, groups if n_groups > 1 else None)
    assert out.shape == (n, n_groups * layout.block_size) and out.dtype == np.float32
    for j in range(n):
        expect = np.zeros((n_groups, layout.block_size), dtype=np.float32)
        g = int(groups[j]) if n_groups > 1 else 0
        expect[g, : I * D] = up.dense_item_delta(j, I).numpy().reshape(-1)
        if head:
            expect[g, I * D : I * D + H] = up.head_delta[j].numpy()
        expect[g, -1] = 0.5 if write_count else 0.0
        np.testing.assert_array_equal(out[j], expect.reshape(-1))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), n_groups=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_dense_rows_equal_the_stacked_layout_with_noise_shares(n: int, n_groups: int, seed: int) -> None:
    """``DenseRows.row`` gives ``noisy_dense_uploads``'s rows bit for bit, into the caller's buffer or a new one."""
    from gfmfr_secure.aggregation.layout import DenseRows, dense_uploads, noisy_dense_uploads
    from gfmfr_secure.privacy.release import NoiseShares, ReleaseLayout, ReleaseNoise

    up = make_update(n, seed)
    groups = np.random.default_rng(seed).integers(0, n_groups, n)
    layout = ReleaseLayout(n_groups, I, D, H, 1.0)
    shares = NoiseShares(bytes(range(32)), 0, up.clients, 0.3, layout)
    noise = ReleaseNoise(layout, torch.zeros(layout.shape, dtype=torch.float64), shares)
    for nz in (None, noise):
        stacked = noisy_dense_uploads(up, layout, groups, nz)
        rows = DenseRows(up, layout, groups, nz)
        assert rows.shape == stacked.shape
        buf = np.full(stacked.shape[1], np.nan, dtype=np.float32)
        for j in range(n):
            np.testing.assert_array_equal(rows.row(j), stacked[j])
            assert rows.row(j, buf) is buf
            np.testing.assert_array_equal(buf, stacked[j])
    plain = dense_uploads(up, layout, groups)
    noisy = noisy_dense_uploads(up, layout, groups, noise)
    for j in range(n):  # the share is added on top of the data, in float64 then rounded
        np.testing.assert_array_equal(noisy[j], (plain[j] + shares.client(j).reshape(-1).numpy()).astype(np.float32))
