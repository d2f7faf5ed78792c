"""Primitives of pairwise-mask secure aggregation: key derivation, the PRG, commitments, signatures.

Pure functions of their inputs (no protocol state): HKDF-SHA256 with a domain label
(:func:`hkdf`), the AES-256-CTR keystream read as little-endian uint32 words
(:class:`Keystream`, :func:`prg_mask`), the pairwise mask seed agreed by X25519
(:func:`derive_pair_seed`), the share-encryption keys of a pair (:func:`share_key_pair`),
the SHA-256 commitment to a self-mask seed and Ed25519 verification that raises
:class:`SecAggError`. Fixed-point encoding lives in :mod:`gfmfr_secure.secagg.fixedpoint`,
Shamir sharing in :mod:`gfmfr_secure.secagg.shamir`.
"""

from __future__ import annotations

import hashlib
import struct

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
    "prg_mask",
    "share_key_pair",
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


def verify_signature(key: Ed25519PublicKey, signature: bytes, message: bytes, what: str) -> None:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise SecAggError(
            f"{what} failed signature verification: tampered, truncated or forged"
        ) from None


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
