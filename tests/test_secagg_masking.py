"""Pairwise-mask secure aggregation: fixed point, Shamir sharing, the protocol and its driver."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from gfmfr_secure.secagg.fixedpoint import (
    HEADROOM_BITS,
    MAX_ABS_SUM,
    centre,
    check_values,
    choose_frac_bits,
    decode_sum,
    encode,
    max_sum_error,
)
from gfmfr_secure.secagg.masking import (
    KeyAdvert,
    MaskedUpload,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    UnmaskRequest,
    client_secret_seed,
    neighbourhood_graph,
    prg_mask,
    secure_sum,
)
from gfmfr_secure.secagg.shamir import (
    PRIME,
    interpolate_at_zero,
    randomness_bytes_needed,
    reconstruct_secret,
    split_secret,
)

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADER = 16 + 32  # upload header + commitment, before the payload


def _inputs(rng: np.random.Generator, n: int, dim: int, bound: float = 1.0) -> np.ndarray:
    return rng.uniform(-bound, bound, size=(n, dim)).astype(np.float32)


def _plain_fixed_sum(
    x: np.ndarray, rows: list[int] | tuple[int, ...], frac_bits: int, bound: float
) -> np.ndarray:
    """int64 [D]: the exact sum of the rows' fixed-point encodings."""
    return centre(encode(x[list(rows)], frac_bits=frac_bits, value_bound=bound)).sum(axis=0)


def _key_rounds(
    n: int, dim: int, *, threshold: int, neighbours: int | None, seed: int, bound: float = 1.0
) -> tuple[list[SecAggClient], SecAggServer, SecAggConfig]:
    """Rounds 0 and 1 run by hand with the same derivations as :func:`secure_sum`."""
    config = SecAggConfig.create(n, dim, threshold=threshold, value_bound=bound)
    graph = neighbourhood_graph(n, neighbours, seed)
    clients = [SecAggClient(u, config, graph, client_secret_seed(seed, u)) for u in range(n)]
    pki = {u: c.identity_public_key for u, c in enumerate(clients)}
    server = SecAggServer(config, graph, pki)
    routed = server.collect_adverts([c.advertise_keys() for c in clients])
    shares = server.route_shares(
        [m for u, c in enumerate(clients) for m in c.share_keys(routed[u], pki)]
    )
    for u, c in enumerate(clients):
        c.receive_shares(shares.get(u, []))
    return clients, server, config


# ---------------------------------------------------------------------------------------------
# Fixed point
# ---------------------------------------------------------------------------------------------


@given(
    bound=st.floats(min_value=1e-6, max_value=1e5, allow_nan=False, allow_infinity=False),
    n=st.integers(min_value=1, max_value=100_000),
)
@settings(max_examples=200, deadline=None)
def test_frac_bits_is_largest_overflow_free(bound: float, n: int) -> None:
    if n * bound >= 2**27:  # the 32-bit ring less the headroom bits
        with pytest.raises(ValueError, match="overflows the 32-bit ring"):
            choose_frac_bits(bound, n)
        return
    f = choose_frac_bits(bound, n)
    assert f >= 0
    assert n * bound * 2.0**f < 2 ** (31 - HEADROOM_BITS)
    # One more bit would overflow (with the documented float32 slack on B).
    assert n * math.floor(bound * (1 + 2**-20) * 2.0 ** (f + 1) + 0.5) > MAX_ABS_SUM


def test_extreme_values_sum_without_wraparound() -> None:
    for bound, n in [(1.0, 943), (0.1, 7), (3.3, 1), (1e-3, 10_000)]:
        f = choose_frac_bits(bound, n)
        top = np.full((n, 3), np.float32(bound))  # float32(B) may exceed B slightly: accepted
        assert (
            centre(encode(top, frac_bits=f, value_bound=bound).sum(axis=0, dtype=np.uint32)).min()
            > 0
        )
        assert (
            centre(encode(-top, frac_bits=f, value_bound=bound).sum(axis=0, dtype=np.uint32)).max()
            < 0
        )


@given(x=hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(-2.0, 2.0, width=32)))
@FAST
def test_encode_decode_roundtrip(x: np.ndarray) -> None:
    f = choose_frac_bits(2.0, 50)
    back = decode_sum(encode(x, frac_bits=f, value_bound=2.0), frac_bits=f)
    assert np.abs(back - x.astype(np.float64)).max() <= 2.0 ** -(f + 1)


