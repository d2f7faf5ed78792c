"""The threaded masking driver and the server's split of receiving an upload into check and accept.

With ``secrets="reproducible"`` every client's upload is a function of the seed alone, so
a round played on several threads must give the same uploads, the same exact sum and the
same survivors as on one, with and without dropouts; the server's parallel half
(:meth:`SecAggServer.check_upload`) changes no state, and its serial half refuses a
second upload from a client. The driver only uses threads for vectors of at least
``PARALLEL_MIN_DIM`` words, and forks a process for half the ring only from
``FORK_MIN_CLIENTS`` clients; the tests lower both floors so their small rounds take
those paths.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gfmfr_secure.secagg.masking import driver
from gfmfr_secure.secagg.masking import SecAggClient, SecAggConfig, SecAggError, SecAggServer, neighbourhood_graph, secure_sum
from gfmfr_secure.secagg.simulation import simulation_workers


@pytest.fixture(autouse=True)
def _threads_for_short_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "PARALLEL_MIN_DIM", 1)
    monkeypatch.setattr(driver, "FORK_MIN_CLIENTS", 1)


@pytest.mark.parametrize(("n", "neighbours", "dropped"), [(30, 6, ()), (30, 6, (3, 17)), (9, None, (4,))])
def test_threads_give_the_same_round(n: int, neighbours: int | None, dropped: tuple[int, ...]) -> None:
    x = np.random.default_rng(n).uniform(-8, 8, (n, 257)).astype(np.float32)
    hood = n if neighbours is None else neighbours + 1
    kwargs = dict(value_bound=8.0, threshold=hood // 2 + 1, neighbours=neighbours, seed=5, dropped=dropped, secrets="reproducible")
    one = secure_sum(x, workers=1, **kwargs)  # type: ignore[arg-type]
    for workers in (2, 4):
        many = secure_sum(x, workers=workers, **kwargs)  # type: ignore[arg-type]
        np.testing.assert_array_equal(many.fixed_total, one.fixed_total)
        assert many.survivors == one.survivors and many.dropped == one.dropped == tuple(sorted(dropped))
        assert many.upload_digests == one.upload_digests  # the same bytes left every client
        np.testing.assert_array_equal(many.costs.bytes_up, one.costs.bytes_up)
    alive = [u for u in range(n) if u not in dropped]
    exact = x[alive].astype(np.float64).sum(0)
    assert np.abs(one.total - exact).max() <= len(alive) * 2.0 ** -(one.frac_bits + 1)


@pytest.mark.parametrize("threads", [True, False])
@pytest.mark.parametrize("dropped", [(), (2, 11)])
def test_a_forked_half_ring_sends_the_same_messages(monkeypatch: pytest.MonkeyPatch, threads: bool, dropped: tuple[int, ...]) -> None:
    """Half the ring played in a forked process (share round; masking round too without threads): the same transcript and sum."""
    if not threads:
        monkeypatch.setattr(driver, "PARALLEL_MIN_DIM", 1 << 30)
    x = np.random.default_rng(7).uniform(-3, 3, (16, 24)).astype(np.float32)
    kwargs = dict(value_bound=3.0, threshold=4, neighbours=4, seed=9, dropped=dropped, secrets="reproducible", record=True)
    monkeypatch.setattr(driver, "FORK_MIN_CLIENTS", 1 << 30)
    one = secure_sum(x, workers=1, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(driver, "FORK_MIN_CLIENTS", 1)
    seen: list[int] = []
    two = secure_sum(x, workers=2, on_upload=lambda u, _: seen.append(u), **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(two.fixed_total, one.fixed_total)
    assert two.recording.transcript == one.recording.transcript
    assert two.survivors == one.survivors and sorted(seen) == list(two.survivors)
    for field in ("bytes_up", "bytes_down"):
        np.testing.assert_array_equal(getattr(two.costs, field), getattr(one.costs, field))
    assert np.all(two.costs.client_share_s > 0) and np.all(two.costs.client_mask_s[list(two.survivors)] > 0)


@pytest.mark.parametrize("half", [0, 1])
def test_an_error_in_either_half_of_the_ring_stops_the_round(monkeypatch: pytest.MonkeyPatch, half: int) -> None:
    """A bad row met by the parent's arc or by the forked process's arc is raised as in one process."""
    monkeypatch.setattr(driver, "PARALLEL_MIN_DIM", 1 << 30)
    n = 12
    order = neighbourhood_graph(n, 4, 5).order
    bad = int(order[0] if half == 0 else order[-1])
    x = np.zeros((n, 8), dtype=np.float32)
    x[bad, 3] = 5.0
    with pytest.raises(ValueError, match=f"client {bad}"):
        secure_sum(_Rows(x), value_bound=1.0, threshold=4, neighbours=4, seed=5, workers=2)


@pytest.mark.parametrize("half", [0, 1])
def test_a_protocol_error_in_either_half_of_the_ring_stops_the_round(monkeypatch: pytest.MonkeyPatch, half: int) -> None:
    """A client aborting ShareKeys in the parent's arc or in the forked process's: the same SecAggError, no process left."""
    import multiprocessing

    n = 12
    order = neighbourhood_graph(n, 4, 5).order
    bad = int(order[0] if half == 0 else order[-1])
    honest = SecAggClient.share_keys

    def share_keys(self, adverts, identity_keys):  # type: ignore[no-untyped-def]
        if self.client_id == bad:
            raise SecAggError(f"client {bad} aborts the key sharing")
        return honest(self, adverts, identity_keys)

    monkeypatch.setattr(SecAggClient, "share_keys", share_keys)
    x = np.zeros((n, 8), dtype=np.float32)
    with pytest.raises(SecAggError, match=f"client {bad} aborts"):
        secure_sum(x, value_bound=1.0, threshold=4, neighbours=4, seed=5, workers=2)
    assert not multiprocessing.active_children()


class _Rows:
    """A row source that builds each row on request and counts the requests."""

    def __init__(self, x: np.ndarray) -> None:
        self.shape, self._x, self.asked = x.shape, x, [0] * x.shape[0]

    def row(self, u: int, out: np.ndarray | None = None) -> np.ndarray:
        self.asked[u] += 1
        out = np.empty(self.shape[1], dtype=np.float32) if out is None else out
        out[:] = self._x[u]
        return out


@pytest.mark.parametrize("workers", [1, 3])
def test_a_row_source_gives_the_array_s_round_and_records_every_message(workers: int) -> None:
    """Rows built on request (each once, survivors only) give the same uploads and sum; ``record`` keeps the transcript."""
    x = np.random.default_rng(1).uniform(-2, 2, (14, 33)).astype(np.float32)
    kwargs = dict(value_bound=2.0, threshold=4, neighbours=4, seed=3, dropped=(5,), secrets="reproducible", workers=workers)
    ref = secure_sum(x, **kwargs)  # type: ignore[arg-type]
    rows = _Rows(x)
    got = secure_sum(rows, record=True, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got.fixed_total, ref.fixed_total)
    assert got.upload_digests == ref.upload_digests and ref.recording is None
    assert rows.asked == [0 if u == 5 else 1 for u in range(14)]
    rec, sent = got.recording, got.recording.transcript
    assert len(sent.adverts) == 14 and len(sent.uploads) == 13 and sent.reveals and sent.shares
    server = SecAggServer(rec.config, rec.graph, rec.identity_keys)  # the transcript replays to the same sum
    server.collect_adverts(sent.adverts)
    server.route_shares(sent.shares)
    for upload in sent.uploads:
        server.receive_upload(upload)
    server.unmask_requests()
    np.testing.assert_array_equal(server.finish(sent.reveals), got.fixed_total.astype(np.uint32))


def test_a_bad_row_from_a_row_source_stops_the_round() -> None:
    x = np.zeros((6, 8), dtype=np.float32)
    x[4, 2] = 3.0
    with pytest.raises(ValueError, match="client 4"):
        secure_sum(_Rows(x), value_bound=1.0, threshold=4, neighbours=None, seed=0)


def test_on_upload_sees_every_upload_once_with_threads() -> None:
    x = np.random.default_rng(0).uniform(-1, 1, (12, 40)).astype(np.float32)
    seen: list[int] = []
    secure_sum(x, value_bound=1.0, threshold=4, neighbours=4, seed=0, workers=3, on_upload=lambda u, _: seen.append(u))
    assert sorted(seen) == list(range(12))


@pytest.mark.parametrize("floor", [1, 41])
def test_threads_only_from_the_dimension_floor(monkeypatch: pytest.MonkeyPatch, floor: int) -> None:
    """At D >= PARALLEL_MIN_DIM the clients mask on worker threads; below it all on the caller's."""
    monkeypatch.setattr(driver, "PARALLEL_MIN_DIM", floor)
    x = np.random.default_rng(0).uniform(-1, 1, (12, 40)).astype(np.float32)
    threads: set[int] = set()
    secure_sum(x, value_bound=1.0, threshold=4, neighbours=4, seed=0, workers=3, on_upload=lambda u, _: threads.add(threading.get_ident()))
    if floor > 40:
        assert threads == {threading.get_ident()}
    else:
        assert threads and threading.get_ident() not in threads


