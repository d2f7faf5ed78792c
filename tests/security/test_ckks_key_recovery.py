"""CKKS key recovery from a released decryption (Li and Micciancio, Eurocrypt 2021), and the flooding that stops it.

The adversary is the aggregator of the ``ckks`` backend under ``authority`` custody: it
holds the public context, every upload and the encrypted sum it computed, and it
receives the decryption of that sum. The attack:

1. read ``(c0, c1)`` of two ciphertexts of the sum in coefficient form modulo the first
   data prime ``q0`` (SEAL serialisation, zstd-compressed);
2. re-encode the released real parts of each ciphertext's 2048 slots: the slot values
   at the roots ``psi^(3^k)`` and their conjugates determine ``w = p + sigma(p)`` with
   ``p = c0 + c1 s`` the decrypted phase and ``sigma: X -> X^-1``, exactly after
   rounding when the release is exact;
3. ``c1 s + sigma(c1) sigma(s) = w - c0 - sigma(c0)`` couples the NTT points ``i`` and
   ``N - 1 - i``; two ciphertexts give a 2 x 2 system per pair of points, solved mod q0;
4. the solution is the secret key if it is ternary; with it the adversary decrypts any
   single client's upload.

Against an exact release (what the backend used to hand out) the key and an
individual upload are recovered; against the flooded release of :class:`Decryptor`
(40-bit statistical security) the solution is uniform garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile

import numpy as np
import pytest
import torch

ts = pytest.importorskip("tenseal")
from tenseal import sealapi  # noqa: E402  (after the skip)

from gfmfr_secure.aggregation.ckks import ckks_params_for  # noqa: E402
from gfmfr_secure.secagg.ckks import STAT_SECURITY_BITS, CKKSParams, KeyHolder  # noqa: E402

N = 4096
#: the backend's parameters now, and the single-prime parameters it used before flooding
BACKEND = ckks_params_for(8.0, 1024)
LEGACY = CKKSParams(4096, (42, 42), 27, max_abs_value=8.0, max_summands=1024)


# --------------------------------------------------------------------------- the attack


def _zstd_decompress(blob: bytes) -> bytes:
    name = ctypes.util.find_library("zstd") or "libzstd.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        pytest.skip("libzstd is needed to read SEAL's compressed ciphertexts")
    lib.ZSTD_getFrameContentSize.restype = ctypes.c_ulonglong
    lib.ZSTD_decompress.restype = ctypes.c_size_t
    size = lib.ZSTD_getFrameContentSize(blob, len(blob))
    buf = ctypes.create_string_buffer(size)
    assert lib.ZSTD_decompress(buf, size, blob, len(blob)) == size
    return buf.raw


def ciphertext_coefficients(blob: bytes, public_context) -> np.ndarray:
    """uint64 [2, L, N]: (c0, c1) of a serialised CKKSVector in coefficient form, one row per prime."""
    ct = ts.ckks_vector_from(public_context, blob).ciphertext()[0]
    out = sealapi.Ciphertext()
    sealapi.Evaluator(public_context.seal_context().data).transform_from_ntt(ct, out)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ct.bin")
        out.save(path)
        with open(path, "rb") as f:
            raw = f.read()
    body = _zstd_decompress(raw[16:]) if raw[5] == 2 else raw[16:]  # header byte 5: compression mode
    levels = out.coeff_modulus_size()
    return np.frombuffer(body[-2 * N * levels * 8 :], dtype="<u8").reshape(2, levels, N)


def _slot_exponents() -> np.ndarray:
    """Slot k of SEAL's CKKS encoder holds p(psi^(3^k mod 2N))."""
    out = np.empty(N // 2, dtype=np.int64)
    pos = 1
    for k in range(N // 2):
        out[k] = pos
        pos = pos * 3 % (2 * N)
    return out


def reencode(real_slots: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """Integer coefficients of ``p + sigma(p)`` from the released real parts of p's slots, and the rounding residual."""
    e = _slot_exponents()
    values = np.zeros(2 * N)
    values[e] = values[2 * N - e] = real_slots * scale
    w = 2.0 * np.fft.fft(values)[:N].real / N
    rounded = np.rint(w)
    return rounded.astype(np.int64).astype(object), float(np.max(np.abs(w - rounded)))


def _psi(q: int) -> int:
    for g in range(2, 10_000):
        psi = pow(g, (q - 1) // (2 * N), q)
        if pow(psi, N, q) == q - 1:
            return psi
    raise AssertionError("no primitive 2N-th root")


def _cyclic_ntt(a: np.ndarray, w: int, q: int) -> np.ndarray:
    n = len(a)
    if n == 1:
        return a
    even, odd = _cyclic_ntt(a[0::2], w * w % q, q), _cyclic_ntt(a[1::2], w * w % q, q)
    tw = np.empty(n // 2, dtype=object)
    acc = 1
    for k in range(n // 2):
        tw[k] = acc
        acc = acc * w % q
    t = tw * odd % q
    return np.concatenate([(even + t) % q, (even - t) % q])


def ntt(a: np.ndarray, q: int, psi: int) -> np.ndarray:
    """Evaluations at psi^(2i + 1), i = 0..N-1 (negacyclic NTT)."""
    pw = np.array([pow(psi, j, q) for j in range(N)], dtype=object)
    return _cyclic_ntt(np.asarray(a, dtype=object) * pw % q, psi * psi % q, q)


def intt(values: np.ndarray, q: int, psi: int) -> np.ndarray:
    a = _cyclic_ntt(np.asarray(values, dtype=object), pow(psi * psi % q, q - 2, q), q)
    psi_inv = pow(psi, q - 2, q)
    pw = np.array([pow(psi_inv, j, q) for j in range(N)], dtype=object)
    return a * pow(N, q - 2, q) % q * pw % q


def conj(a: np.ndarray, q: int) -> np.ndarray:
    """sigma(a)(X) = a(X^-1) mod X^N + 1, on coefficients mod q."""
    out = np.empty(N, dtype=object)
    out[0] = a[0]
    out[1:] = (-np.asarray(a[1:], dtype=object)[::-1]) % q
    return out


def recover_key(coeffs: list[np.ndarray], released: list[np.ndarray], scale: float, q0: int) -> tuple[np.ndarray, float]:
    """The candidate secret key (int64 [N], centred mod q0) from two ciphertexts and their releases."""
    psi = _psi(q0)
    eqs = []
    worst = 0.0
    for c, r in zip(coeffs, released, strict=True):
        w, residual = reencode(r, scale)
        worst = max(worst, residual)
        c0, c1 = c[0, 0].astype(object), c[1, 0].astype(object)
        eqs.append((ntt(c1, q0, psi), ntt((w - c0 - conj(c0, q0)) % q0, q0, psi)))
    (a, t), (b, u) = eqs[:2]
    i = np.arange(N)
    j = N - 1 - i
    det = (a[i] * b[j] - a[j] * b[i]) % q0
    inv = np.array([pow(int(d), q0 - 2, q0) for d in det], dtype=object)
    s = intt((t[i] * b[j] - a[j] * u[i]) % q0 * inv % q0, q0, psi)
    return np.array([int(v) - q0 if int(v) > q0 // 2 else int(v) for v in s], dtype=np.int64), worst


def decrypt_with(blob_coeffs: np.ndarray, s: np.ndarray, primes: tuple[int, ...], scale: float) -> np.ndarray:
    """Decrypt one ciphertext (uint64 [2, L, N]) with a ternary key: CRT over the data primes, then decode."""
    q = 1
    phase = 0
    for level, p in enumerate(primes):
        c0, c1 = blob_coeffs[0, level].astype(object), blob_coeffs[1, level].astype(object)
        c1s = intt(ntt(c1, p, _psi(p)) * ntt(np.asarray(s % p, dtype=object), p, _psi(p)) % p, p, _psi(p))
        r = (c0 + c1s) % p
        # CRT: phase = phase mod q, r mod p
        phase = phase + q * ((r - phase) * pow(q, -1, p) % p)
        q *= p
    centred = np.array([float(int(v) - q if int(v) > q // 2 else int(v)) for v in phase])
    evals = np.fft.ifft(np.concatenate([centred, np.zeros(N)])) * (2 * N)  # p(exp(i pi e / N)), e = 0..2N-1
    return evals[_slot_exponents()].real / scale


def round_of_sums(params: CKKSParams, n_clients: int = 3, seed: int = 0):
    """n clients encrypt two full ciphertexts each; the aggregator sums them."""
    holder = KeyHolder(params, custody="authority")
    dim = 2 * params.slots
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, (n_clients, dim)) * 2.0**-8
    encryptor, aggregator = holder.encryptor(dim), holder.aggregator(dim)
    uploads = [encryptor.encrypt(row) for row in x]
    for upload in uploads:
        aggregator.add(upload)
    return holder, x, uploads, aggregator.result()


def exact_release(holder: KeyHolder, enc_sum: list[bytes]) -> list[np.ndarray]:
    """What the decryptor released before flooding: TenSEAL's exact decryption."""
    secret = ts.context_from(holder._context.serialize(save_secret_key=True))
    return [np.asarray(ts.ckks_vector_from(secret, blob).decrypt()) for blob in enc_sum]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("params", [LEGACY, BACKEND], ids=["legacy-42-42", "backend-34-34-41"])
def test_exact_release_reveals_the_key_and_every_upload(params: CKKSParams) -> None:
    """The insecure setting: the attack works, so the flooded test below cannot pass vacuously."""
    holder, x, uploads, enc_sum = round_of_sums(params)
    public = ts.context_from(holder.public_context_bytes())
    coeffs = [ciphertext_coefficients(blob, public) for blob in enc_sum]
    s, residual = recover_key(coeffs, exact_release(holder, enc_sum), params.scale, params.primes[0])
    assert residual < 0.05  # the re-encoded phase is an exact integer polynomial
    assert set(np.unique(s)) <= {-1, 0, 1} and np.count_nonzero(s) > N // 2  # a ternary secret key
    victim = ciphertext_coefficients(uploads[1][0], public)
    recovered = decrypt_with(victim, s, params.primes[:-1], params.scale)
    np.testing.assert_allclose(recovered, x[1, : params.slots], atol=params.sum_tolerance(1))  # one upload, in the clear


@pytest.mark.parametrize("custody", ["authority", "shared-clients"])
def test_flooded_release_defeats_the_attack_and_stays_accurate(custody: str) -> None:
    params = BACKEND
    holder = KeyHolder(params, custody=custody)  # type: ignore[arg-type]
    dim = 2 * params.slots
    x = np.random.default_rng(1).uniform(-1.0, 1.0, (3, dim)) * 2.0**-8
    wire = "tenseal"
    encryptor, aggregator = holder.encryptor(dim, wire=wire), holder.aggregator(dim, wire=wire)
    for row in x:
        aggregator.add(encryptor.encrypt(row))
    enc_sum = aggregator.result()
    decryptor = holder.decryptor(dim, wire=wire)
    released = decryptor.decrypt(enc_sum)
    # accurate: the flooding noise is what the bound says, and small against the values
    assert decryptor.flooding_std == params.flooding_std(dim, symmetric=custody == "shared-clients")
    assert np.std(released - x.sum(0)) == pytest.approx(decryptor.flooding_std, rel=0.1)
    np.testing.assert_allclose(released, x.sum(0), atol=params.release_tolerance(3, dim, symmetric=custody == "shared-clients"))
    # the attack now fails: the re-encoded phase is no longer an integer polynomial and the
    # solution of the linear system is not a ternary key
    public = ts.context_from(holder.public_context_bytes())
    coeffs = [ciphertext_coefficients(blob, public) for blob in enc_sum]
    chunks = [released[: params.slots], released[params.slots :]]
    s, residual = recover_key(coeffs, chunks, params.scale, params.primes[0])
    assert residual > 0.4
    assert np.mean(np.isin(s, [-1, 0, 1])) < 0.01


def test_flooding_bound_gives_40_bits_for_a_round() -> None:
    """KL(real || ideal) = ||delta||^2 / (2 sigma^2) <= 2^-40 at the bound on ||delta||, and the noise stays small."""
    params, dim = BACKEND, 579_850  # the default ML-100K layout: 5 groups x (1682 * 64 + 8321 head + 1 count)
    sigma = params.flooding_std(dim)
    n_max = params.max_summands
    fp = (np.log2(N) + 2) * 2.0**-53 * n_max * params.max_abs_value
    bound = np.sqrt(dim) * (2 * params.error_std(n_max) + fp)
    assert STAT_SECURITY_BITS == 40
    assert bound**2 / (2 * sigma**2) == pytest.approx(2.0**-STAT_SECURITY_BITS, rel=1e-9)
    assert sigma < 1e-2  # on a sum of up to 1024 clients; a mean moves by ~1e-5
    # the single-prime parameters could not be flooded usefully
    assert LEGACY.flooding_std(dim) > 1e3


def test_backend_uses_fresh_keys_every_round_and_floods(monkeypatch: pytest.MonkeyPatch) -> None:
    from gfmfr_secure.aggregation import get_aggregator
    from gfmfr_secure.secagg import ckks as ckks_module
    from gfmfr_secure.types import CohortUpdate

    made: list[KeyHolder] = []
    original = ckks_module.KeyHolder.__init__

    def counting(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(ckks_module.KeyHolder, "__init__", counting)
    n, n_items, d, h = 4, 10, 3, 5
    rng = np.random.default_rng(2)
    update = CohortUpdate(
        clients=np.arange(n, dtype=np.int64),
        n_samples=np.ones(n, dtype=np.int64),
        row_ptr=np.arange(0, 2 * n + 1, 2, dtype=np.int64),
        row_items=rng.integers(0, n_items, 2 * n).astype(np.int64),
        item_delta=torch.from_numpy(rng.uniform(-0.1, 0.1, (2 * n, d)).astype(np.float32)),
        head_delta=torch.from_numpy(rng.uniform(-0.1, 0.1, (n, h)).astype(np.float32)),
        head_after=None,
        group=np.zeros(n, dtype=np.int64),
        loss=np.zeros(n),
    )
    backend = get_aggregator("ckks")
    keys = []
    for _ in range(2):
        backend.aggregate(update, n_items=n_items, weights=np.ones(n), groups=np.zeros(n, dtype=np.int64), n_groups=1)
        keys.append(made[-1].public_context_bytes())
        assert backend.last_cost["flooding_std"] > 0 and backend.last_cost["bytes_down_per_client"] > 0
    assert len(made) == 2 and keys[0] != keys[1]  # one key per round: a broken key opens one round only
