"""Primitives of pairwise-mask secure aggregation: key derivation, the PRG, commitments, signatures.

Pure functions of their inputs (no protocol state): HKDF-SHA256 with a domain label
(:func:`hkdf`), the AES-256-CTR keystream read as little-endian uint32 words
(:class:`Keystream`, :func:`prg_mask`), the pairwise mask seed agreed by X25519
(:func:`derive_pair_seed`), the share-encryption keys of a pair (:func:`share_key_pair`),
the SHA-256 commitment to a self-mask seed, the BLAKE3 digest a masked payload is signed
under (:func:`payload_digest`) and Ed25519 verification that raises :class:`SecAggError`
(:func:`verify_signature`; it remembers what it verified, see there). Fixed-point encoding lives in :mod:`gfmfr_secure.secagg.fixedpoint`,
Shamir sharing in :mod:`gfmfr_secure.secagg.shamir`.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time

import blake3
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gfmfr_secure.errors import GfmfrError
from gfmfr_secure.rng import seed_sequence

__all__ = [
    "KEY_BYTES",
    "SIG_BYTES",
    "Keystream",
    "SecAggError",
    "client_secret_seed",
    "commitment_to",
    "derive_pair_seed",
    "hkdf",
    "keystream_bytes",
    "payload_digest",
    "prg_mask",
    "share_key_pair",
    "skipped_verify_seconds",
    "verify_signature",
]


class SecAggError(GfmfrError, ValueError):
    """The protocol cannot proceed: a rejected message, a refused request or too few shares."""



LABEL = b"gfmfr-secagg/v1/"
ZERO_IV = bytes(16)  # AES-256-CTR initial counter block; every key is used once
ZERO_NONCE12 = bytes(12)  # ChaCha20-Poly1305; every key encrypts one message
KEY_BYTES = 32
SIG_BYTES = 64


def hkdf(ikm: bytes, label: str, *numbers: int, length: int = KEY_BYTES) -> bytes:
    """``length`` (32) bytes from HKDF-SHA256 with info = label and the given 32-bit numbers."""
    info = LABEL + label.encode("ascii") + struct.pack(f"<{len(numbers)}I", *numbers)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def keystream_bytes(key: bytes, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of the AES-256-CTR keystream of ``key`` (zero initial counter)."""
    return Cipher(algorithms.AES256(key), modes.CTR(ZERO_IV)).encryptor().update(bytes(n_bytes))


