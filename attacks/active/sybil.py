"""Attack 5: Sybil clients fill the target's group; secure aggregation cannot hide the target.

Threat model: the server controls ``k - 1`` clients (Sybils) of its own and places them in
the target's group: under oblivious grouping it isolates the target with crafted
centroids (:mod:`attacks.active.grouping`) and its Sybils pick that group too; the count
phase then reports ``k >= min_group_size`` members, nothing is merged, and the group's
sum is released. The Sybils upload what the server tells them (zeros here) and add no
noise share, so the server knows their part of the sum exactly:

    group sum - Sybils' inputs = the target's upload (+ whatever noise honest parties added).

Every protocol check passes: the masks cancel, the count is true, the threshold is met.
The defence is differential privacy noise in the release: ``central`` (added by the
party that decrypts or releases the sum: ``plain``'s server or ``ckks``'s key holder),
``distributed`` (each honest client's share; the Sybils' shares are missing, which
``privacy.honest_fraction`` must allow for) or ``local``. :func:`sybil_attack` measures
the target's reconstruction error and what the estimate reveals about its items.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from attacks.active.harness import concat_updates, initial_state, local_round, secure_release, target_inference
from gfmfr_secure.data import Split
from gfmfr_secure.simulation.dp import clip_upload
from gfmfr_secure.types import CohortUpdate

__all__ = ["sybil_attack", "sybil_uploads"]


def sybil_uploads(ids: np.ndarray, latent_dim: int, head_size: int, group: int) -> CohortUpdate:
    """Uploads of Sybil clients that change nothing (no item rows, zero head deltas), all in ``group``."""
    k = int(np.asarray(ids).size)
    return CohortUpdate(
        clients=np.asarray(ids, dtype=np.int64), n_samples=np.zeros(k, dtype=np.int64), row_ptr=np.zeros(k + 1, dtype=np.int64),
        row_items=np.zeros(0, dtype=np.int64), item_delta=torch.zeros(0, latent_dim), head_delta=torch.zeros(k, head_size),
        head_after=None, group=np.full(k, group, dtype=np.int64), loss=np.zeros(k),
    )


def sybil_attack(cfg: Any, split: Split, cohort: np.ndarray, target: int, *, n_sybils: int, dp: Any = None, round_idx: int = 0) -> dict[str, float]:
    """One round in which ``n_sybils`` Sybils share group 0 with the target alone.

    Parameters
    ----------
    cfg : the run's config (``aggregation.backend`` and ``grouping.num_groups`` G >= 2 are used).
    split : the data; cohort : int64 [n] honest clients, ``target`` among them; the
        others spread over groups 1..G-1.
    n_sybils : the server's clients in the target's group.
    dp : a user-level DP plan (clipping and the release's noise), or None.

    Returns
    -------
    dict: ``relative_error`` (L2 distance between the server's estimate of the target's
    item-table upload and the upload itself, over the upload's norm), ``count`` (the
    released count of the target's group) and the
    :func:`attacks.active.harness.target_inference` metrics of the estimate.
    """
    n_groups = int(cfg.grouping.num_groups)
    if n_groups < 2:
        raise ValueError("the Sybil attack needs grouping.num_groups >= 2 (the target's group and the others')")
    cohort = np.asarray(cohort, dtype=np.int64)
    backbone, shared, store = initial_state(cfg, split)
    honest, _ = clip_upload(local_round(cfg, backbone, shared, store, cohort, split, round_idx), dp, cfg)
    others = cohort != target
    groups = np.zeros(cohort.size, dtype=np.int64)
    groups[others] = 1 + np.arange(int(others.sum())) % (n_groups - 1)
    honest = dataclasses.replace(honest, group=groups)
    sybils = sybil_uploads(split.n_users + np.arange(n_sybils), shared.latent_dim, int(shared.head_flat().numel()), 0)
    update = concat_updates(honest, sybils)
    agg, shares = secure_release(cfg, update, split.n_items, groups=update.group, n_groups=n_groups, dp=dp, round_idx=round_idx)
    estimate = agg.group_item_sum[0].double()
    if shares is not None:  # the server knows the noise shares its own Sybils added
        n_items, d = split.n_items, shared.latent_dim
        for position in range(len(honest), len(update)):
            estimate -= shares.client(position)[0, : n_items * d].double().view(n_items, d)
    truth = honest.dense_item_delta(int(np.flatnonzero(honest.clients == target)[0]), split.n_items).double()
    out = {"relative_error": float((estimate - truth).norm() / truth.norm()), "count": float(agg.group_counts[0])}
    out.update(target_inference(estimate.numpy(), split.train_of(target)))
    return out

