"""Local minibatch schedules, identical for the cohort path and the per-client path.

Each client shuffles its own samples every epoch. The permutation comes from a
counter-based hash of ``(seed, client id, epoch, sample position)``, so it does not
depend on which other clients train alongside: a client training alone on another
machine draws exactly the batches it would draw in a simulated cohort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["StepPlan", "build_step_plan", "epoch_orders", "hash64"]

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


@dataclass(frozen=True, eq=False)
class StepPlan:
    """Minibatches of a cohort, laid out step by step.

    Clients are ordered by their number of local steps, descending, so the clients
    still active at global step ``k`` are the first ``active[k]`` of that order.

    Attributes
    ----------
    order : int64 [n] cohort positions sorted by step count (descending, stable).
    active : int64 [K] number of active clients per global step.
    offsets : int64 [K + 1] first row of each step in ``grid``.
    grid : int64 [sum(active), B] sample index per (step row, slot); -1 = padding.
        Row ``offsets[k] + r`` is the batch of client ``order[r]`` at step ``k``; its
        samples fill the first ``row_valid`` slots.
    row_valid : int64 [sum(active)] number of samples in each grid row.
    """

    order: np.ndarray
    active: np.ndarray
    offsets: np.ndarray
    grid: np.ndarray
    row_valid: np.ndarray

    @property
    def n_steps(self) -> int:
        return int(self.active.size)


def build_step_plan(
    clients: np.ndarray,
    counts: np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
) -> StepPlan:
    """Plan every client's local steps for one round.

    Parameters
    ----------
    clients : int64 [n] client ids (used only to key the shuffle).
    counts : int64 [n] number of samples per client; the samples of client ``c`` are
        the contiguous block ``[sum(counts[:c]), sum(counts[:c+1]))`` of the cohort's
        sample arrays.
    batch_size, epochs : local minibatch size and number of passes.
    seed : per-round shuffle seed.
    """
    clients = np.asarray(clients, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size}, {epochs}")
    n = clients.size
    nb = -(-counts // batch_size)
    steps = nb * epochs
    # Most steps first (active clients form a prefix); among equal step counts, most
    # samples first, so neighbouring rows have similar batch sizes and a block of rows
    # can be cut to its widest batch (see ``row_valid``).
    order = np.lexsort((-counts, -steps))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    n_steps = int(steps.max()) if n else 0
    sorted_steps = steps[order]
    active = _active_counts(sorted_steps, n_steps)
    offsets = np.concatenate([[0], np.cumsum(active)]).astype(np.int64)
    grid = np.full((int(offsets[-1]), batch_size), -1, dtype=np.int64)
    m = int(counts.sum())
    if m == 0:
        return StepPlan(order, active, offsets, grid, np.zeros(grid.shape[0], dtype=np.int64))

    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    owner = np.repeat(np.arange(n), counts)
    for epoch, perm in enumerate(epoch_orders(clients, counts, epochs=epochs, seed=seed)):
        new_pos = np.arange(m) - starts[owner[perm]]
        batch = new_pos // batch_size
        slot = new_pos % batch_size
        c = owner[perm]
        step = epoch * nb[c] + batch
        row = offsets[step] + rank[c]
        grid[row, slot] = perm
    return StepPlan(order, active, offsets, grid, (grid >= 0).sum(axis=1).astype(np.int64))


def epoch_orders(clients: np.ndarray, counts: np.ndarray, *, epochs: int, seed: int) -> np.ndarray:
    """Each epoch's shuffle of a cohort's samples: int64 [epochs, M].

    Row ``e`` is a permutation of ``0..M-1`` that keeps every client's samples in
    the client's own range (``counts`` as in :func:`build_step_plan`) and orders them
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


def _active_counts(sorted_steps: np.ndarray, n_steps: int) -> np.ndarray:
    """active[k] = #{c : steps_c > k} for descending ``sorted_steps``."""
    ks = np.arange(n_steps)
    asc = sorted_steps[::-1]
    return (asc.size - np.searchsorted(asc, ks, side="right")).astype(np.int64)
