"""Small array helpers shared by the data modules."""

from __future__ import annotations

import numpy as np

__all__ = ["preview", "sorted_unique"]

_MAX_LISTED = 10


def preview(values: np.ndarray) -> str:
    """Comma-separated preview of at most ten values of ``values`` (``[n]``) for messages."""
    shown = ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """Ascending unique values of a 1-D array ``[n]``.

    Sort-based: on large arrays of distinct integers it is several times faster
    than :func:`numpy.unique` (hash based since numpy 2.3).
    """
    ordered = np.sort(values, kind="stable")
    if ordered.shape[0] < 2:
        return ordered
    keep = np.empty(ordered.shape[0], dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]
