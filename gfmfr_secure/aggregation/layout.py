"""Each client's upload as one dense, group-indexed vector, and the decoding of its sum.

Secure backends cannot sum sparse rows: which rows a client touched would reveal its
items. A client therefore uploads the whole layout of
:class:`~gfmfr_secure.privacy.release.ReleaseLayout`: for every group ``g`` a block
``[item-table delta (I*d) | head delta (H) | count]``, its own group's block filled and
the others zero (oblivious grouping), or a single block when no groups are used.
"""

from __future__ import annotations

import numpy as np
import torch

from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy.release import ReleaseLayout, ReleaseNoise
from gfmfr_secure.types import AggregateResult, CohortUpdate

__all__ = ["decode_sum", "dense_uploads"]


def dense_uploads(update: CohortUpdate, layout: ReleaseLayout, groups: np.ndarray | None) -> np.ndarray:
    """float32 [n, G * block]: every client's dense upload.

    Parameters
    ----------
    update : the cohort's (clipped) sparse updates.
    layout : the layout; ``layout.n_groups`` blocks.
    groups : int64 [n] each client's own group, or None (one block).
    """
    n, n_items, d = len(update), layout.n_items, layout.latent_dim
    if groups is None:
        if layout.n_groups != 1:
            raise ValueError(f"a layout of {layout.n_groups} blocks needs each client's group")
        groups = np.zeros(n, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != (n,) or (n and (groups.min() < 0 or groups.max() >= layout.n_groups)):
        raise ValueError(f"groups must be {n} ids in [0, {layout.n_groups - 1}]")
    block = layout.block_size
    out = np.zeros((n, layout.n_groups * block), dtype=np.float32)
    base = groups * block  # [n] offset of each client's block
    owner = update.row_owner
    cols = base[owner][:, None] + update.row_items[:, None] * d + np.arange(d)[None, :]
    out[owner[:, None], cols] = update.item_delta.numpy()
    if layout.head_size:
        if update.head_delta is None:
            raise ValueError("the layout has a head part but the update has no head deltas")
        out[np.arange(n)[:, None], base[:, None] + n_items * d + np.arange(layout.head_size)[None, :]] = update.head_delta.numpy()
    if layout.write_count:
        out[np.arange(n), base + block - 1] = layout.count_value
    return out


def decode_sum(total: np.ndarray, layout: ReleaseLayout, *, n_clients: int, grouped: bool) -> AggregateResult:
    """Turn the summed layout [G * block] back into the sums the server uses.

    Counts are decoded from the count coordinate (``raw / kappa``); the global sums are
    the sums over blocks; ``weight_total`` is the decoded cohort size (at least 1).
    """
    g, n_items, d, h = layout.n_groups, layout.n_items, layout.latent_dim, layout.head_size
    blocks = torch.as_tensor(np.asarray(total, dtype=np.float64).reshape(g, layout.block_size), dtype=torch.float32)
    g_item = blocks[:, : n_items * d].reshape(g, n_items, d)
    g_head = blocks[:, n_items * d : n_items * d + h] if h else None
    counts = blocks[:, -1] / layout.count_value
    return AggregateResult(
        n_clients=n_clients,
        weight_total=max(float(counts.double().sum()), 1.0),
        item_sum=g_item.sum(0),
        head_sum=None if g_head is None else g_head.sum(0),
        group_counts=counts if grouped else None,
        group_item_sum=g_item if grouped else None,
        group_head_sum=g_head if grouped else None,
    )


def secure_layout(update: CohortUpdate, n_items: int, groups: np.ndarray | None, n_groups: int, noise: ReleaseNoise | None) -> ReleaseLayout:
    """The layout a secure backend sums: the DP layout when DP is on, else one with count 1."""
    if noise is not None:
        return noise.layout
    head = 0 if update.head_delta is None else int(update.head_delta.shape[1])
    return ReleaseLayout(n_groups if groups is not None else 1, n_items, int(update.item_delta.shape[1]), head, 1.0)


def noisy_dense_uploads(update: CohortUpdate, layout: ReleaseLayout, groups: np.ndarray | None, noise: ReleaseNoise | None) -> np.ndarray:
    """float32 [n, G * block]: each client's dense upload plus its own noise share."""
    vectors = dense_uploads(update, layout, groups)
    if noise is not None and noise.shares is not None:
        for i in range(len(update)):
            vectors[i] += noise.shares.client(i).reshape(-1).numpy()
    return vectors


def check_uniform(weights: np.ndarray, backend: str) -> None:
    """Secure sums are unweighted: FedAvg weights must all be 1."""
    if not np.all(np.asarray(weights) == 1.0):
        raise ConfigError(f"aggregation.backend={backend!r} sums uploads without weights: set train.weighting=uniform")
