"""Pairwise-mask secure aggregation (Bonawitz et al., CCS 2017), with SecAgg+ neighbourhoods.

The server learns the sum of the surviving clients' vectors and nothing else
about any individual vector, even when clients drop out mid-round.

Protocol (one aggregation round, ``n`` clients, vectors of length ``D``)
----------------------------------------------------------------------
Every client ``u`` holds a long-term Ed25519 identity key whose public half
is known to everybody (a PKI); all messages a client sends to the server are
signed with it.

0. **AdvertiseKeys.** ``u`` creates two X25519 key pairs for this round: an
   *encryption* pair ``(c_u^SK, c_u^PK)`` and a *mask* pair ``(s_u^SK, s_u^PK)``,
   and sends the signed public keys. The server forwards them to ``u``'s
   neighbours (everybody in the complete graph).
1. **ShareKeys.** ``u`` draws a self-mask seed ``b_u`` and Shamir-shares both
   ``b_u`` and ``s_u^SK`` with threshold ``t`` among its *closed*
   neighbourhood ``N[u] = N(u) + {u}`` (it keeps its own share). Each share
   pair for ``v`` is encrypted with ChaCha20-Poly1305 under
   ``HKDF(X25519(c_u^SK, c_v^PK))``, so the server routes ciphertexts it
   cannot read. ``U2`` is the set of clients that sent shares.
2. **MaskedInputCollection.** ``u`` encodes its vector into Z_{2^32}
   (:mod:`gfmfr_secure.secagg.fixedpoint`) and uploads::

       y_u = x_u + PRG(b_u) + sum_{v in N(u), v > u} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv)

   (mod 2^32, ``v`` over the neighbours in ``U2``), where
   ``s_uv = HKDF-SHA256(X25519(s_u^SK, s_v^PK))`` is the same for both
   endpoints and ``PRG`` is the AES-256-CTR keystream (zero initial counter:
   every key is used once) read as ``D`` little-endian uint32 words, as in
   Bonawitz et al.'s implementation (AES runs in hardware on x86-64 and ARMv8,
   about 1.7x the speed of ChaCha20 there). The upload is bytes:
   a header, a SHA-256 commitment to ``b_u``, the ``4 D`` payload bytes and
   an Ed25519 signature over header, commitment and SHA-256 of the payload;
   a tampered, truncated or mis-sized upload is rejected. ``U3`` is the set of
   clients whose upload arrived.
3. **Unmasking.** The server tells each survivor ``v`` which of its
   neighbours survived (``U3``) and which dropped (``U2 - U3``). ``v``
   reveals its share of ``b_u`` for survivors and of ``s_u^SK`` for dropped
   clients, and refuses ever to reveal both kinds for the same client. The
   server reconstructs each ``s_u^SK`` of a dropped client (checked against
   the advertised ``s_u^PK``), recomputes and removes the pairwise masks
   between it and its surviving neighbours, reconstructs each survivor's
   ``b_u`` (checked against its commitment) and removes ``PRG(b_u)``. The
   remaining pairwise masks between survivors cancel in the sum. Last, the
   server checks that every coordinate of the unmasked sum is one that
   ``|U3|`` uploads bounded by the value bound can produce
   (:func:`gfmfr_secure.secagg.fixedpoint.out_of_range`); a sum that is not
   is rejected with :class:`SecAggError` and nothing is released.

If fewer than ``t`` shares of a needed secret can be obtained, the round fails
with :class:`SecAggError` naming the secret, the shares available and ``t``;
the server checks this *before* asking anyone to reveal anything.

Threat model. Secure against an honest-but-curious server colluding with
fewer than ``t`` clients of any closed neighbourhood: a masked upload is
uniform on Z_{2^32}^D, and ``b_u`` (resp. ``s_u^SK``) of a survivor (resp. a
client declared dropped) stays hidden. Uploads, key advertisements and
revealed shares are authenticated, so a network attacker cannot alter them.
The "never both kinds" rule means a server that lies about who dropped
cannot collect ``t`` shares of *both* secrets of a client when
``t > |N[u]| / 2``: the two kinds would have to come from disjoint sets of
honest holders, each of size ``t``. Every party enforces that strict majority
(:meth:`SecAggConfig.check_graph`), so an honest client refuses to take part in
a round with a smaller threshold. With ``c`` of the holders colluding with the
server (each of them hands over both kinds), the bound becomes
``2 t > |N[u]| + c``. The consistency-check round of the fully malicious
variant is not implemented, and a malicious server can always make a round
fail.

Malicious clients. A masked upload is uniform on the ring, so nobody can
range-check one client's vector without zero-knowledge proofs (not
implemented). Each honest client checks its own values before encoding; the
server checks the unmasked sum (above). Together with the headroom of the
encoding (:data:`gfmfr_secure.secagg.fixedpoint.HEADROOM_BITS`) this rejects a
round carrying a value outside ``[-B, B]`` or garbage words unless the
attacker chose them to land in range; a client that knows the encoding can
still set each coordinate of the sum to any value in ``[-|U3| B, |U3| B]``.

SecAgg+ neighbourhoods (``neighbours=k``)
-----------------------------------------
With ``k=None`` every pair of clients shares a mask (the original protocol):
per-client work and traffic grow with ``n`` (``n - 1`` key agreements, share
ciphertexts and ``D``-word PRG expansions), and the server's unmasking costs
``O(n_dropped * n * D)``. With an even ``k`` the clients form a random Harary
graph: a ring on which each client is joined to its ``k / 2`` nearest
positions on either side, the clients placed on the ring by a permutation
derived from the seed (Bell et al., CCS 2020). Then:

* costs are ``O(k)`` per client and ``O(n D + n_dropped k D)`` at the server,
  so ``k ~ 2 ceil(log2 n)`` makes large ``n`` affordable;
* ``t`` counts within the closed neighbourhood (``1 <= t <= k + 1``);
  privacy of ``x_u`` now relies on fewer than ``t`` of the ``k + 1`` clients
  in ``N[u]`` colluding with the server (not fewer than ``t`` of ``n``);
  a random graph with ``k = O(log n)`` keeps that likely for a bounded
  fraction of corrupt clients, but the guarantee is statistical, and the
  graph must not be chosen by the adversary (here it is derived from the
  seed; in deployment from public randomness fixed before the round);
* dropout tolerance is local: every survivor needs ``t`` surviving members
  of ``N[u]``, and every dropped client with a surviving neighbour needs
  ``t`` surviving neighbours. A neighbourhood losing more than ``k + 1 - t``
  members makes the whole round fail even when few clients dropped overall;
* if the survivors' graph falls apart into several connected components,
  the server learns the partial sum of each component rather than only the
  total (masks only cancel within a component). For ``k = O(log n)`` and
  moderate dropout this is unlikely, but it is a weaker guarantee than the
  complete graph, where only the total is ever revealed.

Costs
-----
Per client uploaded bytes are ``4 D + 112`` (masked vector) plus
``140`` (keys) ``+ 96 |N(u)|`` (share ciphertexts) ``+ 84 + 36 |N[u]|``
(revealed shares); downloaded bytes are ``236 |N(u)| + 20 + 4 |N[u]|``.
For ``D`` in the hundreds of thousands this is within a fraction of a
percent of the ``4 D`` bytes of a plain float32 upload.

Randomness
----------
Each client derives all its secrets (identity key, round keys, ``b_u``, Shamir
coefficients) from one 32-byte ``secret_seed`` with HKDF and AES-256-CTR. The
simulation driver :func:`secure_sum` gives each client
``secrets.token_bytes(32)`` from the operating system's CSPRNG by default
(``secrets="os"``). With ``secrets="reproducible"`` it derives them from its
integer ``seed`` instead (:func:`client_secret_seed`: identical uploads for
identical seeds), a simulation mode for tests and exact replays in which anyone
who knows the seed can strip every mask. The ``seed`` also places clients on
the SecAgg+ ring; that graph is public by design.
"""

