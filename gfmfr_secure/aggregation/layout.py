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

__all__ = ["DenseRows", "decode_sum", "dense_uploads"]


def _client_groups(update: CohortUpdate, layout: ReleaseLayout, groups: np.ndarray | None) -> np.ndarray:
    """int64 [n] each client's block (all 0 without groups), checked against the layout."""
    n = len(update)
    if groups is None:
        if layout.n_groups != 1:
            raise ValueError(f"a layout of {layout.n_groups} blocks needs each client's group")
        return np.zeros(n, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != (n,) or (n and (groups.min() < 0 or groups.max() >= layout.n_groups)):
        raise ValueError(f"groups must be {n} ids in [0, {layout.n_groups - 1}]")
    return groups


def dense_uploads(update: CohortUpdate, layout: ReleaseLayout, groups: np.ndarray | None) -> np.ndarray:
    """float32 [n, G * block]: every client's dense upload.

    Parameters
    ----------
    update : the cohort's (clipped) sparse updates.
    layout : the layout; ``layout.n_groups`` blocks.
    groups : int64 [n] each client's own group, or None (one block).
    """
    n, n_items, d = len(update), layout.n_items, layout.latent_dim
    groups = _client_groups(update, layout, groups)
    if layout.head_size and update.head_delta is None:
        raise ValueError("the layout has a head part but the update has no head deltas")
    block, g = layout.block_size, layout.n_groups
    out = np.zeros((n, g * block), dtype=np.float32)
    # one row per (client, group) block; writing whole d-rows (and the head span) through
    # basic slices keeps the fancy indices 1-D (an [R, d] index array is 64x the rows' size)
    blocks = out.reshape(n * g, block)
    own = np.arange(n) * g + groups  # [n] row of each client's own block
    item_rows = blocks[:, : n_items * d].reshape(n * g, n_items, d, copy=False)  # a view: the writes land in out
    item_rows[own[update.row_owner], update.row_items] = update.item_delta.numpy()
    if layout.head_size:
        blocks[own, n_items * d : n_items * d + layout.head_size] = update.head_delta.numpy()
    if layout.write_count:
        blocks[own, block - 1] = layout.count_value
    return out


class DenseRows:
    """The rows of :func:`dense_uploads` (plus each client's DP noise share), one client at a time.

    A secure backend encodes and masks one client's upload after another; building each
    row when it is needed keeps the [n, G * block] matrix (2.2 GB for ML-100K at G = 5)
    from ever existing, and writing it into the caller's buffer keeps the memory warm.

    Attributes
    ----------
    shape : ``(n, G * block)``.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, update: CohortUpdate, layout: ReleaseLayout, groups: np.ndarray | None, noise: ReleaseNoise | None = None) -> None:
        if layout.head_size and update.head_delta is None:
            raise ValueError("the layout has a head part but the update has no head deltas")
        self._update, self._layout = update, layout
        self._groups = _client_groups(update, layout, groups)
        self._shares = None if noise is None else noise.shares
        self._items = update.item_delta.numpy()
        self._head = None if not layout.head_size else update.head_delta.numpy()
        self.shape = (len(update), layout.n_groups * layout.block_size)

    def __len__(self) -> int:
        return self.shape[0]

    def row(self, u: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 [G * block]: client ``u``'s dense upload, written into ``out`` when given."""
        lay, up = self._layout, self._update
        if out is None:
            out = np.empty(self.shape[1], dtype=np.float32)
        elif out.shape != (self.shape[1],) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 [{self.shape[1]}], got {out.dtype} {out.shape}")
        n_items, d, block = lay.n_items, lay.latent_dim, lay.block_size
        out.fill(0.0)
        own = out[int(self._groups[u]) * block : (int(self._groups[u]) + 1) * block]
        a, b = int(up.row_ptr[u]), int(up.row_ptr[u + 1])
        own[: n_items * d].reshape(n_items, d, copy=False)[up.row_items[a:b]] = self._items[a:b]
        if lay.head_size:
            own[n_items * d : n_items * d + lay.head_size] = self._head[u]
        if lay.write_count:
            own[-1] = lay.count_value
        if self._shares is not None:
            out += self._shares.client(u).reshape(-1).numpy()  # as noisy_dense_uploads: data first, then the share
        return out

    def stack(self) -> np.ndarray:
        """float32 [n, G * block]: every row (what :func:`noisy_dense_uploads` returns)."""
        out = np.empty(self.shape, dtype=np.float32)
        for u in range(self.shape[0]):
            self.row(u, out[u])
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
    """float32 [n, G * block]: each client's dense upload plus its own noise share (:class:`DenseRows`, stacked)."""
    if noise is None or noise.shares is None:
        return dense_uploads(update, layout, groups)
    return DenseRows(update, layout, groups, noise).stack()


def check_uniform(weights: np.ndarray, backend: str) -> None:
    """Secure sums are unweighted: FedAvg weights must all be 1."""
    if not np.all(np.asarray(weights) == 1.0):
        raise ConfigError(f"aggregation.backend={backend!r} sums uploads without weights: set train.weighting=uniform")
