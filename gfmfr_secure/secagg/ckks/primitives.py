"""Primitives of CKKS aggregation: types, the TenSEAL import, argument checks, coefficient packing, noise.

Pure functions: :func:`coefficients_to_slots` / :func:`slots_to_coefficients` map a
chunk of N values to SEAL's slot values and back (one value per coefficient),
:func:`flooding_noise` draws the flooding noise from a secret key, and
:func:`gaussian_noise` makes a release-noise hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from types import ModuleType
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from gfmfr_secure.errors import GfmfrError

__all__ = [
    "CUSTODIES",
    "PACKING",
    "WIRE_FORMATS",
    "CKKSError",
    "Custody",
    "NoiseFn",
    "Packing",
    "WireFormat",
    "check_custody",
    "check_dim",
    "check_n_threads",
    "check_packing",
    "check_wire",
    "coefficients_to_slots",
    "default_wire",
    "flooding_noise",
    "gaussian_noise",
    "sealapi_module",
    "slots_to_coefficients",
    "tenseal_module",
]

Custody = Literal["authority", "shared-clients"]
WireFormat = Literal["tenseal", "seeded", "packed"]
Packing = Literal["slots", "coefficients"]

CUSTODIES: tuple[str, ...] = ("authority", "shared-clients")
WIRE_FORMATS: tuple[str, ...] = ("tenseal", "seeded", "packed")
#: How each wire format places values: one per slot (N / 2 per ciphertext) or one per coefficient (N).
PACKING: dict[str, Packing] = {"tenseal": "slots", "seeded": "slots", "packed": "coefficients"}


class CKKSError(GfmfrError, ValueError):
    """Invalid CKKS parameters, context, plaintext or ciphertext."""


def check_packing(packing: str) -> Packing:
    if packing not in ("slots", "coefficients"):
        raise CKKSError(f"packing must be 'slots' or 'coefficients', got {packing!r}")
    return packing  # type: ignore[return-value]


def tenseal_module() -> ModuleType:
    """Import TenSEAL (and its SEAL bindings, which register the SEAL types), or say how to get it."""
    try:
        import tenseal  # type: ignore[import-untyped]
        from tenseal import sealapi  # noqa: F401  (registers seal::Modulus & co. with pybind11)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the CKKS secure-aggregation backend needs TenSEAL: install it with "
            "`pip install tenseal==0.3.18` (wheels for CPython on x86-64 Linux, macOS and Windows), "
            "or choose another secure-aggregation backend"
        ) from exc
    return tenseal


def sealapi_module() -> ModuleType:
    """TenSEAL's SEAL bindings (``tenseal.sealapi``)."""
    tenseal_module()
    from tenseal import sealapi

    return sealapi


def check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise CKKSError(f"dim must be an int >= 1, got {dim!r}")
    return int(dim)


def check_n_threads(n_threads: int) -> int:
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise CKKSError(f"n_threads must be an int >= 1, got {n_threads!r}")
    return n_threads


def check_custody(custody: str) -> Custody:
    if custody not in CUSTODIES:
        raise CKKSError(f"custody must be one of {CUSTODIES}, got {custody!r}")
    return custody  # type: ignore[return-value]


def check_wire(wire: str) -> WireFormat:
    if wire not in WIRE_FORMATS:
        raise CKKSError(f"wire format must be one of {WIRE_FORMATS}, got {wire!r}")
    return wire  # type: ignore[return-value]


def default_wire(custody: Custody) -> WireFormat:
    """``"tenseal"`` under ``authority``, ``"seeded"`` (half the bytes) under ``shared-clients``."""
    return "seeded" if check_custody(custody) == "shared-clients" else "tenseal"


