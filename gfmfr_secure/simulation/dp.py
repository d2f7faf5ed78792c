"""Differential privacy wiring of the federated loop: plans, client-side clipping, the run's privacy report.

The mechanisms and the accounting live in :mod:`gfmfr_secure.privacy`; this module
turns a run's config into them (:func:`plan_privacy`), clips the cohort's uploads on
the client side (:func:`clip_upload`), runs record-level DP-SGD clients
(:class:`RecordLevelDP`) and writes the ``privacy`` block of ``metrics.json``
(:func:`privacy_report`), withholding epsilon where it does not hold.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from gfmfr_secure.privacy.mechanisms import clip_sparse_updates
from gfmfr_secure.privacy.plan import USER_MECHANISMS, UserLevelDP, coverage
from gfmfr_secure.rng import SecretSource
from gfmfr_secure.server.grouping import SERVER_GROUPING
from gfmfr_secure.types import LocalHyper

__all__ = ["DP_HISTORY_FIELDS", "RecordLevelDP", "clip_upload", "plan_privacy", "privacy_report"]

#: What history.json holds per round under user-level DP, and why each field may be there.
#: Statistics of the raw individual updates (mean training loss, median update norm, the
#: exact cohort size, the plain backend's mean upload size) are not written under DP.
DP_HISTORY_FIELDS: dict[str, str] = {
    "round": "round index (public)",
    "dp": "clip in force (from released, noised counts) and epsilon spent (from the ledger)",
    "group_sizes": "released group counts (noised)",
    "fusion_loss": "server fusion loss on the noised group sums (post-processing)",
    "cost": "protocol bytes and seconds of the secure backends (sizes fixed by the layout); dropouts are simulated from public randomness",
    "client_s": "wall-clock seconds, an operator diagnostic (not released by a deployment)",
    "server_s": "wall-clock seconds, an operator diagnostic (not released by a deployment)",
    "grouping_s": "wall-clock seconds, an operator diagnostic (not released by a deployment)",
    "fusion_s": "wall-clock seconds, an operator diagnostic (not released by a deployment)",
    "val": "validation metrics of the released model on users' held-out items: the experimenter's evaluation, outside the release the epsilon covers",
    "skipped": "why a round released no sums (group floor); the test on the exact cohort size is one bit about who was sampled, outside the release the epsilon covers",
}


class RecordLevelDP:
    """``privacy.mechanism=dpsgd``: Opacus DP-SGD inside every client, and its per-client accounting."""

    def __init__(self, pc: Any, seed: int, n_items: int, secrets: SecretSource | None = None) -> None:
        self.pc, self.seed, self.n_items = pc, seed, n_items
        # DP-SGD's batch sampling and noise are secrets: from the OS unless the run is reproducible
        self.secrets = SecretSource("os", seed) if secrets is None else secrets
        self.events: dict[int, list[tuple[float, float, int]]] = {}

    def train(self, shared: Any, store: Any, backbone: Any, cohort: np.ndarray, samples: Any, hyper: LocalHyper, t: int, *, teacher: Any, groups: Any) -> Any:
        from gfmfr_secure.client.dpsgd import (
            train_cohort_dpsgd,  # Opacus is imported only when used
        )

        update, reports = train_cohort_dpsgd(
            shared, store, backbone, cohort, samples.indptr, samples.items, samples.labels, hyper,
            noise_multiplier=self.pc.dpsgd_noise_multiplier, max_grad_norm=self.pc.dpsgd_max_grad_norm,
            seed=self.secrets.int_seed("dpsgd", t), expected_batch_size=self.pc.dpsgd_batch_size,
            delta=self.pc.delta, accountant=self.pc.accountant, teacher=teacher, groups=groups,
            rows=np.arange(self.n_items) if self.pc.dpsgd_all_rows else None,
        )
        for rep in reports:
            self.events.setdefault(int(rep.client), []).append((rep.noise_multiplier, rep.sample_rate, rep.steps))
        # the client keeps its sample count to itself (uniform FedAvg weights)
        return dataclasses.replace(update, n_samples=np.zeros_like(update.n_samples))

    def epsilons(self) -> dict[int, float]:
        """Each client's record-level epsilon over all its rounds (identical histories computed once)."""
        from gfmfr_secure.client.dpsgd import compose_client_epsilon

        cache: dict[tuple[tuple[float, float, int], ...], float] = {}
        out = {}
        for client, hist in self.events.items():
            key = tuple(hist)
            if key not in cache:
                cache[key] = compose_client_epsilon(hist, self.pc.delta, self.pc.accountant)
            out[client] = cache[key]
        return out

    def report(self, cfg: Any, grouping: str, n_groups: int) -> dict[str, Any]:
        eps = self.epsilons()
        worst = max(eps.values()) if eps else 0.0
        # releases the record-level epsilon does not cover: any of them withholds it
        withheld = []
        if not self.pc.dpsgd_all_rows:
            withheld.append("which item rows each client uploads (the items it trained on); set privacy.dpsgd_all_rows=true")
        if n_groups and grouping in SERVER_GROUPING:
            withheld.append(f"{grouping} grouping reads each client's head (covered per record only through DP-SGD's post-processing)")
        if cfg.train.selection == "best-val":
            withheld.append("model selection and early stopping on validation metrics computed from users' held-out items")
        not_covered = [*withheld, "user-level privacy: the unit is one interaction; a user's whole history is not protected"]
        report = {
            "mechanism": "dpsgd",
            "epsilon": None if withheld or self.pc.dpsgd_noise_multiplier == 0 else worst,
            "epsilon_if_covered": worst,
            "epsilon_median_client": float(np.median(list(eps.values()))) if eps else 0.0,
            "delta": self.pc.delta,
            "accountant": self.pc.accountant,
            "unit": "record (one interaction of one client), per client; not user-level",
            "relation": "add or remove one training example of one client",
            "noise_multiplier": self.pc.dpsgd_noise_multiplier,
            "clip": self.pc.dpsgd_max_grad_norm,
            "sample_rate": "per client: 1 / ceil(n_samples / batch)",
            "rounds": max((len(h) for h in self.events.values()), default=0),
            "covers": ["each client's uploaded update (Opacus DP-SGD on its own examples) and everything computed from uploads"],
            "not_covered": not_covered,
        }
        if withheld:
            report["epsilon_withheld_because"] = "; ".join(withheld)
        return report