from __future__ import annotations

import hashlib
import secrets as _os_secrets
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gfmfr_secure.errors import GfmfrError
from gfmfr_secure.rng import SECRET_MODES, numpy_rng, seed_sequence
from gfmfr_secure.secagg.fixedpoint import (
    centre,
    check_values,
    choose_frac_bits,
    decode_sum,
    encode,
    out_of_range,
)
from gfmfr_secure.secagg.shamir import (
    PRIME,
    Share,
    int_to_secret,
    randomness_bytes_needed,
    reconstruct_secret,
    split_secret,
)

__all__ = [
    "EncryptedShare",
    "KeyAdvert",
    "MaskedUpload",
    "NeighbourGraph",
    "SecAggClient",
    "SecAggConfig",
    "SecAggCosts",
    "SecAggError",
    "SecAggServer",
    "SecureSumResult",
    "ShareReveal",
    "UnmaskRequest",
    "client_secret_seed",
    "neighbourhood_graph",
    "prg_mask",
    "secure_sum",
]


class SecAggError(GfmfrError, ValueError):
    """The protocol cannot proceed: a rejected message, a refused request or too few shares."""


# ---------------------------------------------------------------------------------------------
# Neighbourhood graph
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeighbourGraph:
    """Who shares masks and secrets with whom; public to every party.

    Attributes
    ----------
    n_clients : n.
    degree : k for a SecAgg+ graph, None for the complete graph.
    neighbours : n sorted tuples, ``neighbours[u]`` = the open neighbourhood N(u) (u excluded).
    order : the n clients in ring order (0..n-1 for the complete graph); processing clients in
        this order keeps only about k partially masked vectors alive in :func:`secure_sum`.
    """

    n_clients: int
    degree: int | None
    neighbours: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]

    @property
    def neighbourhood_size(self) -> int:
        """|N[u]|, the closed neighbourhood size every threshold is relative to: k + 1 or n."""
        return self.n_clients if self.degree is None else self.degree + 1

    def closed(self, u: int) -> tuple[int, ...]:
        """N[u] = N(u) + {u}, sorted."""
        return tuple(sorted((*self.neighbours[u], u)))


