"""A malicious client under masking: its upload is uniform on the ring, so nobody can range-check it.

Before, a value outside [-B, B] wrapped silently (1000 decoded as -24 at n = 8, B = 8). Now the
encoding keeps headroom bits and the server checks the unmasked sum: a round whose sum no n
well-formed uploads can produce is rejected. What remains (and the README says): a client that
knows the encoding can still place each coordinate of the sum anywhere in [-n B, n B].
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from gfmfr_secure.secagg.masking import client as masking
from gfmfr_secure.secagg.fixedpoint import HEADROOM_BITS, centre, decode_sum, sum_bound
from gfmfr_secure.secagg.masking import SecAggClient, SecAggConfig, SecAggError, SecAggServer, neighbourhood_graph

N, DIM, B, MALICIOUS, COORD = 8, 32, 8.0, 1, 3


def _unchecked_encode(x: np.ndarray, *, frac_bits: int, value_bound: float, client: int | None = None) -> np.ndarray:
    """What a malicious client runs instead of the checked encoder: round(x 2^f) mod 2^32."""
    return np.rint(np.ldexp(np.asarray(x, dtype=np.float64), frac_bits)).astype(np.int64).astype(np.uint32)


def _run(value: float, monkeypatch) -> tuple[np.ndarray, np.ndarray, SecAggConfig]:
    """One round in which client MALICIOUS uploads ``value`` at COORD; returns (decoded sum, honest sum)."""
    config = SecAggConfig.create(N, DIM, threshold=N // 2 + 1, value_bound=B)
    graph = neighbourhood_graph(N, None, seed=0)
    clients = [SecAggClient(u, config, graph, secrets.token_bytes(32)) for u in range(N)]
    pki = {u: c.identity_public_key for u, c in enumerate(clients)}
    server = SecAggServer(config, graph, pki)
    routed = server.collect_adverts([c.advertise_keys() for c in clients])
    shares = server.route_shares([m for u, c in enumerate(clients) for m in c.share_keys(routed[u], pki)])
    for u, c in enumerate(clients):
        c.receive_shares(shares.get(u, []))
    x = np.random.default_rng(2).uniform(-0.5, 0.5, size=(N, DIM)).astype(np.float32)
    x[MALICIOUS, COORD] = value
    for u, c in enumerate(clients):
        if u == MALICIOUS:
            with monkeypatch.context() as m:
                m.setattr(masking, "encode", _unchecked_encode)
                server.receive_upload(c.masked_upload(x[u]))
        else:
            server.receive_upload(c.masked_upload(x[u]))
    requests = server.unmask_requests()
    total = server.finish([clients[v].reveal_shares(req) for v, req in requests.items()])
    return decode_sum(total, frac_bits=config.frac_bits), x.astype(np.float64).sum(0), config


def test_the_old_encoding_wrapped_1000_to_minus_24() -> None:
    """The reported finding, reproduced on the old ring layout (no headroom): it is not vacuous."""
    f_old = 24  # largest f with 8 * round(8 * 2^f) <= 2^31 - 1, as chosen before the headroom
    assert N * B * 2**f_old <= 2**31 - 1 < N * B * 2 ** (f_old + 1)
    wrapped = decode_sum(_unchecked_encode(np.array([1000.0]), frac_bits=f_old, value_bound=B), frac_bits=f_old)
    assert wrapped[0] == -24.0


def test_out_of_range_upload_is_rejected_by_the_sum_check(monkeypatch) -> None:
    with pytest.raises(SecAggError, match=r"1 of 32 coordinates outside \[-8 B, 8 B\].*first at index 3.*rejected"):
        _run(1000.0, monkeypatch)


def test_garbage_upload_is_rejected(monkeypatch) -> None:
    """Random ring words (a corrupt or adversarial upload that does not aim) fail the check."""
    config = SecAggConfig.create(N, DIM, threshold=N // 2 + 1, value_bound=B)
    words = np.random.default_rng(0).integers(0, 2**32, size=(1000,), dtype=np.uint32)
    outside = np.abs(centre(words)) > sum_bound(N, config.frac_bits, B)
    assert outside.mean() >= 1 - 2.0 ** -HEADROOM_BITS - 0.03  # each coordinate: caught w.p. >= 15/16
    far = centre(words)[np.abs(centre(words)) > 2 * sum_bound(N, config.frac_bits, B)]
    garbage = float(np.ldexp(float(far[0]), -config.frac_bits))  # one garbage word, as a value
    with pytest.raises(SecAggError, match="rejected"):
        _run(garbage, monkeypatch)


def test_honest_client_refuses_its_own_out_of_range_value(monkeypatch) -> None:
    config = SecAggConfig.create(N, DIM, threshold=N // 2 + 1, value_bound=B)
    graph = neighbourhood_graph(N, None, seed=0)
    client = SecAggClient(0, config, graph, secrets.token_bytes(32))
    client.advertise_keys()
    client._held[0] = (0, 0)  # past the key rounds as far as the input check is concerned
    x = np.zeros(DIM, dtype=np.float32)
    x[COORD] = 1000.0
    with pytest.raises(ValueError, match=r"client 0: 1 of 32 coordinates \(0 NaN/inf, 1 with \|x\| > 8.0"):
        client.masked_upload(x)


def test_limit_a_targeted_value_inside_the_sum_range_passes(monkeypatch) -> None:
    """Without zero-knowledge range proofs a client can move a coordinate of the sum by up to about
    2 n B: the README states this limit; the test pins it so the statement stays true."""
    total, honest, config = _run(40.0, monkeypatch)  # 5 B from one client, yet the sum stays within n B
    assert abs(total[COORD] - honest[COORD]) < N * 2.0**-config.frac_bits
    assert abs(total[COORD]) <= N * B
