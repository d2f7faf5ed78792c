"""Noise on the released group-indexed sums.

What a round releases (DESIGN sections 3 and 4) is one vector per group ``g``::

    block_g = [ sum of item-table deltas (I * d) | sum of head deltas (H) | count coordinate (1) ]

Each client writes its clipped update (norm <= C) into its group's block and
``kappa = count_scale * C`` into that block's count coordinate, so one client
changes the released vector by at most ``Delta = sqrt(C^2 + kappa^2)`` in L2.
Gaussian noise of std ``sigma * Delta`` on every coordinate of every block makes
the release a Gaussian mechanism with noise multiplier sigma. The global FedAvg
sum is the sum of the blocks, the cohort size their decoded counts: both are
post-processing. Without groups there is one block.

Noise comes from two places: the central draw (by whoever releases the sum), and
per-client shares (distributed or local DP) that are part of each client's upload.
Both are drawn by :func:`gfmfr_secure.rng.secret_normal` from secret keys
(:class:`gfmfr_secure.rng.SecretSource`: the OS CSPRNG by default, the run seed
only in the labelled ``reproducible`` mode). A share is regenerated from the
round's share key and the client id, so an attack harness holding the
:class:`NoiseShares` record can rebuild exactly the noisy upload a client sent
without the simulation storing it; the run seed alone does not give it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gfmfr_secure.rng import SecretSource, secret_normal
from gfmfr_secure.types import AggregateResult

__all__ = ["NoiseShares", "Release", "ReleaseLayout", "ReleaseNoise", "central_noise", "noise_release"]


@dataclass(frozen=True)
class ReleaseLayout:
    """Shape of the released vector.

    Attributes
    ----------
    n_groups : number of blocks (1 when no group-wise sums are released).
    n_items, latent_dim : I and d of the item table.
    head_size : H (0 when heads are private).
    count_value : what each client writes into its count coordinate (kappa).
    write_count : False when the counts were already released in an earlier phase of the
        round (the group floor of oblivious grouping): clients then write 0 into the count
        coordinate, so the count is not released twice, and the released count coordinate
        is noise only.
    """

    n_groups: int
    n_items: int
    latent_dim: int
    head_size: int
    count_value: float
    write_count: bool = True

    @property
    def block_size(self) -> int:
        """Coordinates of one group's block: ``I * d + H + 1``."""
        return self.n_items * self.latent_dim + self.head_size + 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(G, block_size)``."""
        return (self.n_groups, self.block_size)


@dataclass(frozen=True)
class NoiseShares:
    """The Gaussian noise each client adds to its own upload (distributed or local DP).

    Attributes
    ----------
    key : the round's 32-byte secret share key (``SecretSource.key("dp-share", round)``);
        client ``u``'s share is the noise stream ``u`` under it. It stands for the
        clients' own secret randomness: the server never holds it.
    round : round index.
    clients : int64 [n] user ids, in cohort order.
    std : per-coordinate std of each share.
    layout : the released vector's layout; each share has ``layout.shape``.
    """

    key: bytes
    round: int
    clients: np.ndarray
    std: float
    layout: ReleaseLayout

    def client(self, position: int) -> torch.Tensor:
        """[G, block] the share of the client at cohort ``position`` (deterministic given the key)."""
        return secret_normal(self.key, self.layout.shape, self.std, stream=int(self.clients[position]))

    def sum_by_group(self, groups: np.ndarray | None = None, n_groups: int | None = None) -> torch.Tensor:
        """[G, block] sum of all shares.

        With ``groups`` (int64 [n]; the server's grouping of clients whose upload
        was a single block) and ``n_groups`` (G, default the layout's), client ``i``'s
        share lands in block ``groups[i]`` of a [G, block] sum and groups of -1 are
        dropped; otherwise shares are already group-laid-out and are summed block by block.
        """
        if groups is not None and self.layout.n_groups != 1:
            raise ValueError("sum_by_group(groups) places single-block shares; these shares are laid out in groups already")
        blocks = self.layout.n_groups if groups is None or n_groups is None else int(n_groups)
        total = torch.zeros((blocks, self.layout.block_size), dtype=torch.float64)
        if self.std == 0.0:
            return total.float()
        for i in range(self.clients.size):  # one regenerable share per client
            share = self.client(i).double()
            if groups is None:
                total += share
            elif groups[i] >= 0:
                total[int(groups[i])] += share.sum(0)
        return total.float()


def _decode_counts(raw: torch.Tensor, layout: ReleaseLayout) -> torch.Tensor:
    return raw / layout.count_value


def noise_release(agg: AggregateResult, noise: torch.Tensor, layout: ReleaseLayout) -> AggregateResult:
    """Add ``noise`` [G, block] to the released sums and derive the global sums from them.

    ``agg`` holds exact sums (group sums when ``layout.n_groups`` blocks are
    released with groups, otherwise only global sums and ``n_clients``). The
    result's group sums, counts, global sums and ``weight_total`` are all computed
    from the noised blocks (global = sum over blocks), so the server learns
    nothing beyond the noised release. Counts are decoded from the count
    coordinate (``raw / kappa``); ``weight_total`` is clamped at 1.

    Raises
    ------
    ValueError
        If ``noise`` does not have the layout's shape, or group sums are missing
        while more than one block is released.
    """
    if tuple(noise.shape) != layout.shape:
        raise ValueError(f"noise must have shape {layout.shape}, got {tuple(noise.shape)}")
    n_i, d, h = layout.n_items, layout.latent_dim, layout.head_size
    n_item = n_i * d
    noise_item = noise[:, :n_item].reshape(layout.n_groups, n_i, d)
    noise_head = noise[:, n_item : n_item + h]
    noise_count = _decode_counts(noise[:, -1], layout)
    if agg.group_counts is not None:
        if agg.group_item_sum is None or agg.group_counts.numel() != layout.n_groups:
            raise ValueError(f"group sums for {layout.n_groups} groups are needed to release {layout.n_groups} blocks")
        counts = agg.group_counts + noise_count
        g_item = agg.group_item_sum + noise_item
        g_head = None if agg.group_head_sum is None else agg.group_head_sum + noise_head
        item_sum = agg.item_sum + noise_item.sum(0)
        head_sum = None if agg.head_sum is None else agg.head_sum + noise_head.sum(0)
    else:
        if layout.n_groups != 1:
            raise ValueError(f"without group sums only one block can be released, layout has {layout.n_groups}")
        counts = g_item = g_head = None
        item_sum = agg.item_sum + noise_item[0]
        head_sum = None if agg.head_sum is None else agg.head_sum + noise_head[0]
    n_noisy = float(agg.n_clients + noise_count.sum())
    return dataclasses.replace(
        agg,
        weight_total=max(n_noisy, 1.0),
        item_sum=item_sum,
        head_sum=head_sum,
        group_counts=counts,
        group_item_sum=g_item,
        group_head_sum=g_head,
    )


def central_noise(layout: ReleaseLayout, std: float, key: bytes) -> torch.Tensor:
    """[G, block] the central draw of one round from a secret 32-byte ``key`` (std 0 gives zeros)."""
    if std == 0.0:
        return torch.zeros(layout.shape)
    return secret_normal(key, layout.shape, std)


@dataclass(frozen=True)
class ReleaseNoise:
    """All the DP noise of one round's release, handed to the aggregation backend.

    Attributes
    ----------
    layout : the released vector's layout.
    central : [G, block] the releasing party's draw (zeros when the clients carry all the noise).
    shares : the clients' own shares (distributed or local DP), or None.
    """

    layout: ReleaseLayout
    central: torch.Tensor
    shares: NoiseShares | None

    @property
    def has_central(self) -> bool:
        """Whether the releasing party must add noise itself."""
        return bool(self.central.abs().sum() > 0)

    def total(self) -> torch.Tensor:
        """[G, block] central draw plus the sum of every client's share."""
        out = self.central.clone()
        if self.shares is not None:
            out += self.shares.sum_by_group()
        return out


@dataclass(frozen=True)
class Release:
    """Who adds which DP noise to one released vector, for the configured user-level mechanism.

    ``central``: the releasing party (the server that forms or receives the sums under
    ``plain``, the key holder under ``ckks``; ``masking`` is refused by
    :func:`gfmfr_secure.config_rules.validate`) draws std ``sigma * Delta`` per coordinate
    (:meth:`central`), the clients add nothing. ``distributed``: each client adds a share
    (:meth:`shares`) sized so that the honest clients that reach the sum carry all the
    noise; the releasing party adds nothing. ``local``: each client adds its whole local
    noise as its share. The stds are the plan's (:meth:`UserLevelDP.central_std`,
    :meth:`UserLevelDP.share_std`); the keys are ``{kind}-central`` (the releasing party's)
    and ``{kind}-share`` (the clients') of the round, one ``kind`` per released vector:
    ``dp`` for a round's sums, ``dp-count`` for the group floor's count phase.

    Attributes
    ----------
    dp : the run's :class:`~gfmfr_secure.privacy.plan.UserLevelDP`.
    layout : the released vector's layout.
    round : round index.
    kind : the key prefix of this vector's noise.
    """

    dp: Any
    layout: ReleaseLayout
    round: int
    kind: str = "dp"

    def share_std(self, n_clients: int, min_reporting: int | None = None) -> float:
        """Std of each client's share when ``n_clients`` upload and at least ``min_reporting`` reach the sum (0: no shares)."""
        return float(self.dp.share_std(n_clients, min_reporting))

    def central(self, source: SecretSource) -> torch.Tensor:
        """[G, block] the releasing party's draw (zeros unless the mechanism is ``central``)."""
        return central_noise(self.layout, self.dp.central_std(), source.key(f"{self.kind}-central", self.round))

    def shares(self, source: SecretSource, clients: np.ndarray, n_clients: int, min_reporting: int | None = None) -> NoiseShares | None:
        """The shares ``clients`` [n] add to their uploads, or None when the clients add no noise."""
        std = self.share_std(n_clients, min_reporting)
        return NoiseShares(source.key(f"{self.kind}-share", self.round), self.round, clients, std, self.layout) if std > 0 else None
