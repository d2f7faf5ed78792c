"""``plain``: the server sees every client's update (the paper's setting, no protection)."""

from __future__ import annotations

import time

import numpy as np

from gfmfr_secure.aggregation.base import Aggregator, group_sums, register_aggregator, weighted_sums
from gfmfr_secure.privacy.release import ReleaseNoise, noise_release
from gfmfr_secure.types import AggregateResult, CohortUpdate, Exposure

__all__ = ["PlainAggregator", "plain_cost"]


@register_aggregator("plain")
class PlainAggregator(Aggregator):
    """Sums in the clear; exposes each individual update to the server."""

    exposure = Exposure.PER_CLIENT

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
        t0 = time.perf_counter()
        item_sum, head_sum = weighted_sums(update, n_items, weights)
        counts = g_item = g_head = None
        if groups is not None:
            counts, g_item, g_head = group_sums(update, n_items, groups, n_groups)
        result = AggregateResult(
            n_clients=len(update),
            weight_total=float(np.sum(weights)),
            item_sum=item_sum,
            head_sum=head_sum,
            group_counts=counts,
            group_item_sum=g_item,
            group_head_sum=g_head,
            per_client=update,
        )
        if noise is not None:  # the server itself adds the central draw: it has seen every update anyway
            result = noise_release(result, noise.total(), noise.layout)
        self.last_cost = plain_cost(update, time.perf_counter() - t0)
        self.rounds_done += 1
        return result


def plain_cost(update: CohortUpdate, server_s: float) -> dict[str, float]:
    """Bytes a plain client uploads: its touched rows (int64 id + d float32 each), head delta and group."""
    n = max(len(update), 1)
    d = update.item_delta.shape[1]
    rows = update.row_items.size * (8 + 4 * d)
    head = 0 if update.head_delta is None else update.head_delta.numel() * 4
    after = 0 if update.head_after is None else update.head_after.numel() * 4
    return {"bytes_up_per_client": (rows + head + after) / n + 8, "client_s": 0.0, "server_s": server_s}
