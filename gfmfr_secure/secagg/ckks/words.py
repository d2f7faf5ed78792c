"""The ``packed`` wire format's public-key ciphertexts as words: each prime's in the bytes it needs.

A fresh CKKS ciphertext at the data level is two polynomials in NTT form, each held as
``N`` words per data prime ``q_i`` (SEAL's RNS layout, uint64 [2, L, N]). Adding two
ciphertexts is adding their words mod ``q_i``, which is all the aggregator does. SEAL,
through ``tenseal.sealapi``, saves a ciphertext only zstd-compressed and only to a file,
and decompressing and validating each upload was most of the aggregator's time (0.37 of
0.41 ms per ciphertext at N = 8192). So a client sends the words themselves, each prime's
in ``ceil(log2 q_i / 8)`` bytes (60- and 20-bit primes: 11 bytes per coefficient and
polynomial, 4 % fewer than SEAL's compressed form), behind the data level's ``parms_id``;
the aggregator checks every word is below its prime and adds in numpy; the key holder
turns the sum back into SEAL's uncompressed serialisation and loads it with SEAL, which
validates it again before decrypting.

Layout of SEAL 4's ``Ciphertext::save`` (read by :func:`words_from_seal`, written by
:func:`seal_from_words`): a 16-byte header (magic ``0xA15E``, header size, version,
compression mode, total size) and then, compressed or not, ``parms_id`` (4 uint64),
``is_ntt_form`` (1 byte), ``size``, ``poly_modulus_degree``, ``coeff_modulus_size``
(uint64 each), ``scale`` (float64), ``correction_factor`` (uint64) and the data array:
a nested uncompressed header, its word count (uint64) and the words.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gfmfr_secure.secagg.ckks.primitives import CKKSError, sealapi_module

__all__ = ["MAGIC", "WordLayout", "add_into", "as_seal", "pack", "seal_from_words", "unpack", "word_layout", "words_from_seal"]

#: First bytes of a ciphertext in this format.
MAGIC = b"GFW1"
_SEAL_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compression, reserved, total size
_META = struct.Struct("<32sBQQQdQ")  # parms_id, is_ntt_form, size, degree, primes, scale, correction factor
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2


@dataclass(frozen=True)
class WordLayout:
    """The data level of a SEAL context: what a ciphertext's words must fit.

    Attributes
    ----------
    parms_id : the data level's SEAL ``parms_id`` (32 bytes: four little-endian uint64).
    primes : the data primes q_i.
    degree : N.
    """

    parms_id: bytes
    primes: tuple[int, ...]
    degree: int

    @property
    def widths(self) -> tuple[int, ...]:
        """Bytes per word of each prime."""
        return tuple(math.ceil(q.bit_length() / 8) for q in self.primes)

    @property
    def nbytes(self) -> int:
        """Bytes of one ciphertext in this format."""
        return len(MAGIC) + 32 + 2 * self.degree * sum(self.widths)


def word_layout(seal_context: Any) -> WordLayout:
    """The data level of a ``sealapi.SEALContext``."""
    data = seal_context.first_context_data()
    parms = data.parms()
    return WordLayout(
        parms_id=struct.pack("<4Q", *seal_context.first_parms_id()),
        primes=tuple(int(m.value()) for m in parms.coeff_modulus()),
        degree=int(parms.poly_modulus_degree()),
    )


def _body_bytes(layout: WordLayout) -> int:
    return _META.size + _HEADER.size + 8 + 8 * 2 * len(layout.primes) * layout.degree


def words_from_seal(saved: bytes, layout: WordLayout, scale: float) -> NDArray[np.uint64]:
    """uint64 [2, L, N]: the words of a fresh ciphertext from its ``Ciphertext.save`` bytes.

    Raises
    ------
    CKKSError
        The bytes are not a 2-polynomial NTT-form ciphertext at ``layout``'s level and ``scale``.
    """
    if len(saved) < _HEADER.size:
        raise CKKSError(f"a saved SEAL ciphertext has at least {_HEADER.size} bytes, got {len(saved)}")
    magic, header_size, _, _, compr, _, size = _HEADER.unpack_from(saved)
    if magic != _SEAL_MAGIC or header_size != _HEADER.size or size != len(saved):
        raise CKKSError("not a SEAL serialisation (bad header)")
    expected = _body_bytes(layout)
    if compr == _COMPR_NONE:
        body = saved[_HEADER.size :]
    elif compr == _COMPR_ZLIB:
        body = zlib.decompress(saved[_HEADER.size :])
    elif compr == _COMPR_ZSTD:
        import zstandard

        body = zstandard.ZstdDecompressor().decompress(saved[_HEADER.size :], max_output_size=expected)
    else:
        raise CKKSError(f"unknown SEAL compression mode {compr}")
    if len(body) != expected:
        raise CKKSError(f"a saved ciphertext at this level has {expected} bytes of members, got {len(body)}")
    parms_id, ntt, n_polys, degree, n_primes, got_scale, correction = _META.unpack_from(body)
    if (parms_id, ntt, n_polys, degree, n_primes, correction) != (layout.parms_id, 1, 2, layout.degree, len(layout.primes), 1):
        raise CKKSError("the ciphertext is not a fresh 2-polynomial NTT-form ciphertext at the data level")
    if got_scale != scale:
        raise CKKSError(f"the ciphertext's scale is {got_scale!r}, expected {scale!r}")
    count = struct.unpack_from("<Q", body, _META.size + _HEADER.size)[0]
    if count != 2 * len(layout.primes) * layout.degree:
        raise CKKSError(f"the ciphertext holds {count} words, expected {2 * len(layout.primes) * layout.degree}")
    start = _META.size + _HEADER.size + 8
    return np.frombuffer(body, dtype="<u8", offset=start).reshape(2, len(layout.primes), layout.degree).astype(np.uint64)


def seal_from_words(words: NDArray[np.uint64], layout: WordLayout, scale: float) -> bytes:
    """SEAL's uncompressed ``Ciphertext.save`` bytes of words [2, L, N] at ``layout``'s level and ``scale``."""
    header = sealapi_module().Serialization.SEALHeader()  # this SEAL's version
    major, minor = int(header.version_major), int(header.version_minor)
    count = words.size
    data_header = _HEADER.pack(_SEAL_MAGIC, _HEADER.size, major, minor, _COMPR_NONE, 0, _HEADER.size + 8 + 8 * count)
    body = b"".join((
        _META.pack(layout.parms_id, 1, 2, layout.degree, len(layout.primes), float(scale), 1),
        data_header,
        struct.pack("<Q", count),
        np.ascontiguousarray(words, dtype="<u8").tobytes(),
    ))
    return _HEADER.pack(_SEAL_MAGIC, _HEADER.size, major, minor, _COMPR_NONE, 0, _HEADER.size + len(body)) + body


def pack(words: NDArray[np.uint64], layout: WordLayout) -> bytes:
    """A ciphertext's words [2, L, N] in this format: magic, parms_id, then each prime's words in its width."""
    as_bytes = np.ascontiguousarray(words, dtype="<u8").view(np.uint8).reshape(2, len(layout.primes), layout.degree, 8)
    parts = [MAGIC, layout.parms_id]
    parts += [as_bytes[:, i, :, :width].tobytes() for i, width in enumerate(layout.widths)]
    return b"".join(parts)


def unpack(data: bytes, layout: WordLayout, where: str) -> NDArray[np.uint64]:
    """uint64 [2, L, N]: the words of a ciphertext in this format, each checked to lie below its prime.

    Raises
    ------
    CKKSError
        Wrong length or magic, another parameter set's ``parms_id``, or a word not below its prime.
    """
    if data[: len(MAGIC)] != MAGIC:
        hint = " (it looks like a SEAL serialisation)" if data[:2] == _SEAL_MAGIC.to_bytes(2, "little") else ""
        raise CKKSError(f"{where}: malformed ciphertext, not the 'packed' word format{hint}")
    if len(data) != layout.nbytes:
        raise CKKSError(f"{where}: malformed or truncated ciphertext: {len(data)} bytes, expected {layout.nbytes}")
    if data[len(MAGIC) : len(MAGIC) + 32] != layout.parms_id:
        raise CKKSError(f"{where}: ciphertext is not valid for this context: made under different encryption parameters")
    n = layout.degree
    words = np.empty((2, len(layout.primes), n), dtype=np.uint64)
    offset = len(MAGIC) + 32
    for i, (width, q) in enumerate(zip(layout.widths, layout.primes, strict=True)):
        size = 2 * n * width
        if width == 8:
            words[:, i, :] = np.frombuffer(data, dtype="<u8", count=2 * n, offset=offset).reshape(2, n)
        else:  # read 8 bytes at every ``width``-th byte of a copy with 8 spare bytes, keep the low ``width``
            spare = np.zeros(size + 8, dtype=np.uint8)
            spare[:size] = np.frombuffer(data, dtype=np.uint8, count=size, offset=offset)
            wide = np.ndarray((2, n), dtype="<u8", buffer=spare, strides=(n * width, width))
            np.bitwise_and(wide, np.uint64((1 << (8 * width)) - 1), out=words[:, i, :])
        offset += size
        if int(words[:, i, :].max()) >= q:
            raise CKKSError(f"{where}: ciphertext is not valid for this context: a word of data prime {i} is not below it")
    return words


def add_into(acc: NDArray[np.uint64], words: NDArray[np.uint64], layout: WordLayout) -> None:
    """``acc = (acc + words) mod q_i``, in place, for words [2, L, N] each below its prime (the sum stays below 2^64)."""
    np.add(acc, words, out=acc)
    for i, q in enumerate(layout.primes):
        a = acc[:, i, :]
        # min(a, a - q) in uint64: a - q wraps above a when a < q (a < 2q < 2^64)
        np.minimum(a, a - np.uint64(q), out=a)


def as_seal(blob: bytes, layout: WordLayout, scale: float, where: str = "ciphertext") -> bytes:
    """SEAL's serialisation of a ciphertext given in this format (checked) or already as SEAL bytes (returned as is)."""
    return seal_from_words(unpack(blob, layout, where), layout, scale) if blob[: len(MAGIC)] == MAGIC else blob
