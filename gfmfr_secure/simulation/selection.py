"""Model selection on validation only, with early stopping (shared by every trainer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ValidationSelector"]


class ValidationSelector:
    """Keeps the round with the best validation NDCG@10 and a snapshot of its model.

    ``observe`` returns True when ``patience`` validations in a row brought no
    improvement (patience 0 never stops). The test split is scored later, once, on
    ``snapshot``. With ``mode="last"`` every validated round replaces the snapshot
    and nothing stops early: validation is only logged, never acted on.
    """

    def __init__(self, patience: int, metric: str = "NDCG@10", mode: str = "best-val") -> None:
        if mode not in ("best-val", "last"):
            raise ValueError(f"selection mode must be 'best-val' or 'last', got {mode!r}")
        self.mode = mode
        self.patience = patience
        self.metric = metric
        self.best_score = float("-inf")
        self.best_round = -1
        self.best_val: dict[str, float] | None = None
        self.snapshot: Any = None
        self._stale = 0

    def observe(self, round_idx: int, val: dict[str, float], take_snapshot: Callable[[], Any]) -> bool:
        if self.mode == "last":
            self.best_score, self.best_round, self.best_val = val[self.metric], round_idx, val
            self.snapshot = take_snapshot()
            return False
        if val[self.metric] > self.best_score:
            self.best_score, self.best_round, self.best_val = val[self.metric], round_idx, val
            self.snapshot = take_snapshot()
            self._stale = 0
            return False
        self._stale += 1
        return bool(self.patience) and self._stale >= self.patience