def plan_privacy(cfg: Any, n_eligible: int, logger: logging.Logger | None = None) -> UserLevelDP | None:
    """The run's user-level DP plan, or None when no user-level mechanism is configured.

    A ``delta`` not well below ``1 / n_eligible`` is warned about on ``logger`` (the run's log).
    """
    pc = cfg.privacy
    if pc.mechanism not in USER_MECHANISMS:  # none, dpsgd
        return None
    tc = cfg.train
    # a client picks its own block only under oblivious grouping (local DP must cover moving between blocks)
    blocks = int(cfg.grouping.num_groups) if cfg.distill.enabled and cfg.grouping.method == "oblivious" else 1
    return UserLevelDP.from_config(pc, sample_rate=tc.client_fraction, rounds=tc.rounds, expected_clients=tc.client_fraction * n_eligible, n_blocks=blocks, logger=logger)


def clip_upload(update: Any, dp: UserLevelDP | None, cfg: Any) -> tuple[Any, torch.Tensor]:
    """Client side: clip each client's whole update to ``dp.clip`` (no-op without DP)."""
    if dp is None:
        return update, torch.zeros(0)
    owner = torch.from_numpy(update.row_owner)
    item, head, norms = clip_sparse_updates(owner, update.item_delta, update.head_delta, len(update), dp.clip, per_tensor=cfg.privacy.clipping == "per-tensor")
    return dataclasses.replace(update, item_delta=item, head_delta=head), norms


def privacy_report(cfg: Any, dp: UserLevelDP | None, grouping: str, n_groups: int) -> dict[str, Any]:
    """The ``privacy`` block of metrics.json; ``epsilon`` is null where it does not hold."""
    pc = cfg.privacy
    if dp is None:
        return {"mechanism": "none", "epsilon": None, "covers": [], "not_covered": ["everything: no differential privacy was applied"]}
    covers, not_covered = coverage(mechanism=dp.mechanism, grouping=grouping, distill=bool(n_groups), selection=cfg.train.selection)
    spent = dp.epsilon()
    report = {
        "mechanism": dp.mechanism,
        "epsilon": None if not_covered or dp.noise_multiplier == 0.0 else spent,
        "epsilon_if_covered": spent,
        "target_epsilon": pc.epsilon,
        "delta": dp.delta,
        "accountant": dp.accountant,
        "unit": "user (all of one client's interactions)",
        "relation": "replace one user's data (local DP, against the server)" if dp.mechanism == "local" else "add or remove one user",
        "noise_multiplier": dp.noise_multiplier,
        "update_noise_multiplier": dp.update_multiplier,
        "calibrated": dp.calibrated,
        "clip": pc.clip,
        "clip_final": dp.clip,
        "clipping": pc.clipping,
        "adaptive_clip": dp.adaptive,
        "count_scale": dp.count_scale,
        # sensitivity / C: of the released sum, or (local DP) of one client's own upload
        "sensitivity_factor": float(dp.local_sensitivity / dp.clip) if dp.mechanism == "local" and np.isfinite(dp.clip) else float(np.sqrt(1.0 + dp.count_scale**2)),
        "sample_rate": dp.sample_rate,
        "rounds": len(dp.ledger),
        "covers": covers,
        "not_covered": not_covered,
        "ledger": dp.ledger.to_dict(),
        "history_fields": dict(DP_HISTORY_FIELDS),
    }
    if not_covered:
        report["epsilon_withheld_because"] = "; ".join(not_covered)
    return report
