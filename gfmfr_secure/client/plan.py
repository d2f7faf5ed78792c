"""Local minibatch schedules, identical for the cohort path and the per-client path.

Each client shuffles its own samples every epoch. The permutation comes from a
counter-based hash of ``(seed, client id, epoch, sample position)``, so it does not
depend on which other clients train alongside: a client training alone on another
machine draws exactly the batches it would draw in a simulated cohort. An epoch's
batches are consecutive runs of ``batch_size`` samples in that epoch's order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["epoch_orders", "hash64"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + _GOLD
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash64(*parts: np.ndarray | int) -> np.ndarray:
    """Vectorised 64-bit hash of integer arrays (broadcast), splitmix64-chained."""
    with np.errstate(over="ignore"):
        arrays = [np.asarray(p, dtype=np.uint64) for p in parts]
        h = np.zeros(np.broadcast_shapes(*(a.shape for a in arrays)), dtype=np.uint64)
        for a in arrays:
            h = _splitmix(h ^ a)
        return h


def epoch_orders(clients: np.ndarray, counts: np.ndarray, *, epochs: int, seed: int) -> np.ndarray:
    """Each epoch's shuffle of a cohort's samples: int64 [epochs, M].

    Row ``e`` is a permutation of ``0..M-1`` that keeps every client's samples in
    the client's own range (the samples of client ``c`` are the block
    ``[sum(counts[:c]), sum(counts[:c+1]))``) and orders them
    by the hash of ``(seed, client id, e, sample position)``. A client's batches in
    epoch ``e`` are consecutive runs of ``batch_size`` of its range in row ``e``.
    """
    from gfmfr_secure.client.kernel import shuffle_orders  # here: importing Numba takes ~0.5 s

    clients = np.asarray(clients, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    out = np.empty((epochs, int(counts.sum())), dtype=np.int64)
    # Within a client, samples sort by the top 40 bits of their hash (ties in position
    # order), as a stable sort of the packed (cohort position, key >> 24) would; past
    # 2^24 clients the positions no longer fit beside 40 bits and the full key is used.
    shift = 24 if clients.size == 0 or clients.size - 1 < (1 << 24) else 0
    shuffle_orders(clients, counts, int(epochs), np.uint64(seed), shift, out)
    return out
