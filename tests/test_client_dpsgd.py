"""Record-level DP-SGD inside a client (Opacus): reference parity, clipping, accounting, layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from client_setup import make_setup

from gfmfr_secure.client.cohort import train_cohort
from gfmfr_secure.client.dpsgd import (
    RECORD_LEVEL_UNIT,
    compose_client_epsilon,
    train_client_dpsgd,
    train_cohort_dpsgd,
)
from gfmfr_secure.client.local import train_client
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy.accounting import epsilon_for
from gfmfr_secure.types import LocalHyper

U, I, D = 7, 40, 8
CLIENT = 2


def _hyper(**kw) -> LocalHyper:
    base = {
        "lr_network": 0.05, "lr_items": 2.0, "weight_decay": 1e-3, "alpha": 0.1, "beta": 0.1, "distill": 0.0,
        "ema_decay": 0.9, "max_ratio": 5.0, "batch_size": 8, "epochs": 2, "shuffle_seed": 5,
    }
    base.update(kw)
    return LocalHyper(**base)


def _setup(name: str, scorer: str = "mlp"):
    return make_setup(name, U, I, D, scorer)


def _client_samples(m: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, I, m), (rng.random(m) < 0.3).astype(np.float32)


def _cohort_samples(seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 40, U)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    items = rng.integers(0, I, indptr[-1])
    labels = (rng.random(indptr[-1]) < 0.3).astype(np.float32)
    return indptr, items, labels


def _flat_params(shared, store, spec, client: int, row_items: np.ndarray, item_rows: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Every trained parameter of ``client`` as one vector (item rows, personal rows, head, user embedding)."""
    parts = [item_rows.reshape(-1), head.reshape(-1)]
    if spec.personal_items:
        parts.append(store.personal.gather(client * I + row_items).reshape(-1))
    if spec.user_embedding:
        parts.append(store.user_embedding[client].reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("scorer", ["mlp", "dot"])
@pytest.mark.parametrize("backbone", ["fedrap", "fedncf", "pfedrec"])
@pytest.mark.parametrize("distill", [False, True])
def test_full_batch_without_noise_equals_reference(backbone: str, distill: bool, scorer: str) -> None:
    """sigma = 0, no effective clipping, q = 1: DP-SGD is full-batch GD, i.e. ``train_client`` with one batch,
    for both scorers (dot: user lr, the user vector's weight decay and the rows' L2 included).

    With ``ema_decay = 1`` the reference keeps the preset ratio fixed, which is the DP path's fixed lambda.
    """
    spec, shared, store_a = _setup(backbone, scorer)
    store_a.ema_ratio[CLIENT] = 0.8
    store_b = store_a.snapshot()
    items, labels = _client_samples()
    extra = {"scorer": "dot", "lr_user": 0.3, "embedding_weight_decay": 0.05} if scorer == "dot" else {}
    hyper = _hyper(distill=0.7 if distill else 0.0, ema_decay=1.0, batch_size=items.size, epochs=3, **extra)
    teacher = torch.rand(I, generator=torch.Generator().manual_seed(3)) if distill else None
    group = 1 if distill else -1
    up, rep = train_client_dpsgd(
        shared, store_a, spec, CLIENT, items, labels, hyper,
        noise_multiplier=0.0, max_grad_norm=1e9, seed=0, teacher_row=teacher, group=group,
    )
    one = train_client(shared, store_b, spec, CLIENT, items, labels, hyper, teacher_row=teacher, group=group)
    assert rep.sample_rate == 1.0 and rep.steps == 3 and rep.batch_sizes == (items.size,) * 3
    assert rep.distill_lambda == pytest.approx(0.7 * 0.8 if distill else 0.0)
    np.testing.assert_array_equal(up.row_items, one.row_items)
    np.testing.assert_array_equal(up.row_ptr, one.row_ptr)
    torch.testing.assert_close(up.item_delta, one.item_delta, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(up.head_after, one.head_after, atol=2e-6, rtol=1e-5)
    if spec.private_head:
        assert up.head_delta is None and one.head_delta is None
        torch.testing.assert_close(store_a.heads, store_b.heads, atol=2e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(up.head_delta, one.head_delta, atol=2e-6, rtol=1e-5)
    assert up.loss[0] == pytest.approx(one.loss[0], rel=1e-5)
    torch.testing.assert_close(store_a.user_embedding, store_b.user_embedding, atol=2e-6, rtol=1e-5)
    if spec.personal_items:
        np.testing.assert_array_equal(store_a.personal.keys, store_b.personal.keys)
        torch.testing.assert_close(store_a.personal.values, store_b.personal.values, atol=2e-6, rtol=1e-5)
    assert store_a.ema_ratio[CLIENT].item() == 0.8  # the running ratio is not updated under DP-SGD
    if scorer == "dot":  # the unused first layer stays zero; the user vector w2 trains
        assert not up.head_after[0, : 2 * D * D + D].any()
        assert not torch.equal(up.head_after[0, 2 * D * D + D : -1], shared.w2)


@pytest.mark.parametrize("backbone", ["fedrap", "pfedrec"])
def test_per_example_clipping_bounds_every_step(backbone: str) -> None:
    """sigma = 0, tiny clip, no weight decay, one lr: each step moves all parameters by <= lr * C * |B_t| / B_exp."""
    lr, clip = 0.1, 1e-3
    hyper = _hyper(lr_network=lr, lr_items=lr, weight_decay=0.0, epochs=1)
    items, labels = _client_samples()
    row_items = np.unique(items)

    # q = 1, one step: the batch is all records, so the bound is exactly lr * C.
    spec, shared, store = _setup(backbone)
    head0 = store.heads[CLIENT] if spec.private_head else shared.head_flat()
    rows0 = shared.item_table[torch.from_numpy(row_items)]
    before = _flat_params(shared, store, spec, CLIENT, row_items, rows0, head0)
    up, rep = train_client_dpsgd(
        shared, store, spec, CLIENT, items, labels, hyper,
        noise_multiplier=0.0, max_grad_norm=clip, seed=0, expected_batch_size=items.size,
    )
    after = _flat_params(shared, store, spec, CLIENT, row_items, rows0 + up.item_delta, up.head_after[0])
    step = float((after - before).norm())
    assert rep.steps == 1 and rep.expected_batch_size == items.size
    assert 0.0 < step <= lr * clip * (1 + 1e-4)

    # Without clipping the same step is far larger: the bound above is the clipping's doing.
    spec, shared, store = _setup(backbone)
    up_free, _ = train_client_dpsgd(
        shared, store, spec, CLIENT, items, labels, hyper,
        noise_multiplier=0.0, max_grad_norm=1e9, seed=0, expected_batch_size=items.size,
    )
    assert float(up_free.item_delta.norm()) > 10 * lr * clip

    # Poisson batches (q = 1/4) over 3 epochs: the total move is bounded by the sum of the per-step bounds.
    spec, shared, store = _setup(backbone)
    up, rep = train_client_dpsgd(
        shared, store, spec, CLIENT, items, labels, _hyper(lr_network=lr, lr_items=lr, weight_decay=0.0, epochs=3),
        noise_multiplier=0.0, max_grad_norm=clip, seed=1, expected_batch_size=8,
    )
    after = _flat_params(shared, store, spec, CLIENT, row_items, rows0 + up.item_delta, up.head_after[0])
    assert rep.steps == 3 * 4 and rep.sample_rate == 0.25 and rep.expected_batch_size == 7
    bound = lr * clip * sum(rep.batch_sizes) / rep.expected_batch_size
    assert 0.0 < float((after - before).norm()) <= bound * (1 + 1e-4)


def test_epsilon_matches_project_accounting_and_composes() -> None:
    spec, shared, store = _setup("fedncf")
    items, labels = _client_samples()
    sigma, delta = 1.1, 1e-4
    hyper = _hyper(epochs=2)
    reports = []
    for r in range(3):
        _, rep = train_client_dpsgd(
            shared, store, spec, CLIENT, items, labels, hyper,
            noise_multiplier=sigma, max_grad_norm=1.0, seed=r, expected_batch_size=4, delta=delta,
        )
        reports.append(rep)
    rep = reports[0]
    q = 1 / math.ceil(items.size / 4)
    assert rep.sample_rate == q and rep.steps == 2 * math.ceil(items.size / 4) == len(rep.batch_sizes)
    assert rep.noise_multiplier == sigma and rep.max_grad_norm == 1.0 and rep.delta == delta
    assert rep.unit == RECORD_LEVEL_UNIT and "not user-level" in rep.unit
    assert rep.to_dict()["batch_sizes"] == list(rep.batch_sizes)
    assert rep.epsilon == pytest.approx(epsilon_for(sigma, q, rep.steps, delta), rel=1e-9)

    eps = [compose_client_epsilon(reports[: t + 1], delta) for t in range(3)]
    assert eps[0] == pytest.approx(rep.epsilon, rel=1e-9)
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(epsilon_for(sigma, q, 3 * rep.steps, delta), rel=1e-9)
    assert compose_client_epsilon([(sigma, q, rep.steps)] * 3, delta) == pytest.approx(eps[2], rel=1e-9)
    assert compose_client_epsilon([], delta) == 0.0
    assert compose_client_epsilon([(0.0, q, 1)], delta) == math.inf

    _, rep0 = train_client_dpsgd(
        shared, store, spec, CLIENT, items, labels, hyper, noise_multiplier=0.0, max_grad_norm=1.0, seed=0, expected_batch_size=4,
    )
    assert rep0.epsilon == math.inf


def test_same_seed_same_update_different_seed_differs() -> None:
    items, labels = _client_samples()
    hyper = _hyper()

    def run(**kw):
        spec, shared, store = _setup("fedrap")
        up, rep = train_client_dpsgd(shared, store, spec, CLIENT, items, labels, hyper, noise_multiplier=1.0, max_grad_norm=0.5, **kw)
        return up, rep, store

    global_state = torch.random.get_rng_state()
    a, ra, sa = run(seed=11)
    b, rb, sb = run(seed=11)
    c, _, _ = run(seed=12)
    assert torch.equal(torch.random.get_rng_state(), global_state)  # no global RNG drawn
    assert torch.equal(a.item_delta, b.item_delta) and torch.equal(a.head_after, b.head_after)
    assert torch.equal(sa.user_embedding, sb.user_embedding) and torch.equal(sa.personal.values, sb.personal.values)
    assert ra.batch_sizes == rb.batch_sizes
    assert not torch.equal(a.item_delta, c.item_delta)
    assert not torch.equal(a.head_after, c.head_after)
    g1, _, _ = run(generator=torch.Generator().manual_seed(5))
    g2, _, _ = run(generator=torch.Generator().manual_seed(5))
    assert torch.equal(g1.item_delta, g2.item_delta)


@pytest.mark.parametrize("backbone", ["fedrap", "pfedrec"])
def test_cohort_layout_matches_train_cohort(backbone: str) -> None:
    spec, shared, store_a = _setup(backbone)
    store_b = store_a.snapshot()
    indptr, items, labels = _cohort_samples()
    hyper = _hyper(distill=0.5)
    teacher = torch.rand(3, I, generator=torch.Generator().manual_seed(3))
    clients = np.array([3, 0, 5, 6, 1])
    groups = np.array([0, -1, 2, 1, 0])
    ref = train_cohort(shared, store_a, spec, clients, indptr, items, labels, hyper, teacher=teacher, groups=groups)
    up, reports = train_cohort_dpsgd(
        shared, store_b, spec, clients, indptr, items, labels, hyper,
        noise_multiplier=0.8, max_grad_norm=1.0, seed=3, teacher=teacher, groups=groups,
    )
    np.testing.assert_array_equal(up.clients, ref.clients)
    np.testing.assert_array_equal(up.n_samples, ref.n_samples)
    np.testing.assert_array_equal(up.row_ptr, ref.row_ptr)
    np.testing.assert_array_equal(up.row_items, ref.row_items)
    np.testing.assert_array_equal(up.group, ref.group)
    assert up.item_delta.shape == ref.item_delta.shape and up.item_delta.dtype == ref.item_delta.dtype
    assert up.head_after.shape == ref.head_after.shape
    assert (up.head_delta is None) == (ref.head_delta is None) == spec.private_head
    if ref.head_delta is not None:
        assert up.head_delta.shape == ref.head_delta.shape
    assert up.loss.shape == ref.loss.shape and np.all(np.isfinite(up.loss))
    assert [r.client for r in reports] == clients.tolist()
    assert [r.n_samples for r in reports] == up.n_samples.tolist()
    assert [r.distill_lambda > 0 for r in reports] == (groups >= 0).tolist()
    for r in reports:  # clients with fewer records than the batch take full batches
        assert r.sample_rate == 1 / math.ceil(r.n_samples / min(hyper.batch_size, r.n_samples))

    # A client's update does not depend on the rest of the cohort.
    spec, shared, store_c = _setup(backbone)
    alone, _ = train_cohort_dpsgd(
        shared, store_c, spec, clients[2:3], indptr, items, labels, hyper,
        noise_multiplier=0.8, max_grad_norm=1.0, seed=3, teacher=teacher, groups=groups[2:3],
    )
    a, b = up.row_ptr[2], up.row_ptr[3]
    torch.testing.assert_close(alone.item_delta, up.item_delta[a:b], rtol=0, atol=0)


def test_data_independent_rows_and_empty_batches() -> None:
    spec, shared, store = _setup("fedrap")
    items, labels = _client_samples(m=5)
    hyper = _hyper(batch_size=1, epochs=4)
    rows = np.arange(I)
    up, rep = train_client_dpsgd(
        shared, store, spec, CLIENT, items, labels, hyper, noise_multiplier=0.0, max_grad_norm=1.0, seed=0, rows=rows,
    )
    np.testing.assert_array_equal(up.row_items, rows)
    assert up.item_delta.shape == (I, D)
    untouched = torch.from_numpy(np.setdiff1d(rows, items))
    assert torch.count_nonzero(up.item_delta[untouched]) == 0  # no noise: rows no record touches stay put
    assert rep.steps == 4 * 5 and 0 in rep.batch_sizes  # empty Poisson batches still step
    assert torch.isfinite(up.item_delta).all() and torch.isfinite(up.head_after).all()

    spec, shared, store = _setup("fedrap")
    noisy, _ = train_client_dpsgd(
        shared, store, spec, CLIENT, items, labels, hyper, noise_multiplier=1.0, max_grad_norm=1.0, seed=0, rows=rows,
    )
    assert torch.count_nonzero(noisy.item_delta[untouched]) > 0  # with noise every uploaded row is perturbed
    assert len(store.personal) == I  # the personal rows of the whole row set are materialised


def test_invalid_arguments_raise_clear_errors() -> None:
    spec, shared, store = _setup("fedncf")
    items, labels = _client_samples(m=10)
    hyper = _hyper()

    def call(**kw):
        args = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 0}
        args.update(kw)
        return train_client_dpsgd(shared, store, spec, CLIENT, items, labels, hyper, **args)

    with pytest.raises(ConfigError, match="noise_multiplier must be finite and >= 0"):
        call(noise_multiplier=-0.5)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        call(noise_multiplier=float("nan"))
    with pytest.raises(ConfigError, match="max_grad_norm must be finite and > 0"):
        call(max_grad_norm=0.0)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        call(max_grad_norm=-1.0)
    with pytest.raises(ConfigError, match=r"expected_batch_size=11 is larger than client 2's 10 training samples"):
        call(expected_batch_size=11)
    with pytest.raises(ConfigError, match="expected_batch_size must be an integer >= 1"):
        call(expected_batch_size=0)
    with pytest.raises(ConfigError, match="exactly one of seed and generator"):
        call(generator=torch.Generator())
    with pytest.raises(ConfigError, match="exactly one of seed and generator"):
        call(seed=None)
    with pytest.raises(ConfigError, match="delta"):
        call(delta=1.0)
    with pytest.raises(ConfigError, match="accountant: unknown name 'gdpx'"):
        call(accountant="gdpx")
    with pytest.raises(ConfigError, match="rows must contain every item"):
        call(rows=np.setdiff1d(np.arange(I), items[:1]))
    with pytest.raises(ConfigError, match="steps must be an integer"):
        compose_client_epsilon([(1.0, 0.5, -1)], 1e-5)