@lru_cache(maxsize=8)
def _embedding(degree: int) -> tuple[NDArray[np.complex128], NDArray[np.int64]]:
    """``(twist, index)`` mapping coefficients to SEAL's CKKS slots at ring degree N.

    SEAL's slot k holds ``p(zeta^(3^k mod 2N)) / Delta`` with ``zeta = exp(i pi / N)``
    (the other odd powers hold the complex conjugates). With ``twist[j] = zeta^j`` the
    values at all odd powers ``zeta^(2m + 1)`` are ``N * ifft(p * twist)[m]``, and slot k
    is the one with ``m = index[k] = (3^k mod 2N - 1) / 2``.
    """
    twist = np.exp(1j * np.pi * np.arange(degree) / degree)
    exps = np.empty(degree // 2, dtype=np.int64)
    e = 1
    for k in range(degree // 2):
        exps[k] = e
        e = e * 3 % (2 * degree)
    return twist, (exps - 1) // 2


def coefficients_to_slots(coefficients: NDArray[np.float64]) -> NDArray[np.complex128]:
    """The slot values whose CKKS encoding is the polynomial with the given coefficients.

    Encoding the returned slots at scale Delta (SEAL's ``CKKSEncoder``) gives the plaintext
    polynomial ``round(Delta * coefficients)``: one value per coefficient, N per ciphertext.

    Parameters
    ----------
    coefficients : float64 [C, N], one row per ciphertext.

    Returns
    -------
    complex128 [C, N / 2]
    """
    degree = coefficients.shape[-1]
    twist, index = _embedding(degree)
    return (np.fft.ifft(coefficients * twist, axis=-1) * degree)[..., index]


def slots_to_coefficients(slots: NDArray[np.complex128]) -> NDArray[np.float64]:
    """Inverse of :func:`coefficients_to_slots`: float64 [C, N] from complex [C, N / 2] slots."""
    half = slots.shape[-1]
    degree = 2 * half
    twist, index = _embedding(degree)
    full = np.empty((*slots.shape[:-1], degree), dtype=np.complex128)
    full[..., index] = slots
    full[..., degree - 1 - index] = np.conj(slots)  # p(zeta^-e) = conj(p(zeta^e)) for a real p
    return (np.fft.fft(full, axis=-1) * np.conj(twist)).real / degree


NoiseFn = Callable[[int], NDArray[np.float64]]


def flooding_noise(key: bytes, dim: int, std: float) -> NDArray[np.float64]:
    """float64 [dim] Gaussian flooding noise N(0, std^2) from a 32-byte secret ``key``.

    ChaCha20 keystream of ``key``, two 53-bit uniforms per pair of values, Box-Muller
    in float64. Full double precision matters: noise on a coarser grid (float32)
    would leave the low-order bits of the decrypted values, where the decryption
    error lives, readable in the release.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise CKKSError("the flooding key must be 32 bytes")
    d = check_dim(dim)
    if not (math.isfinite(std) and std >= 0):
        raise CKKSError(f"std must be finite and >= 0, got {std!r}")
    pairs = (d + 1) // 2
    raw = Cipher(algorithms.ChaCha20(bytes(key), bytes(16)), mode=None).encryptor().update(bytes(16 * pairs))
    bits = np.frombuffer(raw, dtype="<u8").reshape(2, pairs) >> np.uint64(11)
    u1 = (bits[0].astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1), never 0
    u2 = bits[1].astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1)) * float(std)
    out = np.concatenate([radius * np.cos(2.0 * math.pi * u2), radius * np.sin(2.0 * math.pi * u2)])
    return out[:d]


def gaussian_noise(std: float, rng: np.random.Generator) -> NoiseFn:
    """A noise hook for :meth:`Decryptor.decrypt`: ``D -> N(0, std^2)`` float64 [D]."""
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise CKKSError(f"std must be a finite number >= 0, got {std!r}")
    if not isinstance(rng, np.random.Generator):
        raise CKKSError(f"rng must be a numpy Generator, got {type(rng).__name__}")

    def draw(dim: int) -> NDArray[np.float64]:
        return rng.normal(0.0, float(std), size=dim)

    return draw
