"""The aggregation interface and the pure sum functions every backend must reproduce."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from gfmfr_secure.client.checks import CountEvidence, check_round_parameters
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy.release import ReleaseNoise
from gfmfr_secure.rng import SecretMode, SecretSource
from gfmfr_secure.secagg.masking import SecAggConfig, neighbourhood_graph
from gfmfr_secure.types import AggregateResult, CohortUpdate

__all__ = ["AGGREGATORS", "Aggregator", "get_aggregator", "group_sums", "register_aggregator", "weighted_sums"]


class Aggregator(ABC):
    """Turns a cohort's uploads into an :class:`AggregateResult`.

    Each backend declares its ``exposure`` (see :class:`gfmfr_secure.types.Exposure`):
    what the server learns. The runner builds the adversary view from that
    declaration, so a backend must never return more than it declares (a contract
    test checks ``per_client`` is None unless the exposure is per-client).
    """

    name: ClassVar[str]
    exposure: ClassVar[str]

    def __init__(self, settings: Any = None, seed: int = 0, secrets: SecretMode = "os", min_group_size: int = 2) -> None:
        """``settings``: the ``aggregation`` config section (None = defaults); ``seed``: the run's root
        seed (public randomness: dropout simulation, the SecAgg+ graph); ``secrets``: where keys and
        mask seeds come from (:class:`gfmfr_secure.rng.SecretSource`); ``min_group_size``: the
        clients' ``grouping.min_group_size``, the fewest clients they let a secure sum cover."""
        self.settings = settings
        self.seed = int(seed)
        self.secrets = SecretSource(secrets, self.seed)
        self.min_group_size = int(min_group_size)
        self.rounds_done = 0
        #: cost of the last round: bytes per client up and down, client and server seconds
        self.last_cost: dict[str, float] = {}
        #: when True, the next sums keep what the clients need to check the released result
        #: (a count phase's transcript or the key holder's release) in ``last_evidence``
        self.record_transcript = False
        self.last_evidence: CountEvidence | None = None

    def attestation_scope(self, n: int) -> tuple[Any, int]:
        """Where broadcast attestations go in a secure round of ``n`` clients: (graph, min_matching).

        ``graph``: the :class:`~gfmfr_secure.secagg.masking.NeighbourGraph` of the next sum, or
        None for the whole cohort; ``min_matching``: the fewest matching attestations a
        client accepts. Default: the whole cohort, and ``min_group_size - 1`` others (a sum
        that covers the floor covers that many clients who received the same model).
        """
        return None, self.min_group_size - 1

    def check_clients_accept(self, n: int, dim: int, threshold: int, neighbours: int | None, seed: int, round_id: int) -> None:
        """The clients' :func:`~gfmfr_secure.client.checks.check_round_parameters` on a secure round about to start.

        Parameters
        ----------
        n, dim : clients and summed coordinates of the round.
        threshold : t (``n`` for a sum that needs every upload).
        neighbours : SecAgg+ degree k, or None for the complete graph.
        seed, round_id : the round's public graph seed and round number.

        Raises
        ------
        ClientRefusal
            Fewer than ``min_group_size`` clients, or a threshold below
            ``aggregation.threshold_fraction`` of a neighbourhood or not a strict majority of it.
        """
        config = SecAggConfig.create(n, dim, threshold=threshold, value_bound=8.0, round_id=round_id)
        fraction = 0.6 if self.settings is None else float(self.settings.threshold_fraction)
        check_round_parameters(config, neighbourhood_graph(n, neighbours, seed), min_group_size=self.min_group_size, threshold_fraction=fraction)

    def min_reporting(self, n: int) -> int:
        """The fewest of ``n`` uploads that can reach a sum this backend releases.

        Distributed DP sizes each client's noise share for this many reporting clients
        (:meth:`gfmfr_secure.privacy.plan.UserLevelDP.share_std`): shares of clients that
        drop out never reach the sum. Backends without dropouts return ``n``.
        """
        return int(n)

    def check_survivors(self, survivors: int, n: int, *, fix: str) -> None:
        """Refuse to release a sum carrying DP noise shares when fewer than :meth:`min_reporting` of ``n`` uploads reached it.

        ``fix`` names what the caller can change (it depends on where the dropouts come from).

        Raises
        ------
        ConfigError
            The sum would carry less noise than accounted.
        """
        if survivors < self.min_reporting(n):
            raise ConfigError(
                f"aggregation.backend={self.name}: only {survivors} of {n} clients' uploads reached the sum, but the distributed DP "
                f"noise shares were sized for at least {self.min_reporting(n)}; the sum would carry less noise than accounted "
                f"and is not released: {fix}"
            )

    @abstractmethod
    def aggregate(
        self,
        update: CohortUpdate,
        *,
        n_items: int,
        weights: np.ndarray,
        groups: np.ndarray | None = None,
        n_groups: int = 0,
        noise: ReleaseNoise | None = None,
    ) -> AggregateResult:
        """Aggregate one round.

        Parameters
        ----------
        update : the cohort's uploads.
        n_items : I, the item-table height.
        weights : float64 [n] FedAvg weights of the clients (1 for uniform).
        groups : int64 [n] group each client placed itself in (client-side, oblivious
            grouping) or None when no group-wise sums are wanted from the backend.
        n_groups : G.
        noise : the round's DP noise (layout, central draw, clients' shares), or None.
            The backend must release only noised sums: shares go into the clients'
            uploads, the central draw is added by whoever releases the sum.
        """


