"""CKKS aggregation: sums, packing, key custody, upload validation, parameters, release noise.

Tolerance: a decrypted sum of n fresh ciphertexts is compared with the numpy
float64 sum within ``params.sum_tolerance(n, symmetric=...)``, i.e. 7 standard
deviations of the error of the noisiest slot, ``7 * sqrt(n * v) / 2**global_scale_bits``
with ``v`` the per-ciphertext error variance in units of the scale (encoding and
mod-switch rounding for public-key encryption, the fresh error for symmetric
encryption; see :meth:`CKKSParams.sum_tolerance`). Encryption randomness cannot
be seeded, so ciphertexts change from run to run; the tolerance is what makes
the comparisons deterministic in practice (failure probability < 1e-6). Every
release is also flooded (:meth:`CKKSParams.flooding_std`), so released sums are
compared within ``params.release_tolerance(n, D)``: the same plus 7 flooding stds.

The tests use the ``default`` preset (N = 4096, 2048 slots).
"""

from __future__ import annotations

import subprocess
import sys
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.secagg.ckks import (
    HE_STANDARD_MAX_LOG_Q,
    PRESETS,
    CKKSAggregator,
    CKKSError,
    CKKSParams,
    Decryptor,
    Encryptor,
    KeyHolder,
    encrypted_sum,
    gaussian_noise,
)

ts = pytest.importorskip("tenseal")

P = PRESETS["default"]
D = 4500  # three ciphertexts of 2048 slots, the last one holding 404 values


@cache
def holder(custody: str) -> KeyHolder:
    return KeyHolder(P, custody=custody)  # type: ignore[arg-type]


def vectors(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n, dim))


def roundtrip(custody: str, wire: str, x: np.ndarray) -> np.ndarray:
    """Encrypt every row, sum at the aggregator, decrypt: float64 [D]."""
    h = holder(custody)
    dim = x.shape[1]
    enc = Encryptor(h.client_context_bytes(), P, dim, wire=wire)  # type: ignore[arg-type]
    agg = CKKSAggregator(h.public_context_bytes(), P, dim, wire=wire)  # type: ignore[arg-type]
    enc_sum = agg.aggregate(enc.encrypt(row) for row in x)
    return h.decryptor(dim, wire=wire).decrypt(enc_sum)  # type: ignore[arg-type]


def raw_decrypt(custody: str, enc_sum: list[bytes]) -> np.ndarray:
    """The exact (unflooded) decryption, straight from TenSEAL: what must never be released."""
    secret = ts.context_from(holder(custody).client_context_bytes() if custody == "shared-clients" else holder(custody)._context.serialize(save_secret_key=True))
    return np.concatenate([np.asarray(ts.ckks_vector_from(secret, b).decrypt()) for b in enc_sum])


# --------------------------------------------------------------------------- parameters


def test_default_parameters_are_128_bit_secure_and_fit_1000_summands() -> None:
    p = CKKSParams()
    assert sum(p.coeff_mod_bit_sizes) <= HE_STANDARD_MAX_LOG_Q[p.poly_modulus_degree]
    assert p.max_summands * p.max_abs_value <= p.capacity
    for preset in PRESETS.values():
        assert sum(preset.coeff_mod_bit_sizes) <= HE_STANDARD_MAX_LOG_Q[preset.poly_modulus_degree]
    # Error model at the realistic scale: ~1e-5 per value at n = 943 (public key).
    assert p.error_std(943) < 2e-5


