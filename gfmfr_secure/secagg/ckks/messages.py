"""What travels in CKKS aggregation: serialised contexts and ciphertexts, their checks and chunking.

A ciphertext is bytes in one of three wire formats (``tenseal``, ``seeded``, ``packed``:
see the package docstring); :func:`check_format`, :func:`check_seal_ciphertext` and
:class:`Scratch` turn untrusted bytes into SEAL objects or a :class:`CKKSError` naming
what is wrong.
"""

from __future__ import annotations

import os
import tempfile
from types import ModuleType
from typing import Any

from gfmfr_secure.secagg.ckks.params import CKKSParams
from gfmfr_secure.secagg.ckks.primitives import PACKING, CKKSError, WireFormat, sealapi_module, tenseal_module

__all__ = [
    "Scratch",
    "as_blob",
    "check_context",
    "check_format",
    "check_seal_ciphertext",
    "chunk_bounds",
    "has_public_key",
    "load_context",
    "load_error",
]

#: First bytes of a SEAL-serialised object (magic 0xA15E, little endian).
_SEAL_MAGIC = b"\x5e\xa1"
#: First byte of a serialised TenSEAL CKKSVector (protobuf field 1, length-delimited).
_TENSEAL_VECTOR_TAG = 0x0A


def chunk_bounds(params: CKKSParams, dim: int, wire: WireFormat = "tenseal") -> list[tuple[int, int]]:
    """``[(start, stop)]`` of each ciphertext's values in a vector of ``dim`` values."""
    packing = PACKING[wire]
    s = params.values_per_ciphertext(packing)
    return [(i * s, min(dim, (i + 1) * s)) for i in range(params.n_ciphertexts(dim, packing))]


def load_context(data: bytes, n_threads: int, what: str) -> Any:
    """Deserialise a TenSEAL context, turning TenSEAL's errors into :class:`CKKSError`."""
    ts = tenseal_module()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CKKSError(f"{what} must be bytes, got {type(data).__name__}")
    try:
        ctx = ts.context_from(bytes(data), n_threads=n_threads)
    except (ValueError, RuntimeError) as exc:
        raise CKKSError(f"{what} cannot be loaded as a TenSEAL context: {exc}") from exc
    return ctx


def check_context(ctx: Any, params: CKKSParams, what: str) -> None:
    """Check that a TenSEAL context uses exactly ``params``."""
    parms = ctx.seal_context().data.key_context_data().parms()
    degree = int(parms.poly_modulus_degree())
    primes = tuple(int(m.value()) for m in parms.coeff_modulus())
    if degree != params.poly_modulus_degree or primes != params.primes:
        bits = [int(m.bit_count()) for m in parms.coeff_modulus()]
        raise CKKSError(
            f"{what} has ring degree {degree} and primes of {bits} bits, but the parameters say "
            f"{params.poly_modulus_degree} and {list(params.coeff_mod_bit_sizes)}"
        )
    if ctx.global_scale != params.scale:
        raise CKKSError(f"{what} has scale {ctx.global_scale!r}, the parameters say 2**{params.global_scale_bits}")


def as_blob(blob: object, where: str) -> bytes:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CKKSError(f"{where}: expected bytes, got {type(blob).__name__}")
    data = bytes(blob)
    if not data:
        raise CKKSError(f"{where}: empty ciphertext")
    return data


def has_public_key(ctx: Any) -> bool:
    """Whether a TenSEAL context holds a public key (a symmetric-key public context holds parameters only)."""
    try:
        return bool(ctx.has_public_key())
    except ValueError:
        return False


def check_format(data: bytes, wire: WireFormat, where: str) -> None:
    """Cheap check of the first bytes, to name a wire-format mix-up."""
    looks_seal = data[:2] == _SEAL_MAGIC
    looks_tenseal = data[0] == _TENSEAL_VECTOR_TAG
    if wire == "tenseal" and not looks_tenseal:
        hint = " (it looks like a raw SEAL ciphertext: the 'seeded' wire format)" if looks_seal else ""
        raise CKKSError(f"{where}: malformed ciphertext, not a serialised TenSEAL CKKSVector{hint}")
    if wire in ("seeded", "packed") and not looks_seal:
        hint = " (it looks like a TenSEAL CKKSVector: the 'tenseal' wire format)" if looks_tenseal else ""
        raise CKKSError(f"{where}: malformed ciphertext, no SEAL header{hint}")


def check_seal_ciphertext(ct: Any, params: CKKSParams, where: str) -> None:
    """A fresh or summed ciphertext: 2 polynomials at the data level, NTT form, scale Delta."""
    levels = len(params.coeff_mod_bit_sizes) - 1
    if ct.size() != 2:
        raise CKKSError(f"{where}: ciphertext has {ct.size()} polynomials, expected 2")
    if ct.coeff_modulus_size() != levels:
        raise CKKSError(f"{where}: ciphertext is at a level with {ct.coeff_modulus_size()} primes, expected {levels}")
    if not ct.is_ntt_form():
        raise CKKSError(f"{where}: ciphertext is not in NTT form, not a CKKS ciphertext")
    if ct.scale != params.scale:
        raise CKKSError(f"{where}: ciphertext scale is {ct.scale!r}, expected 2**{params.global_scale_bits}")


def load_error(where: str, exc: Exception) -> CKKSError:
    """Name the likely cause of a TenSEAL / SEAL load failure."""
    text = str(exc)
    if "invalid" in text:
        return CKKSError(
            f"{where}: ciphertext is not valid for this context: made under different encryption "
            f"parameters, or corrupted (TenSEAL: {text})"
        )
    return CKKSError(f"{where}: malformed or truncated ciphertext (TenSEAL: {text})")


class Scratch:
    """Private temporary files for ``tenseal.sealapi``, whose save/load take paths only.

    Only ciphertexts go through them, never keys. The folder lives in
    ``/dev/shm`` (memory) when it is writable, else in the default temporary
    folder; every transfer uses a fresh file that is removed at once (rewriting a
    file in place can make the file system flush it to disk first).
    """

    def __init__(self) -> None:
        shm = "/dev/shm"
        where = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
        self._dir = tempfile.TemporaryDirectory(prefix="gfmfr-ckks-", dir=where)
        self._count = 0

    def _path(self) -> str:
        self._count += 1
        return os.path.join(self._dir.name, f"{self._count}.bin")

    def save(self, obj: Any) -> bytes:
        """Serialise a SEAL object (or ``Serializable``) to bytes."""
        path = self._path()
        try:
            obj.save(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def load_ciphertext(self, sealapi: ModuleType, seal_context: Any, data: bytes) -> Any:
        """Deserialise a SEAL ciphertext; TenSEAL's ValueError / RuntimeError pass through."""
        path = self._path()
        try:
            with open(path, "wb") as f:
                f.write(data)
            ct = sealapi.Ciphertext()
            ct.load(seal_context, path)
            return ct
        finally:
            os.unlink(path)

    def load_checked(self, seal_context: Any, params: CKKSParams, wire: WireFormat, blob: object, where: str) -> Any:
        """A SEAL ciphertext from untrusted bytes, validated against ``params`` (:class:`CKKSError` otherwise)."""
        data = as_blob(blob, where)
        check_format(data, wire, where)
        try:
            ct = self.load_ciphertext(sealapi_module(), seal_context, data)
        except (ValueError, RuntimeError) as exc:
            raise load_error(where, exc) from exc
        check_seal_ciphertext(ct, params, where)
        return ct

    def close(self) -> None:
        """Remove the folder now (a worker process ends without running finalisers)."""
        self._dir.cleanup()
