"""One-run DP audit with crafted canary clients (Steinke, Nasr and Jagielski, 2023).

``m`` synthetic canary clients are each included in the run independently with
probability 1/2 (the coin flips are drawn once, before training). Every canary has a
fixed random unit direction ``v_k`` over the item table and a fixed group block
``g_k``; an included canary uploads ``C * v_k`` (the clip C: the largest contribution
the mechanism's sensitivity allows) in every round in which it takes part: every
round at ``train.client_fraction = 1``, else in each round independently with
probability ``client_fraction``, as the accountant's Poisson sampling assumes of any
user. A canary is thus one user of the run, and its score is compared with the
epsilon of the *whole run* (user-level, every round composed).

The adversary is the server. It reads the released, noised sums from its view, and
scores canary ``k`` by ``sum_t <S_t[g_k], v_k> / C``: the projection of its own
group block ``S_t[g_k]`` (the released sum of group ``g_k``'s item deltas; the
global sum when no groups are released) on its direction, summed over rounds. Only
that block's noise blurs the score, not the noise of every block. Other clients'
updates are nearly orthogonal to a random direction of the ``I * d``-dimensional
table.

The guesses (top ``k`` in, bottom ``k`` out) and the bound are those of
:func:`attacks.audit.one_run_audit`: a valid ``1 - beta`` lower bound on epsilon
from a single run. ``attainable`` is the bound a perfect attacker would reach with
this many canaries; when it is below the claimed epsilon the audit cannot fail,
and a warning says so.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import torch

from attacks.audit import one_run_audit
from gfmfr_secure.rng import numpy_rng, torch_generator
from gfmfr_secure.simulation.loop import run_federated
from gfmfr_secure.types import AdversaryView, CohortUpdate

__all__ = ["AuditPowerWarning", "canary_directions", "gradient_canary_audit"]


class AuditPowerWarning(UserWarning):
    """The canaries cannot give a bound above the claimed epsilon: the audit cannot fail."""


def canary_directions(seed: int, n_canaries: int, n_items: int, dim: int) -> torch.Tensor:
    """float32 [m, I, d] unit-norm random directions, one per canary, fixed for the run."""
    v = torch.randn((n_canaries, n_items, dim), generator=torch_generator(seed, "canary-dir"))
    return v / v.flatten(1).norm(dim=1).view(-1, 1, 1)


def _append_canaries(upload: CohortUpdate, dirs: torch.Tensor, idx: np.ndarray, clip: float, first_id: int, groups: np.ndarray) -> CohortUpdate:
    """The cohort's uploads plus one dense upload ``clip * v_k`` for each canary in ``idx``."""
    if idx.size == 0:
        return upload
    k, n_items, d = idx.size, dirs.shape[1], dirs.shape[2]
    rows = np.tile(np.arange(n_items, dtype=np.int64), k)
    ptr = np.concatenate([upload.row_ptr, upload.row_ptr[-1] + n_items * np.arange(1, k + 1)]).astype(np.int64)
    head = None if upload.head_delta is None else torch.cat([upload.head_delta, torch.zeros(k, upload.head_delta.shape[1])])
    own = groups[idx] if (upload.group >= 0).any() else np.full(k, -1)
    return dataclasses.replace(
        upload,
        clients=np.concatenate([upload.clients, first_id + idx]).astype(np.int64),
        n_samples=np.concatenate([upload.n_samples, np.zeros(k, dtype=upload.n_samples.dtype)]),
        row_ptr=ptr,
        row_items=np.concatenate([upload.row_items, rows]),
        item_delta=torch.cat([upload.item_delta, (clip * dirs[torch.from_numpy(idx)]).reshape(-1, d)]),
        head_delta=head,
        head_after=None,
        group=np.concatenate([upload.group, own.astype(np.int64)]),
        loss=np.concatenate([upload.loss, np.zeros(k)]),
    )


def _claimed(privacy: dict[str, Any], cfg_delta: float) -> tuple[float, str, float]:
    """(epsilon, where it came from, delta) the run claims for one user over all its rounds."""
    if privacy.get("mechanism", "none") == "none":
        return math.inf, "no DP", float(cfg_delta)
    if privacy.get("epsilon") is not None:
        return float(privacy["epsilon"]), "accountant", float(privacy["delta"])
    return float(privacy.get("epsilon_if_covered", math.inf)), "accountant (withheld: coverage)", float(privacy["delta"])


