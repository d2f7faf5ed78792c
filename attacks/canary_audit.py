"""DP audit with crafted canary updates (in the spirit of Andrew et al., 2024).

Each round, ``n_canaries`` synthetic clients are each included with probability 1/2;
an included canary uploads a crafted update: a fresh random unit direction ``v`` over
the item table, scaled to the clip C (the largest contribution DP allows). The adversary
is the server: it reads the released sum of item-table deltas from its recorded view
and scores every canary, in or out, by ``<released sum, v> / C``. With a high-dimensional
table, other clients' updates are nearly orthogonal to ``v``, so the score is about 1
when the canary was in and about 0 when out, blurred by the DP noise (std sigma * Delta / C
along ``v``) and by the other clients' projection. The in/out scores of all canaries and
rounds give :func:`attacks.audit.empirical_epsilon`, a Clopper-Pearson lower bound on
epsilon, checked against the accountant's epsilon (:func:`attacks.audit.check_audit`).

Caveat, as for every multi-canary audit: canaries of one run share noise draws, so the
confidence level is approximate; rounds compose, so the per-round bound is compared with
the epsilon of the whole run (a conservative comparison for the accountant).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from attacks.audit import check_audit, empirical_epsilon
from gfmfr_secure.rng import derive_seed, numpy_rng, torch_generator
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.types import AdversaryView, CohortUpdate

__all__ = ["canary_directions", "gradient_canary_audit"]


def canary_directions(seed: int, round_idx: int, n_canaries: int, n_items: int, dim: int) -> torch.Tensor:
    """[K, I, d] unit-norm random directions of one round's canaries (each over the whole table)."""
    v = torch.randn((n_canaries, n_items, dim), generator=torch_generator(seed, "canary-dir", round_idx))
    return v / v.flatten(1).norm(dim=1).view(-1, 1, 1)


def _append_canaries(upload: CohortUpdate, dirs: torch.Tensor, members: np.ndarray, clip: float, first_id: int, groups_rng: np.random.Generator, n_groups: int) -> CohortUpdate:
    """The cohort's uploads plus one dense upload ``clip * v_k`` per member canary."""
    idx = np.flatnonzero(members)
    if idx.size == 0:
        return upload
    k, n_items, d = idx.size, dirs.shape[1], dirs.shape[2]
    rows = np.tile(np.arange(n_items, dtype=np.int64), k)
    ptr = np.concatenate([upload.row_ptr, upload.row_ptr[-1] + n_items * np.arange(1, k + 1)]).astype(np.int64)
    head = None if upload.head_delta is None else torch.cat([upload.head_delta, torch.zeros(k, upload.head_delta.shape[1])])
    groups = groups_rng.integers(0, max(n_groups, 1), size=k) if (upload.group >= 0).any() else np.full(k, -1)
    return dataclasses.replace(
        upload,
        clients=np.concatenate([upload.clients, first_id + idx]).astype(np.int64),
        n_samples=np.concatenate([upload.n_samples, np.zeros(k, dtype=upload.n_samples.dtype)]),
        row_ptr=ptr,
        row_items=np.concatenate([upload.row_items, rows]),
        item_delta=torch.cat([upload.item_delta, (clip * dirs[torch.from_numpy(idx)]).reshape(-1, d)]),
        head_delta=head,
        head_after=None,
        group=np.concatenate([upload.group, groups.astype(np.int64)]),
        loss=np.concatenate([upload.loss, np.zeros(k)]),
    )


def gradient_canary_audit(
    cfg: Any, data: Any, split: Any, *, n_canaries: int = 50, seed: int = 0, alpha: float = 0.05, scale: float = 1.0
) -> dict[str, Any]:
    """Run ``cfg`` once with canary updates inserted every round and audit its claimed epsilon.

    Needs ``grouping.method`` oblivious or none (canaries choose their group at random)
    and uniform weighting. Raises :class:`attacks.audit.AuditViolation` when the empirical
    lower bound exceeds the accountant's epsilon. ``scale`` multiplies the canary's norm; it
    must be at most 1 under DP (a canary above the clip C would break the sensitivity the
    accountant assumes), and may be larger without DP to show the audit's power.

    Returns
    -------
    dict with the bound (``eps_lower``), the claimed epsilon and its source, counts, and
    the in/out scores.
    """
    if n_canaries < 2:
        raise ValueError(f"n_canaries must be >= 2, got {n_canaries}")
    pc = cfg.privacy
    dp_on = pc.mechanism in ("central", "distributed", "local")
    if not (0 < scale < math.inf) or (dp_on and scale > 1.0):
        raise ValueError(f"canary scale must be in (0, 1] under DP (and > 0 and finite otherwise), got {scale!r}")
    clip = (float(pc.clip) if (dp_on and math.isfinite(pc.clip)) else 1.0) * float(scale)
    n_items, d = split.n_items, cfg.model.latent_dim
    first_id = split.n_users  # canary ids follow the real users
    members: dict[int, np.ndarray] = {}
    released: dict[int, torch.Tensor] = {}
    n_groups = cfg.grouping.num_groups if cfg.distill.enabled else 1

    def hook(upload: CohortUpdate, t: int) -> CohortUpdate:
        m = numpy_rng(seed, "canary-in", t).random(n_canaries) < 0.5
        members[t] = m
        dirs = canary_directions(seed, t, n_canaries, n_items, d)
        return _append_canaries(upload, dirs, m, clip, first_id, numpy_rng(seed, "canary-group", t), n_groups)

    def record(view: AdversaryView) -> None:
        if view.observer == "server":
            released[view.round] = view.received["item_sum"].clone()

    run = run_federated(cfg, data, split, progress=False, upload_hook=hook, callbacks=[record])
    scores_in, scores_out = [], []
    for t, m in members.items():
        if t not in released:
            continue
        dirs = canary_directions(seed, t, n_canaries, n_items, d)
        s = (dirs * released[t].unsqueeze(0)).flatten(1).sum(1).numpy() / clip
        scores_in.append(s[m])
        scores_out.append(s[~m])
    s_in, s_out = np.concatenate(scores_in), np.concatenate(scores_out)
    p = run.metrics["privacy"]
    if p.get("mechanism", "none") == "none":
        claimed, source, delta = math.inf, "no DP", float(pc.delta)
    elif p.get("epsilon") is not None:
        claimed, source, delta = float(p["epsilon"]), "accountant", float(p["delta"])
    else:
        claimed, source, delta = float(p.get("epsilon_if_covered", math.inf)), "accountant (withheld: coverage)", float(p["delta"])
    audit = empirical_epsilon(s_in, s_out, delta, alpha=alpha)
    check_audit(audit, claimed)
    return {
        "eps_lower": float(audit.eps_lb),
        "eps_claimed": claimed,
        "claimed_source": source,
        "delta": delta,
        "n_in": int(s_in.size),
        "n_out": int(s_out.size),
        "mean_in": float(s_in.mean()),
        "mean_out": float(s_out.mean()),
        "std_out": float(s_out.std()),
        "rounds": len(released),
        "passed": True,
        "seed": seed,
        "derived_seed": derive_seed(seed, "canary-audit"),
        "scores_in": s_in,
        "scores_out": s_out,
    }
