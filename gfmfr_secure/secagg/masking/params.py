"""Public parameters of a secure-aggregation round: the neighbourhood graph and :class:`SecAggConfig`.

Both are known to every party (clients and server) before the round starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gfmfr_secure.rng import numpy_rng
from gfmfr_secure.secagg.fixedpoint import choose_frac_bits

__all__ = ["NeighbourGraph", "SecAggConfig", "neighbourhood_graph"]




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