def gradient_canary_audit(
    cfg: Any, data: Any, split: Any, *, n_canaries: int = 200, seed: int = 0, beta: float = 0.05, scale: float = 1.0
) -> dict[str, Any]:
    """Train ``cfg`` once with canaries inserted and audit its claimed epsilon.

    Needs client-side grouping (``oblivious`` or ``none``) and uniform weighting (the
    loop refuses synthetic clients otherwise). ``scale`` multiplies the canary's norm;
    it must be at most 1 under DP (a canary above the clip C would break the
    sensitivity the accountant assumes), and may be larger without DP.

    Returns
    -------
    dict (JSON-ready except the ``scores`` and ``included`` arrays): ``eps_lower``,
    ``eps_claimed`` and its ``claimed_source``, ``delta``, ``passed``
    (``eps_lower <= eps_claimed``), ``attainable`` and ``can_fail``
    (``attainable > eps_claimed``), the guesses (``k``, ``r``, ``v``), counts and the
    mean scores of included and excluded canaries. A violation does not raise: the
    numbers are returned with ``passed = False``.

    Warns
    -----
    AuditPowerWarning
        ``attainable <= eps_claimed`` for a finite claim: more canaries are needed for the
        audit to be able to fail.
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
    n_groups = max(int(cfg.grouping.num_groups), 1) if (cfg.distill.enabled and cfg.grouping.method != "none") else 1
    included = numpy_rng(seed, "canary-in").random(n_canaries) < 0.5
    groups = numpy_rng(seed, "canary-group").integers(0, n_groups, size=n_canaries)
    dirs = canary_directions(seed, n_canaries, n_items, d)
    fraction = float(cfg.train.client_fraction)
    scores = np.zeros(n_canaries)
    rounds: list[int] = []

    def hook(upload: CohortUpdate, t: int) -> CohortUpdate:
        take = included & ((numpy_rng(seed, "canary-sample", t).random(n_canaries) < fraction) if fraction < 1.0 else True)
        return _append_canaries(upload, dirs, np.flatnonzero(take), clip, first_id, groups)

    def record(view: AdversaryView) -> None:
        if view.observer != "server":
            return
        rec = view.received
        block_of = groups.copy()
        truth_groups = view.truth.get("groups")
        if truth_groups is not None:  # a canary's block after any merge of small groups (the auditor's own clients)
            ids = np.asarray(view.truth["clients"])
            tg = np.asarray(truth_groups)
            if tg.shape != ids.shape:
                raise ValueError(f"round {view.round}: {tg.size} group labels for {ids.size} clients")
            mine = ids >= first_id
            block_of[ids[mine] - first_id] = tg[mine]
        g_sum = rec.get("group_item_sum")
        if g_sum is not None and g_sum.shape[0] > 1:
            for g in range(g_sum.shape[0]):  # each canary on its own group's block
                sel = torch.from_numpy(np.flatnonzero(block_of == g))
                scores[sel.numpy()] += (dirs[sel].flatten(1) @ g_sum[g].flatten().to(dirs.dtype)).double().numpy() / clip
        else:
            scores[:] += (dirs.flatten(1) @ rec["item_sum"].flatten().to(dirs.dtype)).double().numpy() / clip
        rounds.append(view.round)

    run = run_federated(cfg, data, split, progress=False, upload_hook=hook, callbacks=[record])
    claimed, source, delta = _claimed(run.metrics["privacy"], float(pc.delta))
    audit = one_run_audit(scores, included, delta, beta=beta)
    can_fail = audit.attainable > claimed
    if not can_fail and math.isfinite(claimed):
        warnings.warn(
            f"{n_canaries} canaries can give an epsilon lower bound of at most {audit.attainable:.3f}, not above the claimed "
            f"{claimed:.3f}: this audit cannot fail; use more canaries",
            AuditPowerWarning,
            stacklevel=2,
        )
    return {
        "eps_lower": float(audit.eps_lb),
        "eps_claimed": claimed,
        "claimed_source": source,
        "delta": delta,
        "beta": float(beta),
        "passed": bool(audit.eps_lb <= claimed),
        "attainable": float(audit.attainable),
        "can_fail": bool(can_fail),
        "m": int(n_canaries),
        "k": int(audit.k),
        "r": int(audit.r),
        "v": int(audit.v),
        "n_in": int(included.sum()),
        "n_out": int((~included).sum()),
        "mean_in": float(scores[included].mean()) if included.any() else 0.0,
        "mean_out": float(scores[~included].mean()) if (~included).any() else 0.0,
        "rounds": len(rounds),
        "seed": seed,
        "scores": scores,
        "included": included,
    }