def test_check_values_names_clients_and_counts() -> None:
    x = np.zeros((4, 10), dtype=np.float32)
    x[1, 3] = np.nan
    x[1, 5] = np.inf
    x[3, 0] = -1.5
    with pytest.raises(
        ValueError, match=r"2 client\(s\).*client 1: 2 of 10 coordinates \(2 NaN/inf, 0 with"
    ):
        check_values(x, 1.0)
    with pytest.raises(
        ValueError, match=r"client 3: 1 of 10 coordinates \(0 NaN/inf, 1 with \|x\| > 1.0"
    ):
        check_values(x, 1.0)
    with pytest.raises(ValueError, match=r"client 9: 1 of 10"):
        check_values(x[3], 1.0, client=9)
    with pytest.raises(ValueError, match="float32 or float64"):
        check_values(np.zeros((2, 3), dtype=np.int32), 1.0)


# ---------------------------------------------------------------------------------------------
# Shamir
# ---------------------------------------------------------------------------------------------


@given(
    secret=st.integers(0, PRIME - 1),
    t=st.integers(1, 8),
    extra=st.integers(0, 6),
    data=st.data(),
)
@settings(max_examples=100, deadline=None)
def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not(
    secret: int, t: int, extra: int, data: st.DataObject
) -> None:
    holders = t + extra
    xs = data.draw(
        st.lists(st.integers(1, 10_000), min_size=holders, max_size=holders, unique=True)
    )
    randomness = np.random.default_rng(data.draw(st.integers(0, 2**64))).bytes(
        randomness_bytes_needed(t)
    )
    shares = split_secret(secret, t, xs, randomness)
    assert [s.x for s in shares] == xs
    subset = data.draw(st.permutations(shares)).__getitem__(slice(0, t))
    assert reconstruct_secret(subset, t) == secret
    assert interpolate_at_zero(subset) == secret
    if t >= 2:
        # t - 1 points fix a polynomial of degree t - 2 that misses f(0) unless a coefficient
        # vanishes; random 320-bit coefficients make that impossible in practice.
        assert interpolate_at_zero(subset[: t - 1]) != secret
        with pytest.raises(ValueError, match=rf"{t - 1} shares available, {t} required"):
            reconstruct_secret(subset[: t - 1], t)


def test_shamir_rejects_bad_inputs() -> None:
    r = bytes(randomness_bytes_needed(3))
    with pytest.raises(ValueError, match="distinct"):
        split_secret(5, 2, [1, 1, 2], r)
    with pytest.raises(ValueError, match="exceeds the number of holders"):
        split_secret(5, 4, [1, 2, 3], r + bytes(40))
    with pytest.raises(ValueError, match="need 80 bytes"):
        split_secret(5, 3, [1, 2, 3], r[:10])
    with pytest.raises(ValueError, match=r"\[1, p\)"):
        split_secret(5, 2, [0, 2], r)


# ---------------------------------------------------------------------------------------------
# Graph
# ---------------------------------------------------------------------------------------------


def test_harary_graph_is_regular_symmetric_and_seeded() -> None:
    g = neighbourhood_graph(50, 6, seed=3)
    assert g.degree == 6 and g.neighbourhood_size == 7
    assert sorted(g.order) == list(range(50))
    for u, nbrs in enumerate(g.neighbours):
        assert len(nbrs) == 6 and u not in nbrs
        assert all(u in g.neighbours[v] for v in nbrs)
    assert neighbourhood_graph(50, 6, seed=3) == g
    assert neighbourhood_graph(50, 6, seed=4).neighbours != g.neighbours
    complete = neighbourhood_graph(5, 4, seed=0)
    assert complete.degree is None and complete.neighbourhood_size == 5
    with pytest.raises(ValueError, match="even"):
        neighbourhood_graph(50, 5, seed=0)


# ---------------------------------------------------------------------------------------------
# Protocol correctness
# ---------------------------------------------------------------------------------------------


