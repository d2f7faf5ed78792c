"""Randomness from one root seed, split per purpose.

Every generator in the library is derived from ``(root_seed, purpose, *indices)``
through :class:`numpy.random.SeedSequence`; no library code touches the global
``random``, ``np.random`` or ``torch.manual_seed`` state. Two calls with the same
arguments return generators that produce identical streams, and different
purposes (or round / client indices) give independent streams.

Typical use::

    rng = numpy_rng(seed, "negatives", round_idx)
    gen = torch_generator(seed, "init", "fusion")

Secrets are different. Secure-aggregation keys and mask seeds, Shamir
coefficients and every differential-privacy noise draw must be unpredictable to
whoever knows the run seed, which is written to ``config.yaml`` and
``run.json``. :class:`SecretSource` hands them out: in mode ``os`` (the default)
each key is 32 fresh bytes from the operating system's CSPRNG; in mode
``reproducible`` (a labelled simulation mode for tests and exact replays) they
are derived from the run seed, so anyone holding the seed can recompute every
mask and subtract every noise draw. No security or privacy claim rests on
``reproducible`` runs. Gaussian noise is drawn from a key by
:func:`secret_normal` (ChaCha20 keystream, Box-Muller), the same way in both
modes; only where the key comes from differs.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: loaders and caches need not pay for it
    import torch

__all__ = [
    "SECRET_MODES",
    "SecretMode",
    "SecretSource",
    "derive_seed",
    "numpy_rng",
    "purpose_key",
    "secret_normal",
    "seed_sequence",
    "torch_generator",
]

SecretMode = Literal["os", "reproducible"]
#: where secrets come from: the OS CSPRNG, or (simulation only) the run seed
SECRET_MODES: tuple[str, ...] = ("os", "reproducible")
SECRET_KEY_BYTES = 32


def purpose_key(part: int | str) -> int:
    """Map one path component (an int or a purpose string) to a stable 32-bit word.

    Strings are hashed with BLAKE2b, so the mapping does not depend on Python's
    per-process hash randomisation.
    """
    if isinstance(part, bool):
        raise TypeError("purpose path components must be int or str, not bool")
    if isinstance(part, (int, np.integer)):
        if part < 0:
            raise ValueError(f"purpose indices must be non-negative, got {part}")
        return int(part)
    if isinstance(part, str):
        digest = hashlib.blake2b(part.encode("utf-8"), digest_size=4).digest()
        return int.from_bytes(digest, "little")
    raise TypeError(f"purpose path components must be int or str, got {type(part).__name__}")


def seed_sequence(root_seed: int, *path: int | str) -> np.random.SeedSequence:
    """SeedSequence for ``root_seed`` and a purpose path such as ``("negatives", 3)``."""
    if root_seed < 0:
        raise ValueError(f"root seed must be non-negative, got {root_seed}")
    return np.random.SeedSequence(entropy=int(root_seed), spawn_key=tuple(purpose_key(p) for p in path))


def derive_seed(root_seed: int, *path: int | str) -> int:
    """A 63-bit integer seed for ``(root_seed, *path)`` (for libraries that take an int)."""
    state = seed_sequence(root_seed, *path).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def numpy_rng(root_seed: int, *path: int | str) -> np.random.Generator:
    """A PCG64 :class:`numpy.random.Generator` for ``(root_seed, *path)``."""
    return np.random.Generator(np.random.PCG64(seed_sequence(root_seed, *path)))


def torch_generator(root_seed: int, *path: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` seeded for ``(root_seed, *path)``."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(root_seed, *path))
    return gen


@dataclass(frozen=True)
class SecretSource:
    """Where a run's secrets (keys, mask seeds, DP noise keys) come from.

    Attributes
    ----------
    mode : ``os``: every :meth:`key` call returns 32 fresh bytes from the operating
        system's CSPRNG (``secrets.token_bytes``), unrelated to the seed.
        ``reproducible``: the key is derived from ``(seed, *path)``, so equal seeds give
        equal secrets; a labelled simulation mode that protects nothing against anyone
        who knows the seed.
    seed : the run's root seed (read only in ``reproducible`` mode).
    """

    mode: SecretMode = "os"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SECRET_MODES:
            raise ValueError(f"secret mode must be one of {', '.join(SECRET_MODES)}, got {self.mode!r}")

    @property
    def reproducible(self) -> bool:
        """Whether secrets follow from the seed (no security claim holds then)."""
        return self.mode == "reproducible"

    def key(self, *path: int | str) -> bytes:
        """32 secret bytes for the purpose ``path`` (fresh on every call in ``os`` mode)."""
        if self.mode == "os":
            return secrets.token_bytes(SECRET_KEY_BYTES)
        state = seed_sequence(self.seed, "secret", *path).generate_state(SECRET_KEY_BYTES // 4, dtype=np.uint32)
        return state.astype("<u4").tobytes()

    def int_seed(self, *path: int | str) -> int:
        """A 63-bit integer seed from :meth:`key`, for libraries that only take an int seed."""
        return int.from_bytes(self.key(*path)[:8], "little") >> 1


def _keystream(key: bytes, n_bytes: int, stream: int) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    nonce = stream.to_bytes(16, "little")  # 32-bit block counter 0, then the stream id
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(n_bytes))


def secret_normal(key: bytes, shape: tuple[int, ...] | torch.Size, std: float = 1.0, *, stream: int = 0) -> torch.Tensor:
    """float32 Gaussian noise N(0, std^2) of ``shape`` from a secret 32-byte ``key``.

    The uniforms come from the ChaCha20 keystream of ``(key, stream)``; Box-Muller turns
    them into normals: the radius from a 53-bit uniform in (0, 1) (so the draw is not
    truncated before 8.5 standard deviations), the angle from a 32-bit one. Equal
    ``(key, stream)`` give equal noise; without the key the noise is unpredictable.

    Parameters
    ----------
    key : 32 secret bytes (from :meth:`SecretSource.key`).
    shape : output shape.
    std : standard deviation, finite and >= 0 (0 gives zeros).
    stream : separates independent draws under one key (0 <= stream < 2^96).

    Returns
    -------
    torch.Tensor
        float32 [*shape].
    """
    import torch

    if len(key) != SECRET_KEY_BYTES:
        raise ValueError(f"noise keys are {SECRET_KEY_BYTES} bytes, got {len(key)}")
    sd = float(std)
    if not (math.isfinite(sd) and sd >= 0.0):
        raise ValueError(f"std must be finite and >= 0, got {std!r}")
    if not 0 <= stream < 1 << 96:
        raise ValueError(f"stream must lie in [0, 2^96), got {stream}")
    size = math.prod(int(s) for s in shape)
    if sd == 0.0 or size == 0:
        return torch.zeros(tuple(shape))
    pairs = (size + 1) // 2
    raw = _keystream(key, 12 * pairs, stream << 32)
    radius_bits = np.frombuffer(raw, dtype="<u8", count=pairs)
    angle_bits = np.frombuffer(raw, dtype="<u4", count=pairs, offset=8 * pairs)
    u = (radius_bits >> np.uint64(11)).astype(np.float64)
    u += 0.5
    u *= 2.0**-53  # uniform on (0, 1), never 0
    radius = np.sqrt(-2.0 * np.log(u)).astype(np.float32)
    radius *= np.float32(sd)
    angle = angle_bits.astype(np.float32) * np.float32(2.0 * math.pi * 2.0**-32)
    out = np.empty(2 * pairs, dtype=np.float32)
    np.multiply(radius, np.cos(angle), out=out[:pairs])
    np.multiply(radius, np.sin(angle), out=out[pairs:])
    return torch.from_numpy(out[:size]).reshape(tuple(shape))