def neighbourhood_graph(n_clients: int, neighbours: int | None, seed: int) -> NeighbourGraph:
    """The complete graph (``neighbours=None``) or a random k-regular Harary graph.

    The Harary graph H(k, n) places positions 0..n-1 on a ring and joins each to the k/2 nearest
    positions on either side; a permutation drawn from ``seed`` assigns clients to positions.
    ``k >= n - 1`` gives the complete graph.

    Parameters
    ----------
    n_clients : n >= 2.
    neighbours : k, an even integer >= 2, or None.
    seed : root seed; the same seed gives the same graph.
    """
    if isinstance(n_clients, bool) or int(n_clients) != n_clients or n_clients < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {n_clients!r}")
    n = int(n_clients)
    if neighbours is not None:
        if isinstance(neighbours, bool) or int(neighbours) != neighbours or neighbours < 2:
            raise ValueError(f"neighbours must be an even integer >= 2 or None, got {neighbours!r}")
        if neighbours % 2:
            raise ValueError(f"neighbours must be even (Harary graph H(k, n)), got {neighbours}")
    if neighbours is None or neighbours >= n - 1:
        everyone = tuple(range(n))
        nbrs = tuple(everyone[:u] + everyone[u + 1 :] for u in range(n))
        return NeighbourGraph(n, None, nbrs, everyone)
    k = int(neighbours)
    perm = numpy_rng(seed, "secagg", "graph").permutation(n)
    offsets = np.concatenate([np.arange(1, k // 2 + 1), -np.arange(1, k // 2 + 1)])
    ring = perm[(np.arange(n)[:, None] + offsets[None, :]) % n]  # [n, k] clients next to position p
    table: list[tuple[int, ...]] = [()] * n
    for pos in range(n):
        table[int(perm[pos])] = tuple(sorted(int(v) for v in ring[pos]))
    return NeighbourGraph(n, k, tuple(table), tuple(int(u) for u in perm))


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one aggregation round.

    Attributes
    ----------
    n_clients : n >= 2.
    dim : D >= 1, the vector length.
    threshold : t, shares needed to reconstruct a secret (relative to the closed neighbourhood).
    value_bound : B, the largest |x| a client may encode.
    frac_bits : f, fixed-point fractional bits (see :func:`SecAggConfig.create`).
    round_id : separates the keys and messages of different rounds (0 <= round_id < 2^32).
    """

    n_clients: int
    dim: int
    threshold: int
    value_bound: float
    frac_bits: int
    round_id: int = 0

    def __post_init__(self) -> None:
        if self.n_clients < 2:
            raise ValueError(f"n_clients must be >= 2, got {self.n_clients}")
        if not 1 <= self.dim < 1 << 32:
            raise ValueError(f"dim must be in [1, 2^32), got {self.dim}")
        if self.threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {self.threshold}")
        if self.frac_bits < 0:
            raise ValueError(f"frac_bits must be >= 0, got {self.frac_bits}")
        if not 0 <= self.round_id < 1 << 32:
            raise ValueError(f"round_id must be in [0, 2^32), got {self.round_id}")
        if choose_frac_bits(self.value_bound, self.n_clients) < self.frac_bits:
            raise ValueError(
                f"frac_bits={self.frac_bits} lets a sum of {self.n_clients} values bounded by "
                f"{self.value_bound} overflow the 32-bit ring"
            )

    @classmethod
    def create(
        cls, n_clients: int, dim: int, *, threshold: int, value_bound: float, round_id: int = 0
    ) -> SecAggConfig:
        """Config with the largest overflow-free ``frac_bits`` for n summands bounded by B."""
        frac_bits = choose_frac_bits(value_bound, n_clients)
        return cls(
            int(n_clients), int(dim), int(threshold), float(value_bound), frac_bits, int(round_id)
        )

    def check_graph(self, graph: NeighbourGraph) -> None:
        """Raise ValueError unless ``graph`` has n clients and ``|N[u]| / 2 < t <= |N[u]|``.

        The strict majority is what stops a server that lies about dropouts from collecting
        ``t`` shares of both secrets of one client (see the module docstring).
        """
        if graph.n_clients != self.n_clients:
            raise ValueError(f"graph has {graph.n_clients} clients, config has {self.n_clients}")
        kind = "complete graph" if graph.degree is None else f"k={graph.degree} neighbourhoods"
        if self.threshold > graph.neighbourhood_size:
            raise ValueError(
                f"threshold {self.threshold} exceeds the closed neighbourhood size "
                f"{graph.neighbourhood_size} ({kind})"
            )
        if 2 * self.threshold <= graph.neighbourhood_size:
            raise ValueError(
                f"threshold {self.threshold} is not a strict majority of the closed neighbourhood "
                f"size {graph.neighbourhood_size} ({kind}): a server lying about dropouts could "
                f"collect both secrets of a client; use t >= {graph.neighbourhood_size // 2 + 1}"
            )


# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------

_LABEL = b"gfmfr-secagg/v1/"
_ZERO_IV = bytes(16)  # AES-256-CTR initial counter block; every key is used once
_ZERO_NONCE12 = bytes(12)  # ChaCha20-Poly1305; every key encrypts one message
_KEY_BYTES = 32
_SIG_BYTES = 64


def _hkdf(ikm: bytes, label: str, *numbers: int, length: int = _KEY_BYTES) -> bytes:
    """``length`` (32) bytes from HKDF-SHA256 with info = label and the given 32-bit numbers."""
    info = _LABEL + label.encode("ascii") + struct.pack(f"<{len(numbers)}I", *numbers)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def _keystream_bytes(key: bytes, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of the AES-256-CTR keystream of ``key`` (zero initial counter)."""
    return Cipher(algorithms.AES256(key), modes.CTR(_ZERO_IV)).encryptor().update(bytes(n_bytes))


def _clamp_x25519(raw: bytes) -> bytes:
    """RFC 7748 clamping, applied up front so the shared bytes are the key actually used (< 2^255)."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return bytes(b)


def _pair_seed(
    own: X25519PrivateKey, peer: X25519PublicKey, round_id: int, u: int, v: int
) -> bytes:
    """s_uv: the 32-byte pairwise mask seed; symmetric in (u, v)."""
    return _hkdf(own.exchange(peer), "pair-mask", round_id, min(u, v), max(u, v))


def _share_keys(shared: bytes, round_id: int, own: int, peer: int) -> tuple[bytes, bytes]:
    """Keys of the shares ``own -> peer`` and ``peer -> own`` from X25519(c_u^SK, c_v^PK).

    One 64-byte HKDF output per pair: the first half keys the direction from the lower id
    to the higher, the second half the other direction.
    """
    lo, hi = min(own, peer), max(own, peer)
    okm = _hkdf(shared, "share-encryption", round_id, lo, hi, length=2 * _KEY_BYTES)
    up, down = okm[:_KEY_BYTES], okm[_KEY_BYTES:]
    return (up, down) if own == lo else (down, up)


def _commitment(self_seed: bytes, round_id: int, client: int) -> bytes:
    """SHA-256 commitment to b_u (hiding: b_u has 255 random bits)."""
    return hashlib.sha256(
        _LABEL + b"self-mask" + struct.pack("<II", round_id, client) + self_seed
    ).digest()


def _verify(key: Ed25519PublicKey, signature: bytes, message: bytes, what: str) -> None:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise SecAggError(
            f"{what} failed signature verification: tampered, truncated or forged"
        ) from None


class _Keystream:
    """A reusable buffer holding the PRG output for one vector length.

    ``fill(key)`` overwrites the buffer with ``PRG(key)`` and returns it as uint32 [D]; the
    returned view is only valid until the next call.
    """

    def __init__(self, dim: int) -> None:
        self._zeros = bytes(4 * dim)
        self._buf = bytearray(4 * dim)
        self._view = np.frombuffer(self._buf, dtype="<u4")

    def fill(self, key: bytes) -> np.ndarray:
        encryptor = Cipher(algorithms.AES256(key), modes.CTR(_ZERO_IV)).encryptor()
        encryptor.update_into(self._zeros, self._buf)
        return self._view


def prg_mask(seed: bytes, dim: int) -> np.ndarray:
    """PRG(seed): the AES-256-CTR keystream of a 32-byte seed as uint32 [dim] (a new array)."""
    if len(seed) != _KEY_BYTES:
        raise ValueError(f"PRG seeds are {_KEY_BYTES} bytes, got {len(seed)}")
    return _Keystream(dim).fill(seed).copy()


def client_secret_seed(seed: int, client: int) -> bytes:
    """32 bytes of simulation secret for ``client`` derived from the root ``seed``.

    Only for the ``reproducible`` mode: anyone who knows ``seed`` can recompute every key and mask.
    """
    return (
        seed_sequence(seed, "secagg", "client-secret", client)
        .generate_state(8, dtype=np.uint32)
        .tobytes()
    )


def _check_bytes(data: object, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SecAggError(f"{what} must be bytes, got {type(data).__name__}")
    return bytes(data) if not isinstance(data, bytes) else data


def _check_magic(magic: bytes, expected: bytes, what: str) -> None:
    if magic != expected:
        raise SecAggError(f"not a {what}: bad magic {magic!r} (expected {expected!r})")


# ---------------------------------------------------------------------------------------------
# Messages (all little-endian)
# ---------------------------------------------------------------------------------------------

_ADVERT = struct.Struct("<4sII32s32s")  # magic, round, client, c_u^PK, s_u^PK; + signature
_SHARE_HDR = struct.Struct("<4sIII")  # magic, round, sender, receiver; + AEAD ciphertext
_REQUEST_HDR = struct.Struct("<4sIIII")  # magic, round, recipient, n_survivors, n_dropped; + ids
_REVEAL_HDR = struct.Struct("<4sIIII")  # magic, round, sender, n_mask_key, n_self_mask; + entries
_REVEAL_ENTRY = struct.Struct("<I32s")  # owner, share y
_UPLOAD_HDR = struct.Struct("<4sIII")  # magic, round, client, dim; + commitment, payload, signature
_SHARE_PLAIN = 2 * _KEY_BYTES
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
    SIZE = _ADVERT.size + _SIG_BYTES

    def signed_part(self) -> bytes:
        return _ADVERT.pack(
            self.MAGIC, self.round_id, self.client, self.enc_public, self.mask_public
        )

    def to_bytes(self) -> bytes:
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvert:
        data = _check_bytes(data, "key advertisement")
        if len(data) != cls.SIZE:
            raise SecAggError(f"key advertisement has {len(data)} bytes, expected {cls.SIZE}")
        magic, round_id, client, enc_pk, mask_pk = _ADVERT.unpack_from(data)
        _check_magic(magic, cls.MAGIC, "key advertisement")
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
        data = _check_bytes(data, "encrypted share")
        if len(data) != cls.SIZE:
            raise SecAggError(f"encrypted share has {len(data)} bytes, expected {cls.SIZE}")
        magic, round_id, sender, receiver = _SHARE_HDR.unpack_from(data)
        _check_magic(magic, cls.MAGIC, "encrypted share")
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
        data = _check_bytes(data, "unmask request")
        if len(data) < _REQUEST_HDR.size:
            raise SecAggError(f"unmask request has {len(data)} bytes, shorter than its header")
        magic, round_id, recipient, n_s, n_d = _REQUEST_HDR.unpack_from(data)
        _check_magic(magic, cls.MAGIC, "unmask request")
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
        data = _check_bytes(data, "share reveal")
        if len(data) < _REVEAL_HDR.size + _SIG_BYTES:
            raise SecAggError(
                f"share reveal has {len(data)} bytes, shorter than header and signature"
            )
        magic, round_id, sender, n_mask, n_self = _REVEAL_HDR.unpack_from(data)
        _check_magic(magic, cls.MAGIC, "share reveal")
        expected = _REVEAL_HDR.size + _REVEAL_ENTRY.size * (n_mask + n_self) + _SIG_BYTES
        if len(data) != expected:
            raise SecAggError(
                f"share reveal from client {sender} has {len(data)} bytes, expected {expected}"
            )
        entries = [
            _REVEAL_ENTRY.unpack_from(data, _REVEAL_HDR.size + i * _REVEAL_ENTRY.size)
            for i in range(n_mask + n_self)
        ]
        pairs = tuple((owner, int.from_bytes(y, "little")) for owner, y in entries)
        return cls(round_id, sender, pairs[:n_mask], pairs[n_mask:], data[-_SIG_BYTES:])


@dataclass(frozen=True)
class MaskedUpload:
    """Round 2 message: a parsed masked upload (``payload`` stays raw little-endian uint32 bytes).

    Wire layout: header (magic, round, client, dim: 16 bytes) | commitment to b_u (32) |
    payload (4 D) | Ed25519 signature (64) over header + commitment + SHA-256(payload).
    """

    round_id: int
    client: int
    dim: int
    commitment: bytes
    payload: memoryview
    signature: bytes

    MAGIC = b"SAU1"
    OVERHEAD = _UPLOAD_HDR.size + _KEY_BYTES + _SIG_BYTES

    @staticmethod
    def signed_digest(header: bytes, commitment: bytes, payload: bytes | memoryview) -> bytes:
        return header + commitment + hashlib.sha256(payload).digest()

    @classmethod
    def from_bytes(cls, data: bytes, dim: int) -> MaskedUpload:
        """Parse an upload of a ``dim``-vector; any wrong length (truncation, wrong dtype) is rejected."""
        data = _check_bytes(data, "masked upload")
        expected = cls.OVERHEAD + 4 * dim
        if len(data) != expected:
            raise SecAggError(
                f"masked upload has {len(data)} bytes, expected {expected} (dim={dim} uint32 words "
                f"+ {cls.OVERHEAD} bytes of header, commitment and signature): truncated or wrong "
                f"length/dtype"
            )
        magic, round_id, client, declared = _UPLOAD_HDR.unpack_from(data)
        _check_magic(magic, cls.MAGIC, "masked upload")
        if declared != dim:
            raise SecAggError(
                f"masked upload from client {client} declares dim={declared}, expected {dim}"
            )
        start = _UPLOAD_HDR.size + _KEY_BYTES
        view = memoryview(data)
        return cls(
            round_id,
            client,
            dim,
            data[_UPLOAD_HDR.size : start],
            view[start : start + 4 * dim],
            data[-_SIG_BYTES:],
        )


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------


class SecAggClient:
    """One client: holds its own secrets only and speaks to the server in bytes.

    Call order per round: :meth:`advertise_keys`, :meth:`share_keys`, :meth:`receive_shares`,
    :meth:`masked_upload`, :meth:`reveal_shares`.

    Parameters
    ----------
    client_id : u in [0, n).
    config : the round's public parameters.
    graph : the public neighbourhood graph.
    secret_seed : 32 secret random bytes; every key, seed and Shamir coefficient is derived from it.
    """

    def __init__(
        self, client_id: int, config: SecAggConfig, graph: NeighbourGraph, secret_seed: bytes
    ) -> None:
        config.check_graph(graph)
        if not 0 <= client_id < config.n_clients:
            raise ValueError(f"client_id {client_id} is outside [0, {config.n_clients})")
        if len(secret_seed) != _KEY_BYTES:
            raise ValueError(f"secret_seed must be {_KEY_BYTES} bytes, got {len(secret_seed)}")
        self._id = int(client_id)
        self._config = config
        self._neighbours = frozenset(graph.neighbours[client_id])
        self._seed = bytes(secret_seed)
        self._identity = Ed25519PrivateKey.from_private_bytes(_hkdf(self._seed, "identity"))
        self._enc_key: X25519PrivateKey | None = None
        self._mask_key_bytes = b""
        self._mask_key: X25519PrivateKey | None = None
        self._self_seed = b""
        self._peer_enc: dict[int, X25519PublicKey] = {}  # verified neighbours (U1 within N(u))
        self._peer_mask: dict[int, X25519PublicKey] = {}
        # share keys (to, from) each neighbour, from X25519(c_u^SK, c_v^PK); computed once per neighbour
        self._enc_shared: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[int, int]] = {}  # owner -> (y of s_owner^SK, y of b_owner)
        self._revealed: dict[int, str] = {}  # owner -> "mask key" | "self mask"
        self._uploaded = False

    @property
    def client_id(self) -> int:
        return self._id

    @property
    def identity_public_key(self) -> bytes:
        """Raw Ed25519 public key (32 bytes), registered in the PKI."""
        return self._identity.public_key().public_bytes_raw()

    def _round(self) -> int:
        return self._config.round_id

    def advertise_keys(self) -> bytes:
        """Round 0: make this round's key pairs and b_u; return the signed :class:`KeyAdvert` bytes."""
        if self._enc_key is not None:
            raise SecAggError(
                f"client {self._id} already advertised keys for round {self._round()}"
            )
        r = self._round()
        self._enc_key = X25519PrivateKey.from_private_bytes(
            _hkdf(self._seed, "share-encryption-key", r)
        )
        self._mask_key_bytes = _clamp_x25519(_hkdf(self._seed, "mask-key", r))
        self._mask_key = X25519PrivateKey.from_private_bytes(self._mask_key_bytes)
        seed_b = bytearray(_hkdf(self._seed, "self-mask-seed", r))
        seed_b[31] &= 127  # below 2^255 < p, so it is one field element
        self._self_seed = bytes(seed_b)
        unsigned = KeyAdvert(
            r,
            self._id,
            self._enc_key.public_key().public_bytes_raw(),
            self._mask_key.public_key().public_bytes_raw(),
            b"",
        )
        return KeyAdvert(
            r,
            self._id,
            unsigned.enc_public,
            unsigned.mask_public,
            self._identity.sign(unsigned.signed_part()),
        ).to_bytes()

    def share_keys(
        self, adverts: Iterable[bytes], identity_keys: Mapping[int, bytes]
    ) -> list[bytes]:
        """Round 1: verify the neighbours' keys, Shamir-share s_u^SK and b_u, encrypt per neighbour.

        Parameters
        ----------
        adverts : the :class:`KeyAdvert` bytes of the neighbours, as forwarded by the server.
        identity_keys : the PKI: client id -> raw Ed25519 public key.

        Returns
        -------
        list[bytes]
            One :class:`EncryptedShare` per verified neighbour, for the server to route.
        """
        if self._enc_key is None or self._mask_key is None:
            raise SecAggError(f"client {self._id}: advertise_keys must run before share_keys")
        if self._peer_enc:
            raise SecAggError(f"client {self._id} already shared its keys")
        r = self._round()
        for raw in adverts:
            advert = KeyAdvert.from_bytes(raw)
            v = advert.client
            if v not in self._neighbours:
                raise SecAggError(
                    f"client {self._id} got keys of client {v}, which is not its neighbour"
                )
            if advert.round_id != r:
                raise SecAggError(f"keys of client {v} are for round {advert.round_id}, not {r}")
            if v in self._peer_enc:
                raise SecAggError(f"client {self._id} got two key advertisements from client {v}")
            if v not in identity_keys:
                raise SecAggError(f"client {v} has no identity key in the PKI")
            _verify(
                Ed25519PublicKey.from_public_bytes(identity_keys[v]),
                advert.signature,
                advert.signed_part(),
                f"key advertisement of client {v}",
            )
            self._peer_enc[v] = X25519PublicKey.from_public_bytes(advert.enc_public)
            self._peer_mask[v] = X25519PublicKey.from_public_bytes(advert.mask_public)
        holders = sorted((*self._peer_enc, self._id))
        t = self._config.threshold
        if len(holders) < t:
            raise SecAggError(
                f"client {self._id}: only {len(holders)} members of its neighbourhood (itself included) "
                f"advertised keys, threshold {t} required; aborting"
            )
        xs = [h + 1 for h in holders]
        need = randomness_bytes_needed(t)
        mask_shares = split_secret(
            int.from_bytes(self._mask_key_bytes, "little"),
            t,
            xs,
            _keystream_bytes(_hkdf(self._seed, "shamir-mask-key", r), need),
        )
        self_shares = split_secret(
            int.from_bytes(self._self_seed, "little"),
            t,
            xs,
            _keystream_bytes(_hkdf(self._seed, "shamir-self-mask", r), need),
        )
        out = []
        for holder, s_share, b_share in zip(holders, mask_shares, self_shares):
            if holder == self._id:
                self._held[self._id] = (s_share.y, b_share.y)
                continue
            header = EncryptedShare(r, self._id, holder, b"")
            key = self._share_keys(holder)[0]
            plain = int_to_secret(s_share.y) + int_to_secret(b_share.y)
            ciphertext = ChaCha20Poly1305(key).encrypt(_ZERO_NONCE12, plain, header.header())
            out.append(EncryptedShare(r, self._id, holder, ciphertext).to_bytes())
        return out

    def _share_keys(self, peer: int) -> tuple[bytes, bytes]:
        """Keys of the share ciphertexts to and from ``peer``, from X25519(c_u^SK, c_peer^PK); computed once."""
        keys = self._enc_shared.get(peer)
        if keys is None:
            if self._enc_key is None:
                raise SecAggError(f"client {self._id}: advertise_keys must run first")
            shared = self._enc_key.exchange(self._peer_enc[peer])
            keys = self._enc_shared[peer] = _share_keys(shared, self._round(), self._id, peer)
        return keys

    def receive_shares(self, messages: Iterable[bytes]) -> None:
        """Round 1 (end): decrypt and keep the shares the neighbours sent to this client."""
        if self._enc_key is None or self._id not in self._held:
            raise SecAggError(f"client {self._id}: share_keys must run before receive_shares")
        r = self._round()
        for raw in messages:
            msg = EncryptedShare.from_bytes(raw)
            u = msg.sender
            if msg.receiver != self._id or msg.round_id != r:
                raise SecAggError(
                    f"client {self._id} got a share meant for client {msg.receiver} in round {msg.round_id}"
                )
            if u not in self._peer_enc:
                raise SecAggError(
                    f"client {self._id} got shares from client {u}, whose keys it never verified"
                )
            if u in self._held:
                raise SecAggError(f"client {self._id} got two share messages from client {u}")
            key = self._share_keys(u)[1]
            try:
                plain = ChaCha20Poly1305(key).decrypt(_ZERO_NONCE12, msg.ciphertext, msg.header())
            except InvalidTag:
                raise SecAggError(
                    f"shares from client {u} to client {self._id} failed authentication"
                ) from None
            s_y = int.from_bytes(plain[:_KEY_BYTES], "little")
            b_y = int.from_bytes(plain[_KEY_BYTES:], "little")
            if s_y >= PRIME or b_y >= PRIME:
                raise SecAggError(f"shares from client {u} are not field elements")
            self._held[u] = (s_y, b_y)

    def pair_seed(self, other: int) -> bytes:
        """s_uv with neighbour ``other`` (from this client's own s_u^SK and other's s_v^PK).

        Exposed so a simulation can expand each pair's mask once for both endpoints.
        """
        if self._mask_key is None:
            raise SecAggError(f"client {self._id}: advertise_keys must run first")
        if other == self._id or other not in self._held:
            raise SecAggError(f"client {self._id} shares no pairwise mask with client {other}")
        return _pair_seed(self._mask_key, self._peer_mask[other], self._round(), self._id, other)

    def mask_partners(self) -> tuple[int, ...]:
        """The neighbours this client shares pairwise masks with (those whose shares it holds)."""
        return tuple(sorted(v for v in self._held if v != self._id))

    def masked_upload(self, x: np.ndarray, *, pair_mask_total: np.ndarray | None = None) -> bytes:
        """Round 2: encode, mask, sign; return the upload bytes (see :class:`MaskedUpload`).

        Parameters
        ----------
        x : float32 [D], every value within ``[-value_bound, value_bound]``.
        pair_mask_total : uint32 [D] or None. None: the client expands its pairwise masks itself.
            Otherwise the precomputed ``sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)`` over
            :meth:`mask_partners` (a simulation shortcut; the client trusts it).

        Returns
        -------
        bytes
            ``4 D + 112`` bytes.
        """
        cfg = self._config
        if self._uploaded:
            raise SecAggError(f"client {self._id} already uploaded in round {cfg.round_id}")
        if not self._held:
            raise SecAggError(f"client {self._id}: the key-sharing round must complete first")
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (cfg.dim,):
            got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(
                f"client {self._id}: input must be a float32 array of shape ({cfg.dim},), got {got}"
            )
        y = encode(x, frac_bits=cfg.frac_bits, value_bound=cfg.value_bound, client=self._id)
        keystream = _Keystream(cfg.dim)
        if pair_mask_total is None:
            for v in self.mask_partners():
                mask = keystream.fill(self.pair_seed(v))
                if v > self._id:
                    np.add(y, mask, out=y)
                else:
                    np.subtract(y, mask, out=y)
        else:
            if pair_mask_total.dtype != np.uint32 or pair_mask_total.shape != (cfg.dim,):
                raise ValueError(
                    f"pair_mask_total must be uint32 [{cfg.dim}], got {pair_mask_total.dtype} "
                    f"{pair_mask_total.shape}"
                )
            np.add(y, pair_mask_total, out=y)
        np.add(y, keystream.fill(self._self_seed), out=y)
        payload = memoryview(y.astype("<u4", copy=False)).cast("B")
        header = _UPLOAD_HDR.pack(MaskedUpload.MAGIC, cfg.round_id, self._id, cfg.dim)
        commitment = _commitment(self._self_seed, cfg.round_id, self._id)
        signature = self._identity.sign(MaskedUpload.signed_digest(header, commitment, payload))
        self._uploaded = True
        return b"".join((header, commitment, payload, signature))

    def reveal_shares(self, request: bytes) -> bytes:
        """Round 3: answer an :class:`UnmaskRequest` with a signed :class:`ShareReveal`.

        Reveals the share of b_v for each listed survivor and of s_v^SK for each listed dropped
        client. Refuses (SecAggError) to reveal both kinds for one client, ever; to act when the
        lists overlap or name clients whose shares it does not hold; when it did not upload
        itself; and when fewer than ``t`` survivors are listed.
        """
        cfg = self._config
        req = UnmaskRequest.from_bytes(request)
        if req.recipient != self._id or req.round_id != cfg.round_id:
            raise SecAggError(f"client {self._id} got an unmask request for client {req.recipient}")
        if not self._uploaded:
            raise SecAggError(f"client {self._id} did not upload, so it reveals nothing")
        survivors, dropped = set(req.survivors), set(req.dropped)
        if survivors & dropped:
            raise SecAggError(
                f"client {self._id} refuses: clients {sorted(survivors & dropped)} are listed both as "
                f"survivors and as dropped"
            )
        if self._id in dropped or self._id not in survivors:
            raise SecAggError(
                f"client {self._id} refuses: it uploaded but is not listed as a survivor"
            )
        unknown = (survivors | dropped) - set(self._held)
        if unknown:
            raise SecAggError(f"client {self._id} holds no shares of clients {sorted(unknown)}")
        if len(survivors) < cfg.threshold:
            raise SecAggError(
                f"client {self._id} refuses: only {len(survivors)} survivors listed in its neighbourhood, "
                f"threshold {cfg.threshold}"
            )
        for owner in dropped:
            if self._revealed.get(owner, "mask key") != "mask key":
                raise SecAggError(
                    f"client {self._id} refuses to reveal the mask-key share of client {owner}: it already "
                    f"revealed its self-mask share"
                )
        for owner in survivors:
            if self._revealed.get(owner, "self mask") != "self mask":
                raise SecAggError(
                    f"client {self._id} refuses to reveal the self-mask share of client {owner}: it already "
                    f"revealed its mask-key share"
                )
        self._revealed.update({owner: "mask key" for owner in dropped})
        self._revealed.update({owner: "self mask" for owner in survivors})
        unsigned = ShareReveal(
            cfg.round_id,
            self._id,
            tuple((o, self._held[o][0]) for o in sorted(dropped)),
            tuple((o, self._held[o][1]) for o in sorted(survivors)),
            b"",
        )
        signature = self._identity.sign(unsigned.signed_part())
        return ShareReveal(
            cfg.round_id, self._id, unsigned.mask_key_shares, unsigned.self_mask_shares, signature
        ).to_bytes()


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


class SecAggServer:
    """The aggregator: sees public keys, opaque share ciphertexts, masked uploads and revealed shares.

    Call order: :meth:`collect_adverts`, :meth:`route_shares`, :meth:`receive_upload` (once per
    arriving upload; they are summed on arrival and not kept), :meth:`unmask_requests`,
    :meth:`finish`.

    Parameters
    ----------
    config : the round's public parameters.
    graph : the public neighbourhood graph.
    identity_keys : the PKI: client id -> raw Ed25519 public key, for all n clients.
    """

    def __init__(
        self, config: SecAggConfig, graph: NeighbourGraph, identity_keys: Mapping[int, bytes]
    ) -> None:
        config.check_graph(graph)
        missing = set(range(config.n_clients)) - set(identity_keys)
        if missing:
            raise ValueError(
                f"identity keys missing for {len(missing)} clients, e.g. {sorted(missing)[:5]}"
            )
        self._config = config
        self._graph = graph
        self._identity = {
            u: Ed25519PublicKey.from_public_bytes(identity_keys[u]) for u in range(config.n_clients)
        }
        self._adverts: dict[int, KeyAdvert] = {}
        self._mask_public: dict[int, X25519PublicKey] = {}
        self._sharers: set[int] = set()
        self._shares_routed = False
        self._total = np.zeros(config.dim, dtype=np.uint32)
        self._uploaded: dict[int, bytes] = {}  # client -> SHA-256 of its payload
        self._commitments: dict[int, bytes] = {}
        self._requests: dict[int, UnmaskRequest] | None = None
        self._dropped_needed: tuple[int, ...] = ()
        self._finished = False

    @property
    def survivors(self) -> tuple[int, ...]:
        """Clients whose masked upload was accepted (U3), sorted."""
        return tuple(sorted(self._uploaded))

    @property
    def dropped(self) -> tuple[int, ...]:
        """Clients that shared keys but sent no accepted upload (U2 - U3), sorted."""
        return tuple(sorted(self._sharers - set(self._uploaded)))

    def upload_digest(self, client: int) -> bytes:
        """SHA-256 of the masked payload accepted from ``client``."""
        return self._uploaded[client]

    def collect_adverts(self, messages: Iterable[bytes]) -> dict[int, list[bytes]]:
        """Round 0: verify the key advertisements and route each client its neighbours' ones.

        Returns
        -------
        dict[int, list[bytes]]
            For every advertising client u, the advertisements of its advertising neighbours.
        """
        if self._adverts:
            raise SecAggError("key advertisements were already collected")
        r = self._config.round_id
        for raw in messages:
            advert = KeyAdvert.from_bytes(raw)
            u = advert.client
            if not 0 <= u < self._config.n_clients:
                raise SecAggError(f"key advertisement from unknown client {u}")
            if advert.round_id != r:
                raise SecAggError(
                    f"key advertisement of client {u} is for round {advert.round_id}, not {r}"
                )
            if u in self._adverts:
                raise SecAggError(f"client {u} advertised keys twice")
            _verify(
                self._identity[u],
                advert.signature,
                advert.signed_part(),
                f"key advertisement of client {u}",
            )
            self._adverts[u] = advert
            self._mask_public[u] = X25519PublicKey.from_public_bytes(advert.mask_public)
        return {
            u: [
                self._adverts[v].to_bytes() for v in self._graph.neighbours[u] if v in self._adverts
            ]
            for u in self._adverts
        }

    def route_shares(self, messages: Iterable[bytes]) -> dict[int, list[bytes]]:
        """Round 1: route encrypted shares by receiver (reading headers only); senders form U2."""
        if not self._adverts:
            raise SecAggError("collect_adverts must run before route_shares")
        if self._shares_routed:
            raise SecAggError("shares were already routed")
        r = self._config.round_id
        routed: dict[int, list[bytes]] = {}
        seen: set[tuple[int, int]] = set()
        for raw in messages:
            msg = EncryptedShare.from_bytes(raw)
            u, v = msg.sender, msg.receiver
            if msg.round_id != r:
                raise SecAggError(f"shares from client {u} are for round {msg.round_id}, not {r}")
            if (
                u not in self._adverts
                or v not in self._adverts
                or v not in self._graph.neighbours[u]
            ):
                raise SecAggError(
                    f"shares from client {u} to client {v} do not follow the advertised graph"
                )
            if (u, v) in seen:
                raise SecAggError(f"client {u} sent two share messages to client {v}")
            seen.add((u, v))
            self._sharers.add(u)
            routed.setdefault(v, []).append(msg.to_bytes())
        self._shares_routed = True
        return routed

    def receive_upload(self, data: bytes) -> int:
        """Round 2: check one masked upload and add it to the running sum; return its client id.

        Raises
        ------
        SecAggError
            Not bytes, wrong length (truncated, wrong dtype or dim), bad header, unknown or
            duplicate client, a client that did not share keys, or a failed signature.
        """
        if not self._shares_routed:
            raise SecAggError("route_shares must run before uploads are accepted")
        if self._requests is not None:
            raise SecAggError("uploads are closed: unmasking has started")
        upload = MaskedUpload.from_bytes(data, self._config.dim)
        u = upload.client
        if upload.round_id != self._config.round_id:
            raise SecAggError(f"masked upload of client {u} is for round {upload.round_id}")
        if u not in self._sharers:
            raise SecAggError(f"masked upload from client {u}, which did not share its keys")
        if u in self._uploaded:
            raise SecAggError(f"client {u} uploaded twice")
        digest = hashlib.sha256(upload.payload).digest()
        header = bytes(data[: _UPLOAD_HDR.size])
        signed = header + upload.commitment + digest
        _verify(self._identity[u], upload.signature, signed, f"masked upload of client {u}")
        np.add(self._total, np.frombuffer(upload.payload, dtype="<u4"), out=self._total)
        self._uploaded[u] = digest
        self._commitments[u] = upload.commitment
        return u

    def unmask_requests(self) -> dict[int, bytes]:
        """Round 3: close uploads; check every needed secret can be rebuilt; address the survivors.

        Returns
        -------
        dict[int, bytes]
            survivor id -> :class:`UnmaskRequest` bytes.

        Raises
        ------
        SecAggError
            Fewer than t uploads, or some needed secret with fewer than t surviving share holders
            (raised before anyone reveals a share).
        """
        if not self._shares_routed:
            raise SecAggError("the key rounds must complete before unmasking")
        if self._requests is not None:
            raise SecAggError("unmask requests were already issued")
        t = self._config.threshold
        graph = self._graph
        alive = set(self._uploaded)
        if len(alive) < t:
            raise SecAggError(
                f"cannot unmask: only {len(alive)} of {len(self._sharers)} clients uploaded masked inputs "
                f"({len(self._sharers) - len(alive)} dropped), fewer than the threshold t={t}"
            )
        needed_dropped = tuple(u for u in self.dropped if alive.intersection(graph.neighbours[u]))
        problems = []
        for u in sorted(alive):
            available = len(alive.intersection(graph.closed(u)))
            if available < t:
                problems.append(
                    f"self-mask seed of client {u}: {available} shares available, {t} required"
                )
        for u in needed_dropped:
            available = len(alive.intersection(graph.neighbours[u]))
            if available < t:
                problems.append(
                    f"mask key of dropped client {u}: {available} shares available, {t} required"
                )
        if problems:
            raise SecAggError(
                f"cannot unmask: {len(problems)} secret(s) have fewer surviving share holders than the "
                f"threshold t={t}: "
                + "; ".join(problems[:5])
                + ("; ..." if len(problems) > 5 else "")
            )
        needed = set(needed_dropped)
        self._dropped_needed = needed_dropped
        self._requests = {
            v: UnmaskRequest(
                self._config.round_id,
                v,
                tuple(w for w in graph.closed(v) if w in alive),
                tuple(w for w in graph.neighbours[v] if w in needed),
            )
            for v in sorted(alive)
        }
        return {v: req.to_bytes() for v, req in self._requests.items()}

    def finish(self, reveals: Iterable[bytes]) -> np.ndarray:
        """Round 3 (end): rebuild the needed secrets, strip the masks, return the ring sum.

        Returns
        -------
        np.ndarray
            uint32 [D]: the sum of the survivors' fixed-point encodings mod 2^32.

        Raises
        ------
        SecAggError
            A reveal that is forged, unrequested or off-request; fewer than t shares for a needed
            secret; a reconstructed secret that contradicts its public key / commitment; or an
            unmasked sum that no ``|U3|`` uploads bounded by the value bound can produce (some
            upload was out of range or corrupt: the round is rejected, nothing is released).
        """
        if self._requests is None:
            raise SecAggError("unmask_requests must run before finish")
        if self._finished:
            raise SecAggError("the round is already finished")
        cfg = self._config
        t = cfg.threshold
        mask_key_shares: dict[int, list[Share]] = {u: [] for u in self._dropped_needed}
        self_shares: dict[int, list[Share]] = {u: [] for u in self._uploaded}
        senders: set[int] = set()
        for raw in reveals:
            reveal = ShareReveal.from_bytes(raw)
            v = reveal.sender
            request = self._requests.get(v)
            if request is None or reveal.round_id != cfg.round_id:
                raise SecAggError(f"share reveal from client {v}, which was not asked to reveal")
            if v in senders:
                raise SecAggError(f"client {v} revealed shares twice")
            _verify(
                self._identity[v],
                reveal.signature,
                reveal.signed_part(),
                f"share reveal of client {v}",
            )
            owners_s = [o for o, _ in reveal.mask_key_shares]
            owners_b = [o for o, _ in reveal.self_mask_shares]
            if not set(owners_s) <= set(request.dropped) or not set(owners_b) <= set(
                request.survivors
            ):
                raise SecAggError(
                    f"share reveal of client {v} contains shares that were not requested"
                )
            if len(set(owners_s)) != len(owners_s) or len(set(owners_b)) != len(owners_b):
                raise SecAggError(f"share reveal of client {v} repeats an owner")
            senders.add(v)
            for owner, y in reveal.mask_key_shares:
                mask_key_shares[owner].append(Share(v + 1, y))
            for owner, y in reveal.self_mask_shares:
                self_shares[owner].append(Share(v + 1, y))
        short = [
            f"{kind} of client {u}: {len(shares)} shares available, {t} required"
            for kind, table in (("mask key", mask_key_shares), ("self-mask seed", self_shares))
            for u, shares in sorted(table.items())
            if len(shares) < t
        ]
        if short:
            raise SecAggError(
                f"cannot unmask: {len(short)} secret(s) have fewer revealed shares than the threshold "
                f"t={t}: " + "; ".join(short[:5]) + ("; ..." if len(short) > 5 else "")
            )
        total = self._total.copy()
        keystream = _Keystream(cfg.dim)
        alive = set(self._uploaded)
        for u in self._dropped_needed:
            key_bytes = int_to_secret(reconstruct_secret(mask_key_shares[u], t))
            key = X25519PrivateKey.from_private_bytes(key_bytes)
            if key.public_key().public_bytes_raw() != self._adverts[u].mask_public:
                raise SecAggError(
                    f"reconstructed mask key of dropped client {u} does not match its public key"
                )
            for v in self._graph.neighbours[u]:
                if v not in alive:
                    continue
                mask = keystream.fill(_pair_seed(key, self._mask_public[v], cfg.round_id, u, v))
                if u > v:  # y_v carried +PRG(s_uv)
                    np.subtract(total, mask, out=total)
                else:
                    np.add(total, mask, out=total)
        for u in sorted(alive):
            seed_b = int_to_secret(reconstruct_secret(self_shares[u], t))
            if _commitment(seed_b, cfg.round_id, u) != self._commitments[u]:
                raise SecAggError(
                    f"reconstructed self-mask seed of client {u} does not match its commitment"
                )
            np.subtract(total, keystream.fill(seed_b), out=total)
        self._finished = True
        bad = out_of_range(total, len(alive), cfg.frac_bits, cfg.value_bound)
        if bad.size:
            raise SecAggError(
                f"the unmasked sum of {len(alive)} uploads has {bad.size} of {cfg.dim} coordinates "
                f"outside [-{len(alive)} B, {len(alive)} B] with B = value_bound = {cfg.value_bound} "
                f"(first at index {int(bad[0])}): some upload was out of range or corrupt; the round "
                f"is rejected. Honest clients check their own values, so look for a malicious or "
                f"faulty client, or raise aggregation.value_bound if values were clipped too tightly"
            )
        return total


# ---------------------------------------------------------------------------------------------
# Simulation driver
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SecAggCosts:
    """Communication and computation of one simulated round.

    Attributes
    ----------
    bytes_up : int64 [n], bytes each client sent (keys, shares, masked upload, revealed shares).
    bytes_down : int64 [n], bytes each client received (neighbours' keys, shares, unmask request).
    client_keygen_s, client_share_s, client_mask_s, client_unmask_s : float64 [n], seconds per
        client: identity and round key generation; verifying keys, sharing, encrypting and
        decrypting shares; encoding, pairwise and self masks, signing; answering the unmask request.
        Each pair mask expanded once by the driver is charged in full to both surviving endpoints.
    mean_client_s : mean over survivors of keygen + share + mask seconds.
    server_setup_s : verifying and routing keys and shares.
    server_aggregate_s : checking and summing the masked uploads.
    server_unmask_s : reconstructing secrets and removing masks.
    wall_s : wall time of :func:`secure_sum`.
    plain_bytes : 4 D, the size of a plain float32 upload.
    """

    bytes_up: np.ndarray
    bytes_down: np.ndarray
    client_keygen_s: np.ndarray
    client_share_s: np.ndarray
    client_mask_s: np.ndarray
    client_unmask_s: np.ndarray
    mean_client_s: float
    server_setup_s: float
    server_aggregate_s: float
    server_unmask_s: float
    wall_s: float
    plain_bytes: int


@dataclass(frozen=True, eq=False)
class SecureSumResult:
    """Outcome of :func:`secure_sum`.

    Attributes
    ----------
    total : float64 [D], the decoded sum over the survivors.
    fixed_total : int64 [D], the exact integer (fixed-point) sum, ``total = fixed_total * 2^-f``.
    survivors : ids whose upload was aggregated, sorted.
    dropped : ids that shared keys but did not upload, sorted.
    frac_bits : f.
    upload_digests : SHA-256 of each survivor's masked payload, in the order of ``survivors``.
    costs : :class:`SecAggCosts`.
    """

    total: np.ndarray
    fixed_total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    frac_bits: int
    upload_digests: tuple[bytes, ...]
    costs: SecAggCosts


def _check_dropped(dropped: Sequence[int], n: int) -> frozenset[int]:
    ids = [int(u) for u in dropped]
    bad = [u for u in ids if not 0 <= u < n]
    if bad:
        raise ValueError(f"dropped ids must lie in [0, {n}), got {bad[:5]}")
    if len(set(ids)) != len(ids):
        raise ValueError("dropped ids must be distinct")
    return frozenset(ids)


def secure_sum(
    vectors: np.ndarray,
    *,
    value_bound: float,
    threshold: int,
    neighbours: int | None,
    seed: int,
    dropped: Sequence[int] = (),
    round_id: int = 0,
    on_upload: Callable[[int, bytes], None] | None = None,
    secrets: str = "os",
) -> SecureSumResult:
    """Simulate one full secure-aggregation round for n clients and return the survivors' sum.

    Clients in ``dropped`` take part in the key rounds, then vanish before uploading; their
    pairwise masks are recovered from the survivors' shares.

    Parameters
    ----------
    vectors : float32 [n, D], row u is client u's input; ``|x| <= value_bound``, finite.
    value_bound : B, fixes the fixed-point resolution (see :func:`choose_frac_bits`).
    threshold : t, Shamir threshold within each closed neighbourhood (n for the complete graph,
        k + 1 for SecAgg+).
    neighbours : k (even) for a SecAgg+ graph, None for the complete graph.
    seed : root seed of the (public) graph, and of every secret in ``reproducible`` mode.
    dropped : ids of clients that drop after sharing their keys.
    round_id : round number mixed into keys and messages.
    on_upload : optional callback ``(client, upload_bytes)`` for each masked upload sent.
    secrets : ``os`` (default): each client's secret seed is 32 bytes from the OS CSPRNG.
        ``reproducible``: derived from ``seed`` (:func:`client_secret_seed`), so equal seeds give
        identical uploads; a simulation mode that protects nothing against whoever knows the seed.

    Returns
    -------
    SecureSumResult
    """
    wall0 = time.perf_counter()
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype != np.float32:
        got = (
            f"{vectors.dtype} {vectors.shape}"
            if isinstance(vectors, np.ndarray)
            else type(vectors).__name__
        )
        raise ValueError(f"vectors must be a float32 array of shape [n, D], got {got}")
    if secrets not in SECRET_MODES:
        raise ValueError(f"secrets must be one of {', '.join(SECRET_MODES)}, got {secrets!r}")
    n, dim = vectors.shape
    drop = _check_dropped(dropped, n)
    check_values(vectors, value_bound)
    config = SecAggConfig.create(
        n, dim, threshold=threshold, value_bound=value_bound, round_id=round_id
    )
    graph = neighbourhood_graph(n, neighbours, seed)
    config.check_graph(graph)

    bytes_up = np.zeros(n, dtype=np.int64)
    bytes_down = np.zeros(n, dtype=np.int64)
    keygen_s = np.zeros(n)
    share_s = np.zeros(n)
    mask_s = np.zeros(n)
    unmask_s = np.zeros(n)
    server_setup = server_aggregate = server_unmask = 0.0

    clients = []
    for u in range(n):
        t0 = time.perf_counter()
        secret_seed = (
            client_secret_seed(seed, u) if secrets == "reproducible" else _os_secrets.token_bytes(_KEY_BYTES)
        )
        clients.append(SecAggClient(u, config, graph, secret_seed))
        keygen_s[u] += time.perf_counter() - t0
    identity_keys = {u: c.identity_public_key for u, c in enumerate(clients)}
    server = SecAggServer(config, graph, identity_keys)

    # Round 0: AdvertiseKeys.
    adverts = []
    for u, client in enumerate(clients):
        t0 = time.perf_counter()
        adverts.append(client.advertise_keys())
        keygen_s[u] += time.perf_counter() - t0
        bytes_up[u] += len(adverts[-1])
    t0 = time.perf_counter()
    routed_adverts = server.collect_adverts(adverts)
    server_setup += time.perf_counter() - t0

    # Round 1: ShareKeys.
    outgoing: list[bytes] = []
    for u, client in enumerate(clients):
        incoming = routed_adverts.get(u, [])
        bytes_down[u] += sum(len(m) for m in incoming)
        t0 = time.perf_counter()
        sent = client.share_keys(incoming, identity_keys)
        share_s[u] += time.perf_counter() - t0
        bytes_up[u] += sum(len(m) for m in sent)
        outgoing.extend(sent)
    t0 = time.perf_counter()
    routed_shares = server.route_shares(outgoing)
    server_setup += time.perf_counter() - t0
    del outgoing
    for u, client in enumerate(clients):
        incoming = routed_shares.get(u, [])
        bytes_down[u] += sum(len(m) for m in incoming)
        t0 = time.perf_counter()
        client.receive_shares(incoming)
        share_s[u] += time.perf_counter() - t0

    # Round 2: MaskedInputCollection. Each pair's mask is expanded once (by a surviving endpoint)
    # and added to both endpoints' running totals; its cost is charged to both. Visiting clients
    # in ring order finishes each client as soon as all its pairs are done, so only the totals of
    # about k clients are alive at once for a SecAgg+ graph.
    keystream = _Keystream(dim)
    partners = {u: frozenset(clients[u].mask_partners()) for u in range(n) if u not in drop}
    partial: dict[int, np.ndarray] = {}
    visited: set[int] = set()
    for u in graph.order:
        for v in graph.neighbours[u]:
            if v in visited:
                continue
            ends = [w for w, other in ((u, v), (v, u)) if w in partners and other in partners[w]]
            if not ends:
                continue
            t0 = time.perf_counter()
            mask = keystream.fill(clients[ends[0]].pair_seed(v if ends[0] == u else u))
            expand_s = time.perf_counter() - t0
            for w in ends:
                other = v if w == u else u
                t0 = time.perf_counter()
                acc = partial.get(w)
                if acc is None:
                    acc = partial[w] = np.zeros(dim, dtype=np.uint32)
                if other > w:
                    np.add(acc, mask, out=acc)
                else:
                    np.subtract(acc, mask, out=acc)
                mask_s[w] += expand_s + time.perf_counter() - t0
        visited.add(u)
        if u in drop:
            continue
        pair_total = partial.pop(u, None)
        if pair_total is None:
            pair_total = np.zeros(dim, dtype=np.uint32)
        t0 = time.perf_counter()
        upload = clients[u].masked_upload(vectors[u], pair_mask_total=pair_total)
        mask_s[u] += time.perf_counter() - t0
        bytes_up[u] += len(upload)
        if on_upload is not None:
            on_upload(u, upload)
        t0 = time.perf_counter()
        server.receive_upload(upload)
        server_aggregate += time.perf_counter() - t0
        del upload, pair_total

    # Round 3: Unmasking.
    t0 = time.perf_counter()
    requests = server.unmask_requests()
    server_unmask += time.perf_counter() - t0
    reveals = []
    for v, request in requests.items():
        bytes_down[v] += len(request)
        t0 = time.perf_counter()
        reveals.append(clients[v].reveal_shares(request))
        unmask_s[v] += time.perf_counter() - t0
        bytes_up[v] += len(reveals[-1])
    t0 = time.perf_counter()
    ring_total = server.finish(reveals)
    server_unmask += time.perf_counter() - t0

    survivors = server.survivors
    alive = np.array(survivors, dtype=np.int64)
    per_client = keygen_s + share_s + mask_s
    costs = SecAggCosts(
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        client_keygen_s=keygen_s,
        client_share_s=share_s,
        client_mask_s=mask_s,
        client_unmask_s=unmask_s,
        mean_client_s=float(per_client[alive].mean()),
        server_setup_s=server_setup,
        server_aggregate_s=server_aggregate,
        server_unmask_s=server_unmask,
        wall_s=time.perf_counter() - wall0,
        plain_bytes=4 * dim,
    )
    return SecureSumResult(
        total=decode_sum(ring_total, frac_bits=config.frac_bits),
        fixed_total=centre(ring_total),
        survivors=survivors,
        dropped=server.dropped,
        frac_bits=config.frac_bits,
        upload_digests=tuple(server.upload_digest(u) for u in survivors),
        costs=costs,
    )