@pytest.mark.parametrize(
    ("degree", "bits"),
    [(2048, (40, 20)), (4096, (60, 50)), (1024, (20, 8)), (8192, (60, 60, 60, 40))],
)
def test_insecure_ring_degree_and_modulus_pair_is_rejected(degree: int, bits: tuple[int, ...]) -> None:
    with pytest.raises(CKKSError, match=r"insecure CKKS parameters: total log2\(q\) = \d+ bits exceeds"):
        CKKSParams(degree, bits, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"poly_modulus_degree": 3000}, "poly_modulus_degree must be one of"),
        ({"coeff_mod_bit_sizes": (40,)}, "at least two primes"),
        ({"coeff_mod_bit_sizes": (61, 40)}, "each prime must have"),
        ({"global_scale_bits": 68}, "global_scale_bits must be"),
        ({"max_summands": 4000}, "can overflow"),
        ({"max_abs_value": 0.0}, "max_abs_value must be"),
        ({"poly_modulus_degree": 2048, "coeff_mod_bit_sizes": (41, 13), "global_scale_bits": 20}, "qualifying primes"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(CKKSError, match=match):
        CKKSParams(**kwargs)


@pytest.mark.parametrize(
    ("degree", "bits"), [(2048, (40, 14)), (4096, (42, 42)), (4096, (30, 48, 30)), (8192, (60, 40, 40, 60))]
)
def test_primes_match_seal(degree: int, bits: tuple[int, ...]) -> None:
    from tenseal import sealapi  # type: ignore[import-untyped]

    seal = tuple(int(m.value()) for m in sealapi.CoeffModulus.Create(degree, list(bits)))
    assert CKKSParams(degree, bits, 20, max_summands=1).primes == seal


def test_error_model_matches_measured_error() -> None:
    x = vectors(4, 8192, 11)
    h = holder("authority")
    agg = h.aggregator(8192)
    enc_sum = agg.aggregate(h.encryptor(8192).encrypt(row) for row in x)
    err = raw_decrypt("authority", enc_sum) - x.sum(0)
    assert np.std(err) == pytest.approx(P.error_std(4), rel=0.15)
    # the release is flooded: its deviation is the flooding noise, far above the decryption error
    released = h.decryptor(8192).decrypt(enc_sum) - x.sum(0)
    assert np.std(released) == pytest.approx(P.flooding_std(8192), rel=0.05)
    assert P.flooding_std(8192) > 1e6 * P.error_std(4)


# --------------------------------------------------------------------------- sums


@pytest.mark.parametrize(
    ("custody", "wire"), [("authority", "tenseal"), ("shared-clients", "tenseal"), ("shared-clients", "seeded")]
)
def test_sum_equals_numpy_sum_across_several_ciphertexts(custody: str, wire: str) -> None:
    x = vectors(6, D, 1)
    assert D % P.slots != 0 and P.n_ciphertexts(D) == 3
    total = roundtrip(custody, wire, x)
    assert total.dtype == np.float64 and total.shape == (D,)
    tol = P.release_tolerance(6, D, symmetric=custody == "shared-clients")
    np.testing.assert_allclose(total, x.sum(0), rtol=0, atol=tol)


def test_upload_has_one_ciphertext_per_slot_block() -> None:
    h = holder("authority")
    for dim, count in [(1, 1), (P.slots, 1), (P.slots + 1, 2), (D, 3)]:
        upload = h.encryptor(dim).encrypt(np.zeros(dim))
        assert len(upload) == count and all(isinstance(b, bytes) for b in upload)


@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(1, 4),
    dim=st.integers(1, 2 * P.slots + 50),
    kind=st.sampled_from(["uniform", "ones", "minus-ones", "tiny"]),
    seed=st.integers(0, 2**16),
)
def test_sum_property(n: int, dim: int, kind: str, seed: int) -> None:
    if kind == "uniform":
        x = vectors(n, dim, seed)
    elif kind == "tiny":
        x = vectors(n, dim, seed) * 1e-6
    else:
        x = np.full((n, dim), 1.0 if kind == "ones" else -1.0)
    total = roundtrip("authority", "tenseal", x)
    np.testing.assert_allclose(total, x.sum(0), rtol=0, atol=P.release_tolerance(n, dim))