AGGREGATORS: dict[str, Callable[[], Aggregator]] = {}


def register_aggregator(name: str) -> Callable[[type[Aggregator]], type[Aggregator]]:
    """Class decorator adding a backend to the registry; duplicates raise."""

    def wrap(cls: type[Aggregator]) -> type[Aggregator]:
        if name in AGGREGATORS:
            raise ValueError(f"aggregation backend {name!r} is already registered")
        cls.name = name
        AGGREGATORS[name] = cls
        return cls

    return wrap


def get_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """Instantiate a registered backend; unknown names raise listing the known ones."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation backend {name!r}; known: {', '.join(sorted(AGGREGATORS))}")
    return AGGREGATORS[name](**kwargs)


def weighted_sums(update: CohortUpdate, n_items: int, weights: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted sums of item-table deltas [I, d] and head deltas [H] (None for private heads)."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
    d = update.item_delta.shape[1]
    item_sum = torch.zeros(n_items, d)
    row_w = w[torch.from_numpy(update.row_owner)].unsqueeze(1)
    item_sum.index_add_(0, torch.from_numpy(update.row_items), update.item_delta * row_w)
    head_sum = None if update.head_delta is None else (update.head_delta * w.unsqueeze(1)).sum(0)
    return item_sum, head_sum


def group_sums(
    update: CohortUpdate, n_items: int, groups: np.ndarray, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-group unweighted sums: counts [G], item-table deltas [G, I, d], head deltas [G, H].

    Clients with group -1 are left out of every group.
    """
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != (len(update),):
        raise ValueError(f"groups must have shape ({len(update)},), got {groups.shape}")
    if groups.size and (groups.max() >= n_groups or groups.min() < -1):
        raise ValueError(f"group ids must lie in [-1, {n_groups - 1}], got range [{groups.min()}, {groups.max()}]")
    member = groups >= 0
    counts = torch.bincount(torch.from_numpy(groups[member]), minlength=n_groups).to(torch.float32)
    d = update.item_delta.shape[1]
    item = torch.zeros(n_groups * n_items, d)
    row_group = groups[update.row_owner]
    keep = row_group >= 0
    if keep.all():  # every client in a group (the usual case): no copy of the deltas
        item.index_add_(0, torch.from_numpy(row_group * n_items + update.row_items), update.item_delta)
    else:
        flat = row_group[keep] * n_items + update.row_items[keep]
        item.index_add_(0, torch.from_numpy(flat), update.item_delta[torch.from_numpy(np.flatnonzero(keep))])
    head = None
    if update.head_delta is not None:
        head = torch.zeros(n_groups, update.head_delta.shape[1])
        idx = np.flatnonzero(member)
        head.index_add_(0, torch.from_numpy(groups[idx]), update.head_delta[torch.from_numpy(idx)])
    return counts, item.view(n_groups, n_items, d), head
