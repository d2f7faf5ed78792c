"""Wire messages of pairwise-mask secure aggregation: frozen dataclasses with ``to_bytes`` / ``from_bytes``, and the transcript of a round's messages.

All integers little-endian. Parsing checks lengths and magic numbers and raises
:class:`~gfmfr_secure.secagg.masking.primitives.SecAggError` on anything malformed;
signatures are checked by the receiving role, which knows the sender's identity key.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gfmfr_secure.secagg.masking.primitives import KEY_BYTES, SIG_BYTES, SecAggError, check_bytes, check_magic, payload_digest
from gfmfr_secure.secagg.shamir import int_to_secret

__all__ = ["UPLOAD_HEADER", "EncryptedShare", "KeyAdvert", "MaskedUpload", "SecAggTranscript", "ShareReveal", "UnmaskRequest"]

_ADVERT = struct.Struct("<4sII32s32s")  # magic, round, client, c_u^PK, s_u^PK; + signature
_SHARE_HDR = struct.Struct("<4sIII")  # magic, round, sender, receiver; + AEAD ciphertext
_REQUEST_HDR = struct.Struct("<4sIIII")  # magic, round, recipient, n_survivors, n_dropped; + ids
_REVEAL_HDR = struct.Struct("<4sIIII")  # magic, round, sender, n_mask_key, n_self_mask; + entries
_REVEAL_ENTRY = struct.Struct("<I32s")  # owner, share y
UPLOAD_HEADER = struct.Struct("<4sIII")  # magic, round, client, dim; + commitment, payload, signature
_SHARE_PLAIN = 2 * KEY_BYTES
_SHARE_CIPHER = _SHARE_PLAIN + 16  # Poly1305 tag


@dataclass(frozen=True)
class KeyAdvert:
    """Round 0 message: a client's two signed X25519 public keys (140 bytes on the wire)."""

    round_id: int
    client: int
    enc_public: bytes
    mask_public: bytes
    signature: bytes

    MAGIC = b"SAK1"
    SIZE = _ADVERT.size + SIG_BYTES

    def signed_part(self) -> bytes:
        return _ADVERT.pack(
            self.MAGIC, self.round_id, self.client, self.enc_public, self.mask_public
        )

    def to_bytes(self) -> bytes:
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvert:
        data = check_bytes(data, "key advertisement")
        if len(data) != cls.SIZE:
            raise SecAggError(f"key advertisement has {len(data)} bytes, expected {cls.SIZE}")
        magic, round_id, client, enc_pk, mask_pk = _ADVERT.unpack_from(data)
        check_magic(magic, cls.MAGIC, "key advertisement")
        return cls(round_id, client, enc_pk, mask_pk, data[_ADVERT.size :])