def test_sum_at_capacity_does_not_wrap() -> None:
    """max_summands vectors of +max_abs_value (the worst case) still decode (few values, fast)."""
    params = P
    h = KeyHolder(params)
    upload = h.encryptor(3).encrypt(np.ones(3))
    agg = h.aggregator(3)
    for _ in range(params.max_summands):
        agg.add(upload)  # the same ciphertext each time: only the magnitude matters here
    total = h.decryptor(3).decrypt(agg.result())
    # The same ciphertext added n times has its error multiplied by n, not sqrt(n).
    np.testing.assert_allclose(total, 1000.0, rtol=0, atol=1000 * params.sum_tolerance(1) + 7 * params.flooding_std(3))
    with pytest.raises(CKKSError, match="max_summands = 1000"):
        agg.add(upload)


def test_ciphertexts_differ_between_runs_but_sums_agree() -> None:
    x = vectors(3, 700, 5)
    a, _ = encrypted_sum(x, params=P, seed=1)
    b, _ = encrypted_sum(x, params=P, seed=1)
    h = holder("authority")
    assert h.encryptor(700).encrypt(x[0]) != h.encryptor(700).encrypt(x[0])
    np.testing.assert_allclose(a, b, rtol=0, atol=2 * P.release_tolerance(3, 700))
    np.testing.assert_allclose(a, x.sum(0), rtol=0, atol=P.release_tolerance(3, 700))


def test_cost_record_and_bytes_per_value() -> None:
    x = vectors(2, 3 * P.slots, 2)
    _, tenseal_cost = encrypted_sum(x, params=P, custody="authority")
    _, seeded_cost = encrypted_sum(x, params=P, custody="shared-clients")
    assert seeded_cost.wire == "seeded" and tenseal_cost.wire == "tenseal"
    for cost in (tenseal_cost, seeded_cost):
        assert cost.n_clients == 2 and cost.dim == 3 * P.slots and cost.n_ciphertexts == 3
        assert cost.bytes_per_value <= 45.0 and cost.ratio_to_float32 == pytest.approx(cost.bytes_per_value / 4)
        assert cost.bytes_down_per_client > 0 and cost.bytes_encrypted_sum > 0
        assert min(cost.encrypt_s_mean, cost.aggregate_s, cost.decrypt_s) > 0
        assert set(cost.to_dict()) >= {"bytes_up_per_client", "aggregate_s_per_client", "ratio_to_float32"}
    # Seeded symmetric ciphertexts carry a PRNG seed instead of their second polynomial.
    assert seeded_cost.bytes_up_per_client < 0.55 * tenseal_cost.bytes_up_per_client


# --------------------------------------------------------------------------- key custody


@pytest.mark.parametrize("custody", ["authority", "shared-clients"])
def test_aggregator_context_has_no_secret_key_and_cannot_decrypt(custody: str) -> None:
    h = holder(custody)
    public = ts.context_from(h.public_context_bytes())
    assert public.is_private() is False
    agg = CKKSAggregator(h.public_context_bytes(), P, D, wire="tenseal")
    assert agg.context.is_private() is False
    enc = h.encryptor(D, wire="tenseal")
    enc_sum = agg.aggregate([enc.encrypt(x) for x in vectors(2, D, 3)])
    vec = ts.ckks_vector_from(agg.context, enc_sum[0])
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        vec.decrypt()
    with pytest.raises(ValueError, match="it doesn't hold a Secret key"):
        agg.context.secret_key()


def test_aggregator_refuses_a_context_with_the_secret_key() -> None:
    secret = holder("shared-clients").client_context_bytes()
    assert ts.context_from(secret).is_private()
    with pytest.raises(CKKSError, match="public context bytes only"):
        CKKSAggregator(secret, P, D)


def test_client_context_is_public_under_authority_and_secret_under_shared_clients() -> None:
    assert not ts.context_from(holder("authority").client_context_bytes()).is_private()
    assert ts.context_from(holder("shared-clients").client_context_bytes()).is_private()


def test_decryptor_needs_the_secret_key() -> None:
    with pytest.raises(CKKSError, match="needs the context with the secret key"):
        Decryptor(holder("authority").public_context_bytes(), P, D)


