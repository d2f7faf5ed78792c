"""The ``packed`` wire format's words: SEAL's ciphertexts read and rebuilt exactly, untrusted words checked.

Against SEAL itself: the words read from ``Ciphertext.save`` rebuild to bytes SEAL loads and
decrypts; adding words mod q_i gives the words of SEAL's own ``add_inplace``; and the checks
refuse what SEAL's loader would (another parameter set, a word at or above its prime, a
short message, SEAL's bytes where words are due).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfmfr_secure.secagg.ckks import CKKSError, CKKSParams, KeyHolder
from gfmfr_secure.secagg.ckks.messages import Scratch
from gfmfr_secure.secagg.ckks.words import MAGIC, WordLayout, add_into, as_seal, pack, seal_from_words, unpack, word_layout, words_from_seal

ts = pytest.importorskip("tenseal")
from tenseal import sealapi  # noqa: E402  (after the skip)

P = CKKSParams(8192, (60, 20, 45), 66, max_abs_value=8.0, max_summands=943)  # the backend's ring and primes


@pytest.fixture(scope="module")
def seal():
    """(context, layout, encryptor, decryptor, encoder, evaluator, scratch) at P."""
    holder = KeyHolder(P, custody="authority")
    context = holder._context.seal_context().data
    scratch = Scratch()
    yield (
        context,
        word_layout(context),
        sealapi.Encryptor(context, holder._context.public_key().data),
        sealapi.Decryptor(context, holder._context.secret_key().data),
        sealapi.CKKSEncoder(context),
        sealapi.Evaluator(context),
        scratch,
    )
    scratch.close()


def _encrypt(seal, values: np.ndarray):
    context, _, encryptor, _, encoder, _, _ = seal
    plain, ct = sealapi.Plaintext(), sealapi.Ciphertext()
    encoder.encode(values.tolist(), P.scale, plain)
    encryptor.encrypt(plain, ct)
    return ct


def _decrypt(seal, saved: bytes) -> np.ndarray:
    context, _, _, decryptor, encoder, _, scratch = seal
    plain = sealapi.Plaintext()
    decryptor.decrypt(scratch.load_ciphertext(sealapi, context, saved), plain)
    return np.asarray(encoder.decode_double(plain))


def test_the_layout_is_the_data_level(seal) -> None:
    layout = seal[1]
    assert layout.primes == P.primes[:2] and layout.degree == 8192 and layout.widths == (8, 3)
    assert layout.nbytes == len(MAGIC) + 32 + 2 * 8192 * 11


def test_words_round_trip_through_seal(seal) -> None:
    context, layout, *_, scratch = seal
    x = np.random.default_rng(0).uniform(-8, 8, 4096)
    saved = scratch.save(_encrypt(seal, x))
    words = words_from_seal(saved, layout, P.scale)
    assert words.shape == (2, 2, 8192) and np.all(words < np.array(layout.primes, dtype=np.uint64).reshape(1, -1, 1))
    message = pack(words, layout)
    assert len(message) == layout.nbytes < len(saved)  # fewer bytes than SEAL's compressed form
    np.testing.assert_array_equal(unpack(message, layout, "ct"), words)
    rebuilt = seal_from_words(words, layout, P.scale)
    np.testing.assert_allclose(_decrypt(seal, rebuilt), x, atol=1e-6)
    assert words_from_seal(rebuilt, layout, P.scale).tobytes() == words.tobytes()  # SEAL's uncompressed form reads back
    assert as_seal(message, layout, P.scale) == rebuilt and as_seal(saved, layout, P.scale) == saved


def test_adding_words_is_seal_s_addition(seal) -> None:
    context, layout, _, _, _, evaluator, scratch = seal
    rng = np.random.default_rng(1)
    a, b = (_encrypt(seal, rng.uniform(-8, 8, 4096)) for _ in range(2))
    wa, wb = (words_from_seal(scratch.save(ct), layout, P.scale) for ct in (a, b))
    evaluator.add_inplace(a, b)
    add_into(wa, wb, layout)
    np.testing.assert_array_equal(wa, words_from_seal(scratch.save(a), layout, P.scale))


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_add_into_is_addition_mod_each_prime(seed: int) -> None:
    layout = WordLayout(bytes(32), (2**61 - 1, 1032193, 97), 16)
    rng = np.random.default_rng(seed)
    q = np.array(layout.primes, dtype=object).reshape(1, -1, 1)
    a, b = (np.array([[rng.integers(0, p, 16, dtype=np.uint64) for p in layout.primes] for _ in range(2)]) for _ in range(2))
    expected = (a.astype(object) + b.astype(object)) % q
    add_into(a, b, layout)
    assert a.dtype == np.uint64 and np.array_equal(a.astype(object), expected)


def test_unpack_refuses_what_seal_would(seal) -> None:
    context, layout, *_, scratch = seal
    saved = scratch.save(_encrypt(seal, np.zeros(4096)))
    message = pack(words_from_seal(saved, layout, P.scale), layout)
    with pytest.raises(CKKSError, match="looks like a SEAL serialisation"):
        unpack(saved, layout, "ct")
    with pytest.raises(CKKSError, match="truncated"):
        unpack(message[:-1], layout, "ct")
    other = word_layout(KeyHolder(CKKSParams(8192, (60, 24, 45), 66, max_abs_value=8.0, max_summands=943))._context.seal_context().data)
    with pytest.raises(CKKSError, match="different encryption parameters"):
        unpack(message, other, "ct")
    # the last word of the 20-bit prime's second polynomial set to 2^24 - 1 >= q_1
    forged = message[:-3] + b"\xff\xff\xff"
    with pytest.raises(CKKSError, match="data prime 1 is not below it"):
        unpack(forged, layout, "ct")


def test_the_aggregator_adds_words_and_the_key_holder_decrypts_them() -> None:
    """End to end at the backend's parameters: three uploads, their words summed by the aggregator, released flooded."""
    holder = KeyHolder(P, custody="authority")
    dim = 10_000
    x = np.random.default_rng(2).uniform(-8, 8, (3, dim))
    encryptor, aggregator = holder.encryptor(dim, wire="packed"), holder.aggregator(dim, wire="packed")
    for row in x:
        upload = encryptor.encrypt(row)
        assert all(c[: len(MAGIC)] == MAGIC for c in upload)
        aggregator.add(upload)
    enc_sum = aggregator.result()
    released = holder.decryptor(dim, wire="packed").decrypt(enc_sum)
    np.testing.assert_allclose(released, x.sum(0), atol=P.release_tolerance(3, dim, packing="coefficients"))
    forged = list(enc_sum)
    forged[1] = forged[1][:-3] + b"\xff\xff\xff"
    with pytest.raises(CKKSError, match="encrypted sum, ciphertext 1: .*data prime 1"):
        holder.decryptor(dim, wire="packed").decrypt(forged)