def test_check_upload_changes_nothing_and_accept_refuses_a_second_upload() -> None:
    n, dim = 4, 16
    config = SecAggConfig.create(n, dim, threshold=3, value_bound=1.0)
    graph = neighbourhood_graph(n, None, seed=0)
    clients = [SecAggClient(u, config, graph, bytes([u + 1]) * 32) for u in range(n)]
    pki = {u: c.identity_public_key for u, c in enumerate(clients)}
    server = SecAggServer(config, graph, pki, workers=2)
    routed = server.collect_adverts([c.advertise_keys() for c in clients])
    shares = server.route_shares([m for u, c in enumerate(clients) for m in c.share_keys(routed[u], pki)])
    for u, c in enumerate(clients):
        c.receive_shares(shares.get(u, []))
    uploads = [c.masked_upload(np.full(dim, 0.25, dtype=np.float32)) for c in clients]
    checked = server.check_upload(uploads[0])
    assert server.survivors == () and checked.client == 0
    assert server.accept_upload(checked) == 0
    with pytest.raises(SecAggError, match="uploaded twice"):
        server.accept_upload(checked)
    with pytest.raises(SecAggError, match="uploaded twice"):
        server.check_upload(uploads[0])
    forged = bytearray(uploads[1])
    forged[60] ^= 1
    with pytest.raises(SecAggError, match="signature verification"):
        server.check_upload(bytes(forged))
    for upload in uploads[1:]:
        server.receive_upload(upload)
    requests = server.unmask_requests()
    total = server.finish([clients[v].reveal_shares(r) for v, r in requests.items()])
    assert np.all(total.view(np.int32) == round(n * 0.25 * 2**config.frac_bits))


def test_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GFMFR_WORKERS", "3")
    assert simulation_workers() == 3
    monkeypatch.setenv("GFMFR_WORKERS", "0")
    with pytest.raises(ValueError, match="GFMFR_WORKERS must be a whole number >= 1"):
        simulation_workers()
    monkeypatch.delenv("GFMFR_WORKERS")
    assert simulation_workers() >= 1
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        secure_sum(np.zeros((3, 2), dtype=np.float32), value_bound=1.0, threshold=2, neighbours=None, seed=0, workers=0)