def test_seeded_wire_needs_the_shared_secret_key() -> None:
    with pytest.raises(CKKSError, match="'seeded' wire format uses secret-key encryption"):
        Encryptor(holder("authority").client_context_bytes(), P, D, wire="seeded")
    with pytest.raises(CKKSError, match="neither a public key nor a secret key"):
        Encryptor(holder("shared-clients").public_context_bytes(), P, D)


def test_context_and_params_must_agree() -> None:
    with pytest.raises(CKKSError, match="the parameters say"):
        CKKSAggregator(holder("authority").public_context_bytes(), PRESETS["large-cohort"], D)


# --------------------------------------------------------------------------- upload validation


@pytest.fixture(scope="module")
def setup() -> tuple[KeyHolder, Encryptor, list[bytes]]:
    h = holder("authority")
    enc = h.encryptor(D)
    return h, enc, enc.encrypt(vectors(1, D, 4)[0])


@pytest.mark.parametrize("count", [0, 2, 4])
def test_wrong_count_of_ciphertexts_is_rejected(setup: tuple, count: int) -> None:
    h, _, upload = setup
    agg = h.aggregator(D)
    with pytest.raises(CKKSError, match=f"wrong count of ciphertexts: expected 3 .* got {count}"):
        agg.add((upload * 2)[:count])
    assert agg.n_added == 0


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[: len(b) // 2], "ciphertext 1: malformed or truncated ciphertext"),
        (lambda b: b[:-7], "ciphertext 1: malformed or truncated ciphertext"),
        (lambda b: b"\x0a" + b"\xff" * 40, "ciphertext 1: malformed or truncated ciphertext"),
        (lambda b: b"not a ciphertext", "ciphertext 1: malformed ciphertext, not a serialised TenSEAL CKKSVector"),
        (lambda b: b"", "ciphertext 1: empty ciphertext"),
        (lambda b: "text", "ciphertext 1: expected bytes, got str"),
    ],
)
def test_malformed_or_truncated_ciphertext_is_rejected(setup: tuple, mutate, match: str) -> None:
    h, _, upload = setup
    agg = h.aggregator(D)
    bad = list(upload)
    bad[1] = mutate(bad[1])
    with pytest.raises(CKKSError, match=match):
        agg.add(bad)
    assert agg.n_added == 0


def test_rejected_upload_leaves_the_sum_untouched(setup: tuple) -> None:
    h, _, upload = setup
    agg = h.aggregator(D)
    agg.add(upload)
    with pytest.raises(CKKSError, match="malformed or truncated"):
        agg.add([upload[0], upload[1], upload[2][:100]])
    assert agg.n_added == 1
    expected = h.decryptor(D).decrypt(upload)
    np.testing.assert_allclose(h.decryptor(D).decrypt(agg.result()), expected, atol=2 * P.release_tolerance(1, D))


@pytest.mark.parametrize("other", [CKKSParams(4096, (40, 40), 29), CKKSParams(2048, (36, 18), 25)])
def test_ciphertext_from_foreign_parameters_is_rejected(setup: tuple, other: CKKSParams) -> None:
    h, _, upload = setup
    foreign = KeyHolder(other).encryptor(P.slots).encrypt(np.zeros(P.slots))[0]
    agg = h.aggregator(D)
    with pytest.raises(CKKSError, match="ciphertext 0: ciphertext is not valid for this context: made under different"):
        agg.add([foreign, upload[1], upload[2]])


def test_ciphertext_with_wrong_length_is_rejected(setup: tuple) -> None:
    h, _, upload = setup
    other = h.encryptor(4200).encrypt(np.zeros(4200))  # also 3 ciphertexts, the last one with 104 values
    with pytest.raises(CKKSError, match="ciphertext 2: encodes 104 values, expected 404"):
        h.aggregator(D).add([upload[0], upload[1], other[2]])