def clamp_x25519(raw: bytes) -> bytes:
    """RFC 7748 clamping, applied up front so the shared bytes are the key actually used (< 2^255)."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return bytes(b)


def derive_pair_seed(
    own: X25519PrivateKey, peer: X25519PublicKey, round_id: int, u: int, v: int
) -> bytes:
    """s_uv: the 32-byte pairwise mask seed; symmetric in (u, v)."""
    return hkdf(own.exchange(peer), "pair-mask", round_id, min(u, v), max(u, v))


def share_key_pair(shared: bytes, round_id: int, own: int, peer: int) -> tuple[bytes, bytes]:
    """Keys of the shares ``own -> peer`` and ``peer -> own`` from X25519(c_u^SK, c_v^PK).

    One 64-byte HKDF output per pair: the first half keys the direction from the lower id
    to the higher, the second half the other direction.
    """
    lo, hi = min(own, peer), max(own, peer)
    okm = hkdf(shared, "share-encryption", round_id, lo, hi, length=2 * KEY_BYTES)
    up, down = okm[:KEY_BYTES], okm[KEY_BYTES:]
    return (up, down) if own == lo else (down, up)


def commitment_to(self_seed: bytes, round_id: int, client: int) -> bytes:
    """SHA-256 commitment to b_u (hiding: b_u has 255 random bits)."""
    return hashlib.sha256(
        LABEL + b"self-mask" + struct.pack("<II", round_id, client) + self_seed
    ).digest()


def payload_digest(payload: bytes | memoryview) -> bytes:
    """The 32-byte BLAKE3 digest of a masked payload (what its Ed25519 signature covers).

    BLAKE3 rather than SHA-256: a payload is 4 D bytes (2.3 MB in a default round), hashed
    by its client and again by the server, and BLAKE3 hashes it 3.5x faster here.
    """
    return blake3.blake3(payload).digest()


#: (public key, signature, message) -> (valid, seconds the verification took); see verify_signature
_VERIFIED: dict[tuple[bytes, bytes, bytes], tuple[bool, float]] = {}
_VERIFIED_LOCK = threading.Lock()
_VERIFIED_LIMIT = 1 << 15  # about 6,000 signatures a default round; cleared when full (a few MB at most)
_SKIPPED = threading.local()


def skipped_verify_seconds() -> float:
    """Seconds of Ed25519 verification this thread did not redo (see :func:`verify_signature`).

    A simulation driver adds the change over a client's call to that client's cost, so a
    client is charged for every verification it makes, run or remembered.
    """
    return getattr(_SKIPPED, "seconds", 0.0)


def verify_signature(key: Ed25519PublicKey, signature: bytes, message: bytes, what: str) -> None:
    """Raise :class:`SecAggError` unless ``signature`` is ``key``'s Ed25519 signature of ``message``.

    Verification is a deterministic function of the three byte strings, so the outcome of
    each triple is remembered in this process: when one process plays many parties (the
    simulation: every neighbour of a client verifies that client's key advertisement, and
    the clients' transcript replay re-verifies what the server verified), each distinct
    signature is checked once. Different bytes are a different triple, so a forged or
    substituted message is verified afresh. The time a remembered verification took is
    added to :func:`skipped_verify_seconds` of the calling thread.
    """
    entry = (key.public_bytes_raw(), bytes(signature), bytes(message))
    known = _VERIFIED.get(entry)
    if known is None:
        t0 = time.perf_counter()
        try:
            key.verify(signature, message)
            valid = True
        except InvalidSignature:
            valid = False
        known = (valid, time.perf_counter() - t0)
        with _VERIFIED_LOCK:
            if len(_VERIFIED) >= _VERIFIED_LIMIT:
                _VERIFIED.clear()
            _VERIFIED[entry] = known
    else:
        _SKIPPED.seconds = skipped_verify_seconds() + known[1]
    if not known[0]:
        raise SecAggError(
            f"{what} failed signature verification: tampered, truncated or forged"
        )


class Keystream:
    """A reusable buffer holding the PRG output for one vector length.

    ``fill(key)`` overwrites the buffer with ``PRG(key)`` and returns it as uint32 [D]; the
    returned view is only valid until the next call.
    """

    def __init__(self, dim: int) -> None:
        self._zeros = bytes(4 * dim)
        self._buf = bytearray(4 * dim)
        self._view = np.frombuffer(self._buf, dtype="<u4")

    def fill(self, key: bytes) -> np.ndarray:
        encryptor = Cipher(algorithms.AES256(key), modes.CTR(ZERO_IV)).encryptor()
        encryptor.update_into(self._zeros, self._buf)
        return self._view


def prg_mask(seed: bytes, dim: int) -> np.ndarray:
    """PRG(seed): the AES-256-CTR keystream of a 32-byte seed as uint32 [dim] (a new array)."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"PRG seeds are {KEY_BYTES} bytes, got {len(seed)}")
    return Keystream(dim).fill(seed).copy()


def client_secret_seed(seed: int, client: int) -> bytes:
    """32 bytes of simulation secret for ``client`` derived from the root ``seed``.

    Only for the ``reproducible`` mode: anyone who knows ``seed`` can recompute every key and mask.
    """
    return (
        seed_sequence(seed, "secagg", "client-secret", client)
        .generate_state(8, dtype=np.uint32)
        .tobytes()
    )


def check_bytes(data: object, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SecAggError(f"{what} must be bytes, got {type(data).__name__}")
    return bytes(data) if not isinstance(data, bytes) else data


def check_magic(magic: bytes, expected: bytes, what: str) -> None:
    if magic != expected:
        raise SecAggError(f"not a {what}: bad magic {magic!r} (expected {expected!r})")
