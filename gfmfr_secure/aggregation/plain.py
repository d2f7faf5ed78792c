"""``plain``: the server sees every client's update (the paper's setting, no protection)."""

from __future__ import annotations

import numpy as np

from gfmfr_secure.aggregation.base import Aggregator, group_sums, register_aggregator, weighted_sums
from gfmfr_secure.types import AggregateResult, CohortUpdate, Exposure

__all__ = ["PlainAggregator"]


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
    ) -> AggregateResult:
        item_sum, head_sum = weighted_sums(update, n_items, weights)
        counts = g_item = g_head = None
        if groups is not None:
            counts, g_item, g_head = group_sums(update, n_items, groups, n_groups)
        return AggregateResult(
            n_clients=len(update),
            weight_total=float(np.sum(weights)),
            item_sum=item_sum,
            head_sum=head_sum,
            group_counts=counts,
            group_item_sum=g_item,
            group_head_sum=g_head,
            per_client=update,
        )
