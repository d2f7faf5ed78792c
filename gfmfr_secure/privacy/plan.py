"""User-level DP of a federated run: noise sizes, the per-round ledger and the coverage report.

:class:`UserLevelDP` turns a :class:`~gfmfr_secure.config.PrivacyConfig` and the
run's sampling facts into the numbers each round needs (clip, sensitivity, the
central std or each client's share std), records one
:class:`~gfmfr_secure.privacy.accounting.PrivacyEvent` per released round and
answers whether the next round still fits the budget. :func:`coverage` states
which released outputs the epsilon covers, and withholds the epsilon when some
release is not post-processing of noised aggregates.

Mechanisms (DESIGN section 4):

- ``central``: noise std ``sigma * Delta`` added once to each released sum by the
  party that releases it; accounted with sigma at sampling rate q.
- ``distributed``: each of the ``n`` reporting clients adds a share of std
  ``sigma * Delta / sqrt(m)``, ``m = ceil(honest_fraction * n)``, so any ``m``
  honest shares carry the full noise; accounted like ``central``.
- ``local``: each client adds std ``2 C sigma`` to its own upload (replacing one
  user's data moves its clipped update by at most 2C); accounted per client with
  q = 1 (the server sees every upload), i.e. protection against the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy.accounting import (
    PrivacyEvent,
    PrivacyLedger,
    calibrate_noise,
    epsilon_for,
)
from gfmfr_secure.privacy.mechanisms import adaptive_clip_step, split_noise_multiplier

__all__ = ["USER_MECHANISMS", "UserLevelDP", "coverage"]

#: mechanisms whose unit is one user and that this module plans
USER_MECHANISMS = ("central", "distributed", "local")


@dataclass
class UserLevelDP:
    """Noise sizes and the ledger of one run's user-level DP.

    Attributes
    ----------
    mechanism : central | distributed | local.
    noise_multiplier : sigma that is accounted each round (total, before any adaptive split).
    sample_rate : q used for accounting (1 for local DP).
    delta, target_epsilon, accountant : the budget.
    clip : current clip C (changes each round with adaptive clipping).
    count_scale : kappa / C.
    honest_fraction : distributed only.
    update_multiplier : the multiplier left for the update sum (sigma, or less with adaptive clipping).
    count_stddev : std of the noise on the unclipped count (adaptive clipping only).
    ledger : one event per released round.
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    delta: float
    target_epsilon: float
    accountant: str
    clip: float
    count_scale: float
    honest_fraction: float
    adaptive: bool
    target_quantile: float
    clip_lr: float
    update_multiplier: float
    count_stddev: float
    calibrated: bool
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)
    clip_history: list[float] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: Any, *, sample_rate: float, rounds: int, expected_clients: float) -> UserLevelDP:
        """Plan the run: calibrate sigma when needed and split it for adaptive clipping.

        Parameters
        ----------
        cfg : PrivacyConfig with a user-level mechanism.
        sample_rate : Poisson rate q of client sampling.
        rounds : the most rounds the run may take (calibration horizon).
        expected_clients : q times the number of eligible clients.
        """
        if cfg.mechanism not in USER_MECHANISMS:
            raise ConfigError(f"privacy.mechanism={cfg.mechanism!r} is not user-level; known: {', '.join(USER_MECHANISMS)}")
        q = 1.0 if cfg.mechanism == "local" else float(sample_rate)
        calibrated = cfg.noise_multiplier is None
        sigma = calibrate_noise(cfg.epsilon, cfg.delta, q, rounds, cfg.accountant) if calibrated else float(cfg.noise_multiplier)
        if cfg.adaptive_clip and cfg.mechanism == "local":
            raise ConfigError("privacy.adaptive_clip needs a released count of unclipped clients: use mechanism central or distributed")
        count_std = 0.0
        update_sigma = sigma
        if cfg.adaptive_clip:
            count_std = cfg.clip_count_stddev if cfg.clip_count_stddev > 0 else expected_clients / 20.0
            update_sigma = split_noise_multiplier(sigma, count_std, expected_clients)
        return cls(
            mechanism=cfg.mechanism,
            noise_multiplier=sigma,
            sample_rate=q,
            delta=cfg.delta,
            target_epsilon=cfg.epsilon,
            accountant=cfg.accountant,
            clip=cfg.clip,
            count_scale=cfg.count_scale,
            honest_fraction=cfg.honest_fraction,
            adaptive=cfg.adaptive_clip,
            target_quantile=cfg.target_quantile,
            clip_lr=cfg.clip_lr,
            update_multiplier=update_sigma,
            count_stddev=count_std,
            calibrated=calibrated,
        )

    # ---------------------------------------------------------------- noise sizes

    @property
    def count_value(self) -> float:
        """kappa: what a client writes into its count coordinate (1 without clipping)."""
        return 1.0 if math.isinf(self.clip) else self.count_scale * self.clip

    @property
    def sensitivity(self) -> float:
        """Delta = sqrt(C^2 + kappa^2): L2 change of the released vector from one user."""
        if math.isinf(self.clip):
            return math.inf
        return self.clip * math.sqrt(1.0 + self.count_scale**2)

    def _std(self, multiplier: float) -> float:
        if multiplier == 0.0:
            return 0.0
        return multiplier * self.sensitivity

    def central_std(self) -> float:
        """Std of the central draw (0 unless the mechanism is ``central``)."""
        return self._std(self.update_multiplier) if self.mechanism == "central" else 0.0

    def share_std(self, n_reporting: int) -> float:
        """Std of each client's own noise share this round (0 for ``central``)."""
        if self.mechanism == "distributed":
            m = max(1, math.ceil(self.honest_fraction * n_reporting))
            return self._std(self.update_multiplier) / math.sqrt(m)
        if self.mechanism == "local":
            return 0.0 if self.noise_multiplier == 0.0 else 2.0 * self.clip * self.noise_multiplier
        return 0.0

    # ---------------------------------------------------------------- budget

    def epsilon(self) -> float:
        """Epsilon spent so far (0 before the first round)."""
        return self.ledger.epsilon(self.delta, self.accountant) if len(self.ledger) else 0.0

    def fits(self, round_idx: int) -> bool:
        """Whether releasing round ``round_idx`` keeps epsilon within the target."""
        if math.isinf(self.target_epsilon):
            return True
        trial = PrivacyLedger(self.ledger.events)
        trial.append(PrivacyEvent(round=round_idx, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate))
        return trial.epsilon(self.delta, self.accountant) <= self.target_epsilon

    def record(self, round_idx: int) -> None:
        """Record that round ``round_idx`` was released."""
        self.clip_history.append(self.clip)
        self.ledger.append(PrivacyEvent(round=round_idx, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate))

    def adapt_clip(self, noisy_unclipped: float, expected_clients: float) -> None:
        """Adaptive clipping: move C from the noised count of unclipped clients."""
        frac = float(noisy_unclipped) / max(float(expected_clients), 1.0)
        self.clip = adaptive_clip_step(self.clip, frac, self.target_quantile, self.clip_lr)

    def horizon_epsilon(self, rounds: int) -> float:
        """Epsilon after ``rounds`` rounds at this plan's sigma and q."""
        if self.noise_multiplier == 0.0:
            return math.inf
        return epsilon_for(self.noise_multiplier, self.sample_rate, rounds, self.delta, self.accountant)


def coverage(*, mechanism: str, grouping: str, distill: bool, selection: str) -> tuple[list[str], list[str]]:
    """Which released outputs the epsilon covers, and which it does not.

    Returns
    -------
    covers : outputs that are post-processing of noised aggregates.
    not_covered : outputs computed from individual or non-noised data; when not
        empty, no epsilon may be reported for the run.
    """
    covers = ["global item table and head (FedAvg of the noised sums)"]
    not_covered: list[str] = []
    if distill:
        if grouping in ("spectral", "kmeans"):
            not_covered.append(
                f"grouping ({grouping} clustering on each client's individual, un-noised head), and with it the group "
                "sums' membership, the fusion module and the group preferences"
            )
        else:
            covers += ["group counts and per-group sums", "fusion module and group preferences (trained on noised group sums)"]
            if grouping == "oblivious":
                covers.append("group centroids (from the noised per-group head sums)")
    if selection == "best-val":
        not_covered.append("model selection and early stopping on validation metrics computed from users' held-out items")
    if mechanism == "local":
        covers = [c + " (each upload noised by its client)" for c in covers]
    return covers, not_covered
