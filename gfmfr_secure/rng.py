"""Randomness from one root seed, split per purpose.

Every generator in the library is derived from ``(root_seed, purpose, *indices)``
through :class:`numpy.random.SeedSequence`; no library code touches the global
``random``, ``np.random`` or ``torch.manual_seed`` state. Two calls with the same
arguments return generators that produce identical streams, and different
purposes (or round / client indices) give independent streams.

Typical use::

    rng = numpy_rng(seed, "negatives", round_idx)
    gen = torch_generator(seed, "init", "fusion")
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: loaders and caches need not pay for it
    import torch

__all__ = ["derive_seed", "numpy_rng", "purpose_key", "seed_sequence", "torch_generator"]


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