@dataclass(frozen=True)
class EncryptedShare:
    """Round 1 message: u's shares for v, encrypted for v; the server only reads the header."""

    round_id: int
    sender: int
    receiver: int
    ciphertext: bytes

    MAGIC = b"SAS1"
    SIZE = _SHARE_HDR.size + _SHARE_CIPHER

    def header(self) -> bytes:
        return _SHARE_HDR.pack(self.MAGIC, self.round_id, self.sender, self.receiver)

    def to_bytes(self) -> bytes:
        return self.header() + self.ciphertext

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShare:
        data = check_bytes(data, "encrypted share")
        if len(data) != cls.SIZE:
            raise SecAggError(f"encrypted share has {len(data)} bytes, expected {cls.SIZE}")
        magic, round_id, sender, receiver = _SHARE_HDR.unpack_from(data)
        check_magic(magic, cls.MAGIC, "encrypted share")
        return cls(round_id, sender, receiver, data[_SHARE_HDR.size :])


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3 message server -> survivor: which of its neighbours survived and which dropped.

    ``survivors`` lists members of N[recipient] (the recipient included) whose upload arrived;
    ``dropped`` lists neighbours that shared keys but sent no upload.
    """

    round_id: int
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    MAGIC = b"SAQ1"

    def to_bytes(self) -> bytes:
        ids = struct.pack(
            f"<{len(self.survivors) + len(self.dropped)}I", *self.survivors, *self.dropped
        )
        return (
            _REQUEST_HDR.pack(
                self.MAGIC, self.round_id, self.recipient, len(self.survivors), len(self.dropped)
            )
            + ids
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        data = check_bytes(data, "unmask request")
        if len(data) < _REQUEST_HDR.size:
            raise SecAggError(f"unmask request has {len(data)} bytes, shorter than its header")
        magic, round_id, recipient, n_s, n_d = _REQUEST_HDR.unpack_from(data)
        check_magic(magic, cls.MAGIC, "unmask request")
        expected = _REQUEST_HDR.size + 4 * (n_s + n_d)
        if len(data) != expected:
            raise SecAggError(f"unmask request has {len(data)} bytes, expected {expected}")
        ids = struct.unpack_from(f"<{n_s + n_d}I", data, _REQUEST_HDR.size)
        return cls(round_id, recipient, tuple(ids[:n_s]), tuple(ids[n_s:]))


@dataclass(frozen=True)
class ShareReveal:
    """Round 3 message survivor -> server: shares of s^SK for dropped and of b for surviving clients.

    ``mask_key_shares`` and ``self_mask_shares`` are ``(owner, y)`` pairs; the share's
    x-coordinate is ``sender + 1``.
    """

    round_id: int
    sender: int
    mask_key_shares: tuple[tuple[int, int], ...]
    self_mask_shares: tuple[tuple[int, int], ...]
    signature: bytes

    MAGIC = b"SAR1"

    def signed_part(self) -> bytes:
        parts = [
            _REVEAL_HDR.pack(
                self.MAGIC,
                self.round_id,
                self.sender,
                len(self.mask_key_shares),
                len(self.self_mask_shares),
            )
        ]
        for owner, y in (*self.mask_key_shares, *self.self_mask_shares):
            parts.append(_REVEAL_ENTRY.pack(owner, int_to_secret(y)))
        return b"".join(parts)

    def to_bytes(self) -> bytes:
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareReveal:
        data = check_bytes(data, "share reveal")
        if len(data) < _REVEAL_HDR.size + SIG_BYTES:
            raise SecAggError(
                f"share reveal has {len(data)} bytes, shorter than header and signature"
            )
        magic, round_id, sender, n_mask, n_self = _REVEAL_HDR.unpack_from(data)
        check_magic(magic, cls.MAGIC, "share reveal")
        expected = _REVEAL_HDR.size + _REVEAL_ENTRY.size * (n_mask + n_self) + SIG_BYTES
        if len(data) != expected:
            raise SecAggError(
                f"share reveal from client {sender} has {len(data)} bytes, expected {expected}"
            )
        entries = [
            _REVEAL_ENTRY.unpack_from(data, _REVEAL_HDR.size + i * _REVEAL_ENTRY.size)
            for i in range(n_mask + n_self)
        ]
        pairs = tuple((owner, int.from_bytes(y, "little")) for owner, y in entries)
        return cls(round_id, sender, pairs[:n_mask], pairs[n_mask:], data[-SIG_BYTES:])


@dataclass(frozen=True)
class MaskedUpload:
    """Round 2 message: a parsed masked upload (``payload`` stays raw little-endian uint32 bytes).

    Wire layout: header (magic, round, client, dim: 16 bytes) | commitment to b_u (32) |
    payload (4 D) | Ed25519 signature (64) over header + commitment + BLAKE3(payload).
    """

    round_id: int
    client: int
    dim: int
    commitment: bytes
    payload: memoryview
    signature: bytes

    MAGIC = b"SAU1"
    OVERHEAD = UPLOAD_HEADER.size + KEY_BYTES + SIG_BYTES

    @staticmethod
    def signed_digest(header: bytes, commitment: bytes, payload: bytes | memoryview) -> bytes:
        return header + commitment + payload_digest(payload)

    @classmethod
    def from_bytes(cls, data: bytes, dim: int) -> MaskedUpload:
        """Parse an upload of a ``dim``-vector; any wrong length (truncation, wrong dtype) is rejected."""
        data = check_bytes(data, "masked upload")
        expected = cls.OVERHEAD + 4 * dim
        if len(data) != expected:
            raise SecAggError(
                f"masked upload has {len(data)} bytes, expected {expected} (dim={dim} uint32 words "
                f"+ {cls.OVERHEAD} bytes of header, commitment and signature): truncated or wrong "
                f"length/dtype"
            )
        magic, round_id, client, declared = UPLOAD_HEADER.unpack_from(data)
        check_magic(magic, cls.MAGIC, "masked upload")
        if declared != dim:
            raise SecAggError(
                f"masked upload from client {client} declares dim={declared}, expected {dim}"
            )
        start = UPLOAD_HEADER.size + KEY_BYTES
        view = memoryview(data)
        return cls(
            round_id,
            client,
            dim,
            data[UPLOAD_HEADER.size : start],
            view[start : start + 4 * dim],
            data[-SIG_BYTES:],
        )


@dataclass(frozen=True)
class SecAggTranscript:
    """Every message the server received in one secure-aggregation round, as bytes.

    Attributes
    ----------
    adverts : the signed key advertisements.
    shares : the encrypted share messages (the server reads only their headers).
    uploads : the signed masked uploads it accepted.
    reveals : the signed share reveals answering its unmask requests.
    """

    adverts: tuple[bytes, ...]
    shares: tuple[bytes, ...]
    uploads: tuple[bytes, ...]
    reveals: tuple[bytes, ...]
