"""Aggregation backends: turn a cohort's uploads into what the server may learn."""

from gfmfr_secure.aggregation.base import (
    AGGREGATORS,
    Aggregator,
    get_aggregator,
    group_sums,
    register_aggregator,
)
from gfmfr_secure.aggregation.ckks import CKKSAggregatorBackend
from gfmfr_secure.aggregation.masking import MaskingAggregator
from gfmfr_secure.aggregation.plain import PlainAggregator

__all__ = ["AGGREGATORS", "Aggregator", "CKKSAggregatorBackend", "MaskingAggregator", "PlainAggregator", "get_aggregator", "group_sums", "register_aggregator"]
