"""CKKS with one value per coefficient (the ``packed`` wire format the ``ckks`` backend uses).

Released sums are compared with the numpy float64 sum within
``params.release_tolerance(n, D, packing="coefficients")``: 7 standard deviations of the
decryption error (at most ``(1 + N) / 12`` per public-key ciphertext and coefficient, for
any ternary key) plus 7 flooding stds.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.aggregation.ckks import ckks_params_for
from gfmfr_secure.secagg.ckks import driver as ckks_driver
from gfmfr_secure.secagg.ckks import (
    HE_STANDARD_MAX_LOG_Q,
    CKKSError,
    CKKSParams,
    KeyHolder,
    coefficients_to_slots,
    encrypted_sum,
    slots_to_coefficients,
)
from gfmfr_secure.secagg.ckks.messages import Scratch
from gfmfr_secure.secagg.ckks.words import as_seal, word_layout

ts = pytest.importorskip("tenseal")
from tenseal import sealapi  # noqa: E402  (after the skip)

P = CKKSParams(4096, (60, 49), 46, max_abs_value=8.0, max_summands=16)
N = P.poly_modulus_degree


def exact_packed_decryption(holder: KeyHolder, enc_sum: list[bytes]) -> np.ndarray:
    """The unflooded decryption of a ``packed`` sum: what must never be released. float64 [C * N]."""
    seal_context = holder._context.seal_context().data
    decryptor = sealapi.Decryptor(seal_context, holder._context.secret_key().data)
    encoder = sealapi.CKKSEncoder(seal_context)
    scratch = Scratch()
    slots = []
    for blob in enc_sum:
        plain = sealapi.Plaintext()
        decryptor.decrypt(scratch.load_ciphertext(sealapi, seal_context, as_seal(blob, word_layout(seal_context), holder.params.scale)), plain)
        slots.append(encoder.decode_complex(plain))
    scratch.close()
    return slots_to_coefficients(np.array(slots)).reshape(-1)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([8, 1024, 4096]))
def test_coefficient_and_slot_maps_are_inverse(seed: int, degree: int) -> None:
    x = np.random.default_rng(seed).uniform(-8, 8, (3, degree))
    np.testing.assert_allclose(slots_to_coefficients(coefficients_to_slots(x)), x, rtol=0, atol=1e-11)


@pytest.mark.parametrize("custody", ["authority", "shared-clients"])
@pytest.mark.parametrize("workers", [1, 2])
def test_packed_sum_equals_numpy_sum(custody: str, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckks_driver, "_PARALLEL_MIN_VALUES", 1)  # fork even for a small test
    x = np.random.default_rng(0).uniform(-8, 8, (5, N + 700)).astype(np.float32)
    total, cost = encrypted_sum(x, params=P, custody=custody, wire="packed", workers=workers)  # type: ignore[arg-type]
    symmetric = custody == "shared-clients"
    tol = P.release_tolerance(5, N + 700, symmetric=symmetric, packing="coefficients")
    np.testing.assert_allclose(total, x.astype(np.float64).sum(0), rtol=0, atol=tol)
    assert cost.workers == workers and cost.n_ciphertexts == 2 and cost.wire == "packed"
    assert cost.flooding_std == P.flooding_std(N + 700, symmetric=symmetric, packing="coefficients")


def test_every_coefficient_carries_a_value_and_bytes_per_value() -> None:
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3 * N))
    _, public_key = encrypted_sum(x, params=P, custody="authority", wire="packed")
    _, seeded = encrypted_sum(x, params=P, custody="shared-clients", wire="packed")
    for cost in (public_key, seeded):
        assert cost.n_ciphertexts == 3  # N values per ciphertext, against N / 2 slots
    # two polynomials of N 64-bit words per N values; the seeded form sends one
    assert 16.0 <= public_key.bytes_per_value <= 16.1 and public_key.ratio_to_float32 <= 4.03
    assert 8.0 <= seeded.bytes_per_value <= 8.1


@pytest.mark.parametrize("custody", ["authority", "shared-clients"])
def test_coefficient_error_model_matches_measured_error(custody: str) -> None:
    symmetric = custody == "shared-clients"
    holder = KeyHolder(P, custody=custody)  # type: ignore[arg-type]
    dim = 4 * N
    x = np.random.default_rng(2).uniform(-8, 8, (6, dim))
    encryptor, aggregator = holder.encryptor(dim, wire="packed"), holder.aggregator(dim, wire="packed")
    enc_sum = aggregator.aggregate(encryptor.encrypt(row) for row in x)
    err = exact_packed_decryption(holder, enc_sum)[:dim] - x.sum(0)
    assert np.std(err) == pytest.approx(P.error_std(6, symmetric=symmetric, packing="coefficients"), rel=0.1)
    assert np.abs(err).max() < P.sum_tolerance(6, symmetric=symmetric, packing="coefficients")
    # one value per coefficient is about sqrt(N / 2) times more precise than one per slot
    assert P.error_std(6, symmetric=symmetric, packing="slots") > 20 * P.error_std(6, symmetric=symmetric, packing="coefficients")
    # the release is flooded before decryption: its deviation is the flooding noise
    released = holder.decryptor(dim, wire="packed").decrypt(enc_sum) - x.sum(0)
    assert np.std(released) == pytest.approx(P.flooding_std(dim, symmetric=symmetric, packing="coefficients"), rel=0.05)


def test_flooding_key_makes_the_release_reproducible() -> None:
    holder = KeyHolder(P)
    dim = N
    x = np.random.default_rng(3).uniform(-1, 1, (2, dim))
    encryptor, aggregator = holder.encryptor(dim, wire="packed"), holder.aggregator(dim, wire="packed")
    enc_sum = aggregator.aggregate(encryptor.encrypt(row) for row in x)
    decryptor = holder.decryptor(dim, wire="packed")
    a, b = decryptor.decrypt(enc_sum, flood_key=bytes(32)), decryptor.decrypt(enc_sum, flood_key=bytes(32))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, decryptor.decrypt(enc_sum, flood_key=bytes(31) + b"\x01"))


def test_merged_partial_sums_count_towards_max_summands() -> None:
    holder = KeyHolder(CKKSParams(4096, (60, 49), 46, max_abs_value=8.0, max_summands=3))
    encryptor = holder.encryptor(10, wire="packed")
    shard = holder.aggregator(10, wire="packed")
    shard.aggregate(encryptor.encrypt(np.ones(10)) for _ in range(2))
    server = holder.aggregator(10, wire="packed")
    server.merge(shard.result(), 2)
    assert server.n_added == 2
    with pytest.raises(CKKSError, match="exceeds max_summands = 3"):
        server.merge(shard.result(), 2)
    with pytest.raises(CKKSError, match="n_summands must be an int >= 1"):
        server.merge(shard.result(), 0)
    with pytest.raises(CKKSError, match="wrong count of ciphertexts"):
        server.merge([], 1)


def test_backend_parameters_are_192_bit_secure_small_and_nearly_exact() -> None:
    """943 clients, |x| <= 8, the default ML-100K layout of D = 579,850 values."""
    params = ckks_params_for(8.0, 943, packing="coefficients")
    degree = params.poly_modulus_degree
    assert sum(params.coeff_mod_bit_sizes) <= HE_STANDARD_MAX_LOG_Q[degree]
    assert sum(params.coeff_mod_bit_sizes) <= 152  # the standard's 192-bit bound at N = 8192
    assert params.max_summands * params.max_abs_value <= params.capacity
    n, d = params.max_summands, 579_850
    sigma = params.flooding_std(d, packing="coefficients")
    assert sigma < 1e-7  # on a sum of 943 uploads: far below what moves a ranking
    assert params.n_ciphertexts(d, "coefficients") == 71
    # the flooding bound: KL(real || ideal) = ||delta||^2 / (2 sigma^2) <= 2^-40 at
    # ||delta|| <= 2 sqrt(D n v) / Delta, v = (1 + N) / 12 for any ternary key
    bound = 2.0 * np.sqrt(d * n * (1 + degree) / 12.0) / params.scale
    assert bound**2 / (2 * sigma**2) == pytest.approx(2.0**-40, rel=1e-6)
    # the smaller ring holds a 2**46 scale only: a million times more flooding noise
    small = ckks_params_for(8.0, 943, packing="coefficients").__class__(4096, (60, 49), 46, max_abs_value=8.0, max_summands=943)
    assert small.flooding_std(d, packing="coefficients") > 1e5 * sigma


def test_backend_parameters_round_trip() -> None:
    params = ckks_params_for(8.0, 4, packing="coefficients")
    x = np.random.default_rng(4).uniform(-8, 8, (4, 4 * params.poly_modulus_degree))
    total, cost = encrypted_sum(x, params=params, wire="packed")
    np.testing.assert_allclose(total, x.sum(0), rtol=0, atol=params.release_tolerance(4, x.shape[1], packing="coefficients") + 1e-9)
    assert cost.n_ciphertexts == 4 and cost.ratio_to_float32 < 6.5
