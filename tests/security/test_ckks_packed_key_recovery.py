"""CKKS key recovery against the ``packed`` wire format (one value per coefficient), and the flooding that stops it.

The adversary is the aggregator under ``authority`` custody: it holds the public context,
every upload and the encrypted sum, and it receives the decryption of that sum. With one
value per coefficient the attack needs a single ciphertext: an exact release ``r`` gives
the decrypted phase ``w = round(Delta r) = c0 + c1 s (mod q)`` coefficient by coefficient,
so ``s = NTT^-1((NTT(w) - NTT(c0)) / NTT(c1))``; with ``s`` it decrypts any single upload.
:class:`~gfmfr_secure.secagg.ckks.Decryptor` adds an integer Gaussian polynomial to the
ciphertext before decrypting (40-bit statistical security), and the same algebra then
returns garbage.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

ts = pytest.importorskip("tenseal")
from tenseal import sealapi  # noqa: E402  (after the skip)
from test_ckks_key_recovery import N, _psi, _zstd_decompress, intt, ntt  # noqa: E402  (same folder)

from gfmfr_secure.secagg.ckks import CKKSParams, KeyHolder  # noqa: E402
from gfmfr_secure.secagg.ckks.messages import Scratch  # noqa: E402
from gfmfr_secure.secagg.ckks.words import as_seal, word_layout  # noqa: E402
from gfmfr_secure.secagg.ckks import slots_to_coefficients  # noqa: E402

# N = 4096 (the attack helpers' ring), one 60-bit data prime, Delta = 2**46: the smallest packed
# parameters; the backend's N = 8192 ring floods by the same rule (test_backend_parameters_are_...).
PARAMS = CKKSParams(4096, (60, 49), 46, max_abs_value=8.0, max_summands=943)


def coefficients_of(blob: bytes, seal_context) -> np.ndarray:
    """int64 [2, N]: (c0, c1) of a serialised SEAL ciphertext in coefficient form (one data prime)."""
    scratch = Scratch()
    ct = scratch.load_ciphertext(sealapi, seal_context, as_seal(blob, word_layout(seal_context), PARAMS.scale))
    out = sealapi.Ciphertext()
    sealapi.Evaluator(seal_context).transform_from_ntt(ct, out)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ct.bin")
        out.save(path)
        with open(path, "rb") as f:
            raw = f.read()
    scratch.close()
    body = _zstd_decompress(raw[16:]) if raw[5] == 2 else raw[16:]  # header byte 5: compression mode
    return np.frombuffer(body[-2 * N * 8 :], dtype="<u8").reshape(2, N).astype(object)


def solve_key(c: np.ndarray, released: np.ndarray, scale: float, q: int) -> np.ndarray:
    """The candidate secret key (centred mod q) from one ciphertext and the release of its N values."""
    psi = _psi(q)
    w = np.array([int(v) % q for v in np.rint(released * scale).astype(np.int64)], dtype=object)
    s_ntt = (ntt((w - c[0]) % q, q, psi) * np.array([pow(int(v), q - 2, q) for v in ntt(c[1], q, psi)], dtype=object)) % q
    s = intt(s_ntt, q, psi)
    return np.array([int(v) - q if int(v) > q // 2 else int(v) for v in s], dtype=np.int64)


def decrypt_upload(c: np.ndarray, s: np.ndarray, q: int, scale: float) -> np.ndarray:
    psi = _psi(q)
    phase = (c[0] + intt(ntt(c[1], q, psi) * ntt(np.asarray(s % q, dtype=object), q, psi) % q, q, psi)) % q
    return np.array([float(int(v) - q if int(v) > q // 2 else int(v)) for v in phase]) / scale


def round_of_sums(n_clients: int = 3):
    holder = KeyHolder(PARAMS, custody="authority")
    x = np.random.default_rng(0).uniform(-1.0, 1.0, (n_clients, N)) * 2.0**-8
    encryptor, aggregator = holder.encryptor(N, wire="packed"), holder.aggregator(N, wire="packed")
    uploads = [encryptor.encrypt(row) for row in x]
    for upload in uploads:
        aggregator.add(upload)
    return holder, x, uploads, aggregator.result()


def exact_release(holder: KeyHolder, blob: bytes) -> np.ndarray:
    """What a decryptor without flooding would hand back: float64 [N]."""
    seal_context = holder._context.seal_context().data
    scratch = Scratch()
    plain = sealapi.Plaintext()
    sealapi.Decryptor(seal_context, holder._context.secret_key().data).decrypt(scratch.load_ciphertext(sealapi, seal_context, as_seal(blob, word_layout(seal_context), PARAMS.scale)), plain)
    scratch.close()
    return slots_to_coefficients(np.array([sealapi.CKKSEncoder(seal_context).decode_complex(plain)]))[0]


def test_exact_release_of_a_packed_sum_reveals_the_key_and_every_upload() -> None:
    """The insecure setting: one exact release suffices, so the flooded test below cannot pass vacuously."""
    holder, x, uploads, enc_sum = round_of_sums()
    public = ts.context_from(holder.public_context_bytes())
    seal_context = public.seal_context().data
    q = PARAMS.primes[0]
    s = solve_key(coefficients_of(enc_sum[0], seal_context), exact_release(holder, enc_sum[0]), PARAMS.scale, q)
    assert set(np.unique(s)) <= {-1, 0, 1} and np.count_nonzero(s) > N // 2  # a ternary secret key
    victim = decrypt_upload(coefficients_of(uploads[1][0], seal_context), s, q, PARAMS.scale)
    np.testing.assert_allclose(victim, x[1], atol=PARAMS.sum_tolerance(1, packing="coefficients"))  # one upload, in the clear


def test_flooded_packed_release_defeats_the_attack_and_stays_accurate() -> None:
    holder, x, _, enc_sum = round_of_sums()
    decryptor = holder.decryptor(N, wire="packed")
    released = decryptor.decrypt(enc_sum)
    assert decryptor.flooding_std == PARAMS.flooding_std(N, packing="coefficients")
    assert np.std(released - x.sum(0)) == pytest.approx(decryptor.flooding_std, rel=0.1)
    np.testing.assert_allclose(released, x.sum(0), atol=PARAMS.release_tolerance(3, N, packing="coefficients"))
    public = ts.context_from(holder.public_context_bytes())
    s = solve_key(coefficients_of(enc_sum[0], public.seal_context().data), released, PARAMS.scale, PARAMS.primes[0])
    assert np.mean(np.isin(s, [-1, 0, 1])) < 0.01