def test_wire_format_mix_up_is_named() -> None:
    sh = holder("shared-clients")
    seeded = sh.encryptor(D, wire="seeded").encrypt(np.zeros(D))
    plain = sh.encryptor(D, wire="tenseal").encrypt(np.zeros(D))
    with pytest.raises(CKKSError, match="looks like a raw SEAL ciphertext: the 'seeded' wire format"):
        sh.aggregator(D, wire="tenseal").add(seeded)
    with pytest.raises(CKKSError, match="looks like a TenSEAL CKKSVector: the 'tenseal' wire format"):
        sh.aggregator(D, wire="seeded").add(plain)


def test_seeded_truncated_and_foreign_are_rejected() -> None:
    sh = holder("shared-clients")
    upload = sh.encryptor(D).encrypt(np.zeros(D))
    agg = sh.aggregator(D)
    with pytest.raises(CKKSError, match="ciphertext 0: malformed or truncated ciphertext"):
        agg.add([upload[0][:-10], upload[1], upload[2]])
    foreign = KeyHolder(CKKSParams(4096, (40, 40), 29), custody="shared-clients").encryptor(10).encrypt(np.zeros(10))
    with pytest.raises(CKKSError, match="ciphertext 2: ciphertext is not valid for this context"):
        agg.add([upload[0], upload[1], foreign[0]])
    assert agg.n_added == 0


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.full(D, 1.5), r"reaches 1.5 > max_abs_value 1.0"),
        (np.full(D, np.nan), "NaN or infinite"),
        (np.zeros(D + 1), r"expected a vector of shape \(4500,\)"),
    ],
)
def test_encryptor_rejects_bad_vectors(setup: tuple, x: np.ndarray, match: str) -> None:
    _, enc, _ = setup
    with pytest.raises(CKKSError, match=match):
        enc.encrypt(x)


# --------------------------------------------------------------------------- release noise


def test_decryptor_noise_hook_is_applied(setup: tuple) -> None:
    h, _, upload = setup
    calls: list[int] = []

    def hook(dim: int) -> np.ndarray:
        calls.append(dim)
        return np.full(dim, 100.0)

    dec = h.decryptor(D)
    clean = dec.decrypt(upload)
    noisy = dec.decrypt(upload, noise=hook)
    assert calls == [D]
    np.testing.assert_allclose(noisy - clean, 100.0, atol=2 * P.release_tolerance(1, D))
    with pytest.raises(CKKSError, match=r"noise hook returned shape \(3,\)"):
        dec.decrypt(upload, noise=lambda dim: np.zeros(3))


def test_gaussian_release_noise_is_seeded() -> None:
    x = vectors(2, 4000, 9)
    a, _ = encrypted_sum(x, params=P, seed=3, noise_std=0.5)
    b, _ = encrypted_sum(x, params=P, seed=3, noise_std=0.5)
    c, _ = encrypted_sum(x, params=P, seed=4, noise_std=0.5)
    assert np.std(a - x.sum(0)) == pytest.approx(0.5, rel=0.1)
    np.testing.assert_allclose(a, b, rtol=0, atol=2 * P.release_tolerance(2, 4000))  # same noise, fresh encryptions
    assert np.max(np.abs(a - c)) > 0.5
    draw = gaussian_noise(2.0, np.random.default_rng(0))
    assert draw(10).shape == (10,)
    with pytest.raises(CKKSError, match="std must be"):
        gaussian_noise(-1.0, np.random.default_rng(0))


def test_fresh_interpreter_round_trip() -> None:
    """The module works when nothing else has imported ``tenseal.sealapi`` first."""
    code = (
        "import numpy as np\n"
        "from gfmfr_secure.secagg.ckks import PRESETS, encrypted_sum\n"
        "x = np.full((2, 5), 0.5)\n"
        "t, _ = encrypted_sum(x, params=PRESETS['default'])\n"
        "assert np.allclose(t, 1.0, atol=1e-3), t\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
