"""A simulated active (malicious) server: the steps of a round it replaces.

The security experiments (``attacks/active``, ``tests/security``) play a server that
deviates from the protocol. They say how with an :class:`ActiveServer` passed to
:func:`gfmfr_secure.simulation.loop.run_federated`, which installs it on the two roles of
the in-process engine; every step left ``None`` stays the honest one. Nothing here runs
in an honest deployment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gfmfr_secure.types import AggregateResult

__all__ = ["ActiveServer", "accept_any_counts"]


def accept_any_counts(*args: Any, **kwargs: Any) -> None:
    """The clients' count check switched off: every reported count is accepted (the ablation of that check)."""


@dataclass(frozen=True)
class ActiveServer:
    """The server's deviations, each replacing one honest step (None: honest).

    Attributes
    ----------
    centroid_step : ``f(centroids [G, H] or None, released sums) -> centroids [G, H]``, the
        centroids broadcast next round under oblivious grouping (honest:
        :func:`gfmfr_secure.roles.server._update_centroids`); crafting them steers the
        clients' group choice.
    merge_groups : ``f(counts [G], centroids, floor) -> int64 [G]`` the merge of groups below
        the floor the server announces (honest:
        :func:`gfmfr_secure.server.grouping.merge_small_groups`); the identity ignores the floor.
    count_phase : the count phase as the server runs it and reports it,
        ``f(aggregator, upload, groups, n_groups, dp, secrets, round) -> (counts [G], cost)``
        (honest: :func:`gfmfr_secure.simulation.group_floor.count_phase`); a lying server
        changes the counts it reports.
    counts_checked : False switches off the clients' check of the reported counts against
        the count phase's evidence (to measure what the check stops).
    """

    centroid_step: Callable[[np.ndarray | None, AggregateResult], np.ndarray] | None = None
    merge_groups: Callable[[np.ndarray, np.ndarray | None, int], np.ndarray] | None = None
    count_phase: Callable[..., tuple[np.ndarray, dict[str, float]]] | None = None
    counts_checked: bool = True

    def install(self, server: Any, clients: Any) -> None:
        """Replace the steps on a :class:`~gfmfr_secure.roles.server.FederatedServer` and the
        :class:`~gfmfr_secure.roles.inprocess.InProcessClients` that simulate the protocol."""
        server.centroid_step, server.merge_groups = self.centroid_step, self.merge_groups
        clients.count_phase = self.count_phase
        clients.check_counts = None if self.counts_checked else accept_any_counts