@given(
    n=st.integers(2, 12),
    dim=st.integers(1, 300),
    graph=st.sampled_from([None, 2, 4]),
    bound=st.sampled_from([0.5, 1.0, 8.0]),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
@FAST
def test_masked_sum_equals_plain_fixed_point_sum(
    n: int, dim: int, graph: int | None, bound: float, seed: int, data: st.DataObject
) -> None:
    x = data.draw(hnp.arrays(np.float32, (n, dim), elements=st.floats(-bound, bound, width=32)))
    size = neighbourhood_graph(n, graph, seed).neighbourhood_size
    t = size // 2 + 1
    result = secure_sum(x, value_bound=bound, threshold=t, neighbours=graph, seed=seed)
    assert result.survivors == tuple(range(n)) and result.dropped == ()
    np.testing.assert_array_equal(
        result.fixed_total, _plain_fixed_sum(x, range(n), result.frac_bits, bound)
    )
    err = np.abs(result.total - x.astype(np.float64).sum(axis=0)).max()
    assert err <= n * 2.0**-result.frac_bits / 2


def test_secagg_plus_larger_graph_exact() -> None:
    rng = np.random.default_rng(11)
    x = _inputs(rng, 30, 1000)
    result = secure_sum(x, value_bound=1.0, threshold=4, neighbours=6, seed=5, dropped=(3, 17))
    alive = [u for u in range(30) if u not in (3, 17)]
    np.testing.assert_array_equal(
        result.fixed_total, _plain_fixed_sum(x, alive, result.frac_bits, 1.0)
    )
    assert np.abs(result.total - x[alive].astype(np.float64).sum(axis=0)).max() <= max_sum_error(
        28, result.frac_bits
    )


@given(data=st.data(), seed=st.integers(0, 1000))
@settings(max_examples=12, deadline=None)
def test_up_to_n_minus_t_dropouts_are_recovered_exactly(data: st.DataObject, seed: int) -> None:
    n, t, dim = 8, 5, 64
    x = _inputs(np.random.default_rng(seed), n, dim)
    dropped = data.draw(st.lists(st.integers(0, n - 1), max_size=n - t, unique=True))
    result = secure_sum(
        x, value_bound=1.0, threshold=t, neighbours=None, seed=seed, dropped=dropped
    )
    alive = [u for u in range(n) if u not in dropped]
    assert result.survivors == tuple(alive) and result.dropped == tuple(sorted(dropped))
    np.testing.assert_array_equal(
        result.fixed_total, _plain_fixed_sum(x, alive, result.frac_bits, 1.0)
    )


def test_more_than_n_minus_t_dropouts_fail_clearly() -> None:
    x = _inputs(np.random.default_rng(0), 8, 64)
    with pytest.raises(
        SecAggError, match=r"only 4 of 8 clients uploaded.*fewer than the threshold t=5"
    ):
        secure_sum(x, value_bound=1.0, threshold=5, neighbours=None, seed=0, dropped=[0, 2, 4, 6])


def test_secagg_plus_neighbourhood_losing_too_many_fails_clearly() -> None:
    n, k, t = 20, 4, 3
    graph = neighbourhood_graph(n, k, seed=2)
    u = 0
    dropped = list(graph.neighbours[u][:3])  # N[0] keeps 2 survivors: client 0 and one neighbour
    x = _inputs(np.random.default_rng(1), n, 32)
    with pytest.raises(
        SecAggError, match=rf"self-mask seed of client {u}: 2 shares available, 3 required"
    ):
        secure_sum(x, value_bound=1.0, threshold=t, neighbours=k, seed=2, dropped=dropped)
    # Dropping a single neighbour is fine.
    r = secure_sum(x, value_bound=1.0, threshold=t, neighbours=k, seed=2, dropped=dropped[:1])
    alive = [v for v in range(n) if v != dropped[0]]
    np.testing.assert_array_equal(r.fixed_total, _plain_fixed_sum(x, alive, r.frac_bits, 1.0))


def test_client_side_masking_matches_the_driver_bit_for_bit() -> None:
    n, dim, seed = 6, 200, 9
    x = _inputs(np.random.default_rng(2), n, dim)
    captured: dict[int, bytes] = {}
    secure_sum(
        x,
        value_bound=1.0,
        threshold=4,
        neighbours=None,
        seed=seed,
        on_upload=captured.__setitem__,
        secrets="reproducible",  # the same client seeds as _key_rounds
    )
    clients, server, config = _key_rounds(n, dim, threshold=4, neighbours=None, seed=seed)
    for u, client in enumerate(clients):
        assert (
            client.masked_upload(x[u]) == captured[u]
        )  # every pair mask expanded by the client itself
        server.receive_upload(captured[u])
    requests = server.unmask_requests()
    total = server.finish([clients[v].reveal_shares(req) for v, req in requests.items()])
    np.testing.assert_array_equal(
        centre(total), _plain_fixed_sum(x, range(n), config.frac_bits, 1.0)
    )


def test_pair_seeds_are_symmetric() -> None:
    clients, _, _ = _key_rounds(5, 8, threshold=3, neighbours=None, seed=1)
    assert clients[1].pair_seed(3) == clients[3].pair_seed(1)
    assert clients[1].pair_seed(3) != clients[1].pair_seed(4)


# ---------------------------------------------------------------------------------------------
# Privacy of a single upload
# ---------------------------------------------------------------------------------------------


def _payload_words(upload: bytes, dim: int) -> np.ndarray:
    return np.frombuffer(upload, dtype="<u4", count=dim, offset=HEADER)


def test_single_upload_looks_uniform() -> None:
    n, dim = 3, 4096
    x = np.full((n, dim), 0.5, dtype=np.float32)  # a maximally non-uniform plaintext
    uploads: dict[int, bytes] = {}
    result = secure_sum(
        x, value_bound=1.0, threshold=2, neighbours=None, seed=21, on_upload=uploads.__setitem__
    )
    words = _payload_words(uploads[1], dim)

    def chi2_pvalue(values: np.ndarray) -> float:
        return float(stats.chisquare(np.bincount(values, minlength=256)).pvalue)

    plain = encode(x[1], frac_bits=result.frac_bits, value_bound=1.0)
    reference = np.random.default_rng(123).integers(0, 2**32, size=dim, dtype=np.uint32)
    assert chi2_pvalue(plain >> 24) < 1e-12  # the encoding alone is far from uniform
    for sample in (words, reference):
        assert chi2_pvalue(sample >> 24) > 1e-3  # top byte of each word
        assert chi2_pvalue(sample.view(np.uint8)) > 1e-3  # every byte
    # Same inputs, different seed: unrelated-looking uploads, same sum.
    other: dict[int, bytes] = {}
    result2 = secure_sum(
        x, value_bound=1.0, threshold=2, neighbours=None, seed=22, on_upload=other.__setitem__
    )
    words2 = _payload_words(other[1], dim)
    assert np.mean(words == words2) < 0.01
    assert chi2_pvalue((words - words2).view(np.uint8)) > 1e-3
    np.testing.assert_array_equal(result.fixed_total, result2.fixed_total)


def test_prg_is_deterministic_and_key_dependent() -> None:
    a = prg_mask(bytes(32), 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    np.testing.assert_array_equal(a, prg_mask(bytes(32), 1000))
    assert np.mean(a == prg_mask(bytes(31) + b"\x01", 1000)) < 0.01


# ---------------------------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def one_upload() -> tuple[SecAggServer, bytes, np.ndarray, list[SecAggClient]]:
    clients, server, config = _key_rounds(4, 100, threshold=3, neighbours=None, seed=4)
    x = _inputs(np.random.default_rng(3), 4, config.dim)
    return server, clients[0].masked_upload(x[0]), x, clients


def test_tampered_upload_is_rejected(one_upload) -> None:
    server, upload, _, _ = one_upload
    for position in (HEADER + 17, 20, len(upload) - 1):  # payload, commitment, signature
        tampered = bytearray(upload)
        tampered[position] ^= 0x01
        with pytest.raises(SecAggError, match="failed signature verification: tampered"):
            server.receive_upload(bytes(tampered))
    assert server.receive_upload(upload) == 0  # the genuine upload still goes through
    with pytest.raises(SecAggError, match="uploaded twice"):
        server.receive_upload(upload)


def test_truncated_or_wrong_format_upload_is_rejected(one_upload) -> None:
    server, upload, x, _ = one_upload
    with pytest.raises(SecAggError, match=r"has 411 bytes, expected 512 .*truncated"):
        server.receive_upload(upload[:-101])
    float64_payload = upload[:HEADER] + x[0].astype(np.float64).tobytes() + upload[-64:]
    with pytest.raises(SecAggError, match="expected 512"):
        server.receive_upload(float64_payload)
    with pytest.raises(SecAggError, match="must be bytes, got ndarray"):
        server.receive_upload(np.frombuffer(upload, dtype=np.uint8))
    wrong_dim = bytearray(upload)
    wrong_dim[12] ^= 0x01
    with pytest.raises(SecAggError, match="declares dim=101, expected 100"):
        server.receive_upload(bytes(wrong_dim))
    with pytest.raises(SecAggError, match="bad magic"):
        server.receive_upload(b"XXXX" + upload[4:])
    assert MaskedUpload.from_bytes(upload, 100).client == 0


def test_bad_inputs_are_rejected_with_client_named() -> None:
    x = _inputs(np.random.default_rng(0), 5, 20)
    x[2, 7] = np.nan
    with pytest.raises(ValueError, match=r"client 2: 1 of 20 coordinates \(1 NaN/inf"):
        secure_sum(x, value_bound=1.0, threshold=3, neighbours=None, seed=0)
    x[2, 7] = 1.25
    with pytest.raises(
        ValueError, match=r"client 2: 1 of 20 coordinates \(0 NaN/inf, 1 with \|x\| > 1.0"
    ):
        secure_sum(x, value_bound=1.0, threshold=3, neighbours=None, seed=0)
    with pytest.raises(ValueError, match="float32 array of shape"):
        secure_sum(x.astype(np.float64), value_bound=1.0, threshold=3, neighbours=None, seed=0)
    with pytest.raises(ValueError, match="threshold 6 exceeds the closed neighbourhood size 5"):
        secure_sum(
            np.zeros((5, 4), np.float32), value_bound=1.0, threshold=6, neighbours=None, seed=0
        )


def test_client_rejects_its_own_bad_input(one_upload) -> None:
    _, _, x, clients = one_upload
    bad = x[1].copy()
    bad[4] = np.inf
    with pytest.raises(ValueError, match=r"client 1: 1 of 100 coordinates \(1 NaN/inf"):
        clients[1].masked_upload(bad)
    with pytest.raises(ValueError, match=r"float32 array of shape \(100,\)"):
        clients[1].masked_upload(x[1].astype(np.float64))


def test_clients_never_reveal_both_kinds_of_share() -> None:
    n, dim = 5, 16
    clients, server, config = _key_rounds(n, dim, threshold=3, neighbours=None, seed=6)
    x = _inputs(np.random.default_rng(0), n, dim)
    for u in range(4):  # client 4 drops
        server.receive_upload(clients[u].masked_upload(x[u]))
    requests = server.unmask_requests()
    assert UnmaskRequest.from_bytes(requests[0]).dropped == (4,)
    clients[0].reveal_shares(requests[0])
    # A lying server now claims client 2 dropped: client 0 already revealed 2's self-mask share.
    lie = UnmaskRequest(config.round_id, 0, (0, 1, 3), (2,)).to_bytes()
    with pytest.raises(SecAggError, match="refuses to reveal the mask-key share of client 2"):
        clients[0].reveal_shares(lie)
    both = UnmaskRequest(config.round_id, 1, (0, 1, 2, 3), (2, 4)).to_bytes()
    with pytest.raises(SecAggError, match=r"listed both as survivors and as dropped"):
        clients[1].reveal_shares(both)
    with pytest.raises(SecAggError, match="did not upload"):
        clients[4].reveal_shares(UnmaskRequest(config.round_id, 4, (0, 1, 2), ()).to_bytes())


def test_tampered_reveal_and_missing_shares_are_rejected() -> None:
    n, dim = 5, 16
    clients, server, _ = _key_rounds(n, dim, threshold=4, neighbours=None, seed=8)
    x = _inputs(np.random.default_rng(0), n, dim)
    for u in range(n - 1):
        server.receive_upload(clients[u].masked_upload(x[u]))
    requests = server.unmask_requests()
    reveals = [clients[v].reveal_shares(req) for v, req in requests.items()]
    tampered = bytearray(reveals[0])
    tampered[30] ^= 0x01
    with pytest.raises(SecAggError, match="share reveal of client 0 failed signature verification"):
        server.finish([bytes(tampered), *reveals[1:]])
    # One survivor goes silent during unmasking: 3 shares left, 4 needed.
    with pytest.raises(SecAggError, match=r"mask key of client 4: 3 shares available, 4 required"):
        server.finish(reveals[1:])


def test_forged_key_advert_is_rejected() -> None:
    config = SecAggConfig.create(3, 8, threshold=2, value_bound=1.0)
    graph = neighbourhood_graph(3, None, 0)
    clients = [SecAggClient(u, config, graph, client_secret_seed(0, u)) for u in range(3)]
    pki = {u: c.identity_public_key for u, c in enumerate(clients)}
    server = SecAggServer(config, graph, pki)
    adverts = [c.advertise_keys() for c in clients]
    genuine = KeyAdvert.from_bytes(adverts[1])
    swapped = KeyAdvert(
        genuine.round_id,
        1,
        genuine.enc_public,
        KeyAdvert.from_bytes(adverts[2]).mask_public,
        genuine.signature,
    )
    with pytest.raises(
        SecAggError, match="key advertisement of client 1 failed signature verification"
    ):
        server.collect_adverts([adverts[0], swapped.to_bytes(), adverts[2]])


# ---------------------------------------------------------------------------------------------
# Determinism and costs
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_uploads_and_result() -> None:
    """In the reproducible simulation mode equal seeds give equal uploads (see tests/security for ``os``)."""
    x = _inputs(np.random.default_rng(4), 7, 300)
    runs = []
    for seed in (17, 17, 18):
        uploads: dict[int, bytes] = {}
        r = secure_sum(
            x,
            value_bound=1.0,
            threshold=3,
            neighbours=4,
            seed=seed,
            dropped=(5,),
            on_upload=uploads.__setitem__,
            secrets="reproducible",
        )
        runs.append((r, uploads))
    (a, ua), (b, ub), (c, uc) = runs
    assert ua == ub and a.upload_digests == b.upload_digests
    np.testing.assert_array_equal(a.total, b.total)
    assert ua.keys() == uc.keys() and all(ua[u] != uc[u] for u in ua)
    np.testing.assert_array_equal(a.fixed_total, c.fixed_total)


def test_costs_match_the_documented_message_sizes() -> None:
    n, dim = 6, 250
    r = secure_sum(
        _inputs(np.random.default_rng(0), n, dim),
        value_bound=1.0,
        threshold=4,
        neighbours=None,
        seed=0,
    )
    c = r.costs
    expected_up = (4 * dim + 112) + 140 + 96 * (n - 1) + 84 + 36 * n
    expected_down = 236 * (n - 1) + 20 + 4 * n
    assert (c.bytes_up == expected_up).all() and (c.bytes_down == expected_down).all()
    assert c.plain_bytes == 4 * dim
    assert (c.client_mask_s > 0).all() and (c.client_share_s > 0).all() and c.mean_client_s > 0
    assert c.server_aggregate_s > 0 and c.server_unmask_s > 0 and c.wall_s >= c.server_unmask_s
    assert math.isfinite(float(r.total.sum()))


def test_remembered_verifications_still_refuse_forgeries_and_charge_their_time() -> None:
    """The verification memo answers only for the exact bytes it checked; its time is charged to the skipping thread."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gfmfr_secure.secagg.masking.primitives import skipped_verify_seconds, verify_signature

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    message = b"advert of client 7, round 3"
    signature = key.sign(message)
    verify_signature(key.public_key(), signature, message, "advert")  # verified, remembered
    before = skipped_verify_seconds()
    verify_signature(key.public_key(), signature, message, "advert")  # remembered: charged, not rerun
    assert skipped_verify_seconds() > before
    forged = bytearray(signature)
    forged[5] ^= 1
    for k, sig, msg in [
        (key.public_key(), bytes(forged), message),  # tampered signature
        (key.public_key(), signature, message + b"!"),  # substituted message under a valid signature
        (other.public_key(), signature, message),  # another party's key
    ]:
        for _ in range(2):  # the refusal is remembered as a refusal
            with pytest.raises(SecAggError, match="failed signature verification"):
                verify_signature(k, sig, msg, "advert")


def test_payload_digest_is_blake3_and_binds_every_byte() -> None:
    import blake3

    from gfmfr_secure.secagg.masking.primitives import payload_digest

    payload = np.random.default_rng(0).integers(0, 2**32, 1000, dtype=np.uint32).tobytes()
    assert payload_digest(payload) == blake3.blake3(payload).digest() and len(payload_digest(payload)) == 32
    assert payload_digest(memoryview(payload)) == payload_digest(payload)
    changed = bytearray(payload)
    changed[-1] ^= 0x80
    assert payload_digest(bytes(changed)) != payload_digest(payload)
