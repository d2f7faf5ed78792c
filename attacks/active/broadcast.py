"""Attack 1: a crafted broadcast that makes one client's upload stand out of the secure sum.

Threat model: the server follows the aggregation protocol but chooses what it broadcasts
(the shared item table and head; it could as well shape the teacher scores). Under
``masking`` it learns only the sum of the cohort's dense uploads.

The crafted model (RAIFLE-style adversarial item/head values, Arevalo et al. NDSS 2025,
adapted to the ``dot`` scorer whose logit is ``(e_u + w2) . (C[i] + P_u[i]) + b2``):
``w2`` is multiplied by ``gain`` so that the user vector is ``~ gain * w2`` whatever the
private ``e_u``, and ``b2`` is set to ``bias`` (very negative), so every prediction is
about 0. Then every local step moves a positive row by the full ``lr * v`` along
``+w2`` and leaves negatives (``p - y ~ 0``) in place: the client's upload is its
training set, written along a direction the server chose, ``gain`` times larger than
an honest update.

* **Inconsistent** (model inconsistency, Pasquini et al. CCS 2022): only the target gets
  the crafted model; the others get the honest one. The sum's projection on ``w2`` is
  the target's training set plus the others' small, unaligned rows.
* **Uniform**: every client gets the crafted model. Every client's rows then align; the
  sum is a popularity count of the cohort and says no more about the target than an
  honest sum does. No client-side check can tell this model from a trained one.

The client-side defence against the first is
:func:`gfmfr_secure.client.checks.check_consistent_broadcast`: every client signs the
digest of what it received, and refuses to upload when a neighbour's digest differs or
too few neighbours attest. The adversary routes each client only the attestations that
agree with it (its best move: the others keep uploading and the round goes on), so the
target sees none and refuses. User-level DP bounds what is left: clipping caps the
target's update at C whatever the gain, and the noise of the release drowns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attacks.active.harness import concat_updates, initial_state, local_round, secure_release, target_inference
from gfmfr_secure import schedules
from gfmfr_secure.client.checks import ClientRefusal, attest_broadcast, broadcast_digest, check_consistent_broadcast
from gfmfr_secure.data import Split
from gfmfr_secure.models.params import SharedParams
from gfmfr_secure.simulation.dp import clip_upload

__all__ = ["MODES", "BroadcastOutcome", "amplifying_broadcast", "broadcast_attack", "consistency_refusals", "positive_step"]

MODES = ("honest", "inconsistent", "uniform")


def amplifying_broadcast(shared: SharedParams, *, gain: float = 100.0, bias: float = -1000.0) -> SharedParams:
    """The crafted model: ``w2 * gain`` and ``b2 = bias``, everything else as ``shared`` (``dot`` scorer)."""
    crafted = shared.clone()
    crafted.w2.mul_(gain)
    crafted.b2.fill_(bias)
    return crafted


def consistency_refusals(round_id: int, digests: dict[int, bytes], *, min_matching: int) -> list[int]:
    """Clients that refuse to upload after the broadcast-consistency check (complete graph).

    Every client signs its digest with its own identity key; the adversary routes to each
    client only the attestations equal to its digest (withholding the ones that would
    expose the lie). Returns the ids of the clients whose check raised.
    """
    keys = {u: Ed25519PrivateKey.generate() for u in digests}
    pki = {u: k.public_key().public_bytes_raw() for u, k in keys.items()}
    signed = {u: attest_broadcast(keys[u], u, round_id, dg) for u, dg in digests.items()}
    refused = []
    for u, own in digests.items():
        routed = [signed[v] for v in digests if v != u and digests[v] == own]
        try:
            check_consistent_broadcast(u, round_id, own, routed, pki, digests.keys(), min_matching)
        except ClientRefusal:
            refused.append(u)
    return refused


@dataclass(frozen=True)
class BroadcastOutcome:
    """One run of the attack.

    Attributes
    ----------
    mode : the broadcast mode.
    metrics : what the released sum says about the target's items (also when the target
        refused and the sum is the others' alone: then it is what the server learns anyway).
    refused : clients whose consistency check refused to upload.
    target_norm : L2 norm of the target's item-table update before clipping (0 when it refused).
    """

    mode: str
    metrics: dict[str, float]
    refused: tuple[int, ...]
    target_norm: float


def broadcast_attack(
    cfg: Any, split: Split, cohort: np.ndarray, target: int, *, mode: str, check: bool = False, dp: Any = None,
    gain: float = 100.0, bias: float = -1000.0, round_idx: int = 0,
) -> BroadcastOutcome:
    """Run one round with an honest, inconsistent or uniform crafted broadcast and score the target.

    Parameters
    ----------
    cfg : the run's config (``model.scorer: dot``; ``aggregation.backend`` is the release path).
    split : the data; cohort : int64 [n] the round's clients, ``target`` among them.
    mode : ``honest``, ``inconsistent`` (target alone gets the crafted model) or ``uniform``.
    check : clients run the broadcast-consistency check before uploading.
    dp : a user-level DP plan (clipping, and the release's noise), or None.

    Returns
    -------
    BroadcastOutcome: ``metrics`` is :func:`attacks.active.harness.target_inference` on the
    released item-table sum, scored along the broadcast ``w2`` (the direction the server
    chose), a row called positive above half of :func:`positive_step`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if cfg.model.scorer != "dot":
        raise ValueError("the amplifying broadcast is built for model.scorer=dot")
    cohort = np.asarray(cohort, dtype=np.int64)
    backbone, shared, store = initial_state(cfg, split)
    crafted = amplifying_broadcast(shared, gain=gain, bias=bias)
    gets_crafted = {"honest": np.zeros(cohort.size, bool), "inconsistent": cohort == target, "uniform": np.ones(cohort.size, bool)}[mode]
    digest = {False: broadcast_digest(round_idx, _parts(shared)), True: broadcast_digest(round_idx, _parts(crafted))}
    refused: list[int] = []
    if check:
        threshold = max(2, int(np.ceil(cfg.aggregation.threshold_fraction * cohort.size)))
        refused = consistency_refusals(round_idx, {int(u): digest[bool(c)] for u, c in zip(cohort, gets_crafted)}, min_matching=threshold - 1)
    uploading = ~np.isin(cohort, refused)
    parts = [local_round(cfg, backbone, model, store, cohort[uploading & (gets_crafted == flag)], split, round_idx) for flag, model in ((False, shared), (True, crafted)) if (uploading & (gets_crafted == flag)).any()]
    update = concat_updates(*parts)
    position = np.flatnonzero(update.clients == target)
    target_norm = float(update.dense_item_delta(int(position[0]), split.n_items).norm()) if position.size else 0.0
    update, _ = clip_upload(update, dp, cfg)
    agg, _ = secure_release(cfg, update, split.n_items, dp=dp, round_idx=round_idx)
    model = crafted if mode != "honest" else shared
    metrics = target_inference(agg.item_sum.numpy(), split.train_of(target), direction=model.w2.numpy(), threshold=positive_step(cfg, model, split.n_items, round_idx) / 2)
    return BroadcastOutcome(mode, metrics, tuple(refused), target_norm)


def positive_step(cfg: Any, broadcast: SharedParams, n_items: int, round_idx: int = 0) -> float:
    """The least a positive row moves along ``w2`` in one round under the crafted model: ``E * lr * |w2| / B``.

    With every prediction at 0 a positive's gradient is ``-v / n_batch`` with ``v ~ w2`` and
    ``n_batch <= B`` (the batch size), once per local epoch; the server knows all of it.
    """
    tc = cfg.train
    lr = schedules.item_lr(round_idx, tc.lr, tc.item_lr_scale, n_items, tc.item_lr_decay)
    return float(tc.local_epochs * lr * broadcast.w2.norm() / tc.batch_size)


def _parts(shared: SharedParams) -> dict[str, Any]:
    """What a client hashes of the broadcast model (a GFMFR round adds ``teacher`` and ``centroids``)."""
    return {"item_table": shared.item_table, "head": shared.head_flat(), "teacher": None, "centroids": None}
