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
- ``distributed``: each of the ``n`` clients adds a share of std
  ``sigma * Delta / sqrt(m)``, with ``m`` the fewest honest shares that can reach
  the sum: ``m = r - (n - ceil(honest_fraction * n))``, where ``r`` is the fewest
  uploads the aggregation backend releases a sum of (``n`` without dropouts; the
  masking threshold with them, see :meth:`Aggregator.min_reporting`), less every
  client that may be dishonest. Any ``m`` honest shares carry the full noise
  ``sigma * Delta``; accounted like ``central``.
- ``local``: each client adds std ``sigma * S`` to its own upload, with ``S`` the
  largest change of one upload when the user's data is replaced: ``2 C`` within one
  block, ``C * sqrt(2 (1 + count_scale^2))`` when the client moves to another
  group's block (its update and its count coordinate leave one block and enter
  another), so ``S = C * max(2, sqrt(2 (1 + count_scale^2)))`` with several
  blocks; accounted per client with q = 1 (the server sees every upload), i.e.
  protection against the server.
"""

from __future__ import annotations

import logging
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

__all__ = ["USER_MECHANISMS", "UserLevelDP", "coverage", "delta_warning"]

#: mechanisms whose unit is one user and that this module plans
USER_MECHANISMS = ("central", "distributed", "local")

_log = logging.getLogger("gfmfr_secure.privacy")


def delta_warning(delta: float, n_users: int, name: str = "privacy.delta") -> str | None:
    """The warning for a ``delta`` that is not well below ``1 / n_users``, or None.

    With ``delta >= 1/n`` a mechanism that publishes one whole user's data
    (chosen at random) still satisfies (epsilon, delta)-DP, so the guarantee
    says little; the usual rule is ``delta`` far below ``1/n``.

    Parameters
    ----------
    delta : the target delta.
    n_users : the number of users the guarantee covers (those that can take part).
    name : how the caller spells delta in the message (``privacy.delta``, ``--delta``).
    """
    if n_users < 1 or delta < 1.0 / n_users:
        return None
    return (
        f"{name}={delta:g} is not below 1/n = {1.0 / n_users:.3g} for n = {n_users} users: a "
        "mechanism may then reveal one user's data outright and still meet (epsilon, delta); use "
        f"a delta well below 1/n, e.g. {name}={1.0 / (100 * n_users):.1e} (1/(100 n))"
    )


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
    n_blocks: int = 1

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        *,
        sample_rate: float,
        rounds: int,
        expected_clients: float,
        n_blocks: int = 1,
        n_users: int | None = None,
        logger: logging.Logger | None = None,
    ) -> UserLevelDP:
        """Plan the run: calibrate sigma when needed and split it for adaptive clipping.

        Logs a warning (to ``logger``, default ``gfmfr_secure.privacy``) when ``cfg.delta``
        is not below ``1 / n_users`` (see :func:`delta_warning`).

        Parameters
        ----------
        cfg : PrivacyConfig with a user-level mechanism (the rules relating it to other
            sections, e.g. no adaptive clipping under local DP, are
            :func:`gfmfr_secure.config_rules.validate`'s).
        sample_rate : Poisson rate q of client sampling.
        rounds : the most rounds the run may take (calibration horizon).
        expected_clients : q times the number of eligible clients.
        n_blocks : group blocks a client may write its upload into (G under oblivious
            grouping, else 1); sets the local-DP sensitivity.
        n_users : clients that can take part; default ``expected_clients / sample_rate``.
        """
        if cfg.mechanism not in USER_MECHANISMS:
            raise ConfigError(f"privacy.mechanism={cfg.mechanism!r} is not user-level; known: {', '.join(USER_MECHANISMS)}")
        n = round(expected_clients / sample_rate) if n_users is None else int(n_users)
        message = delta_warning(cfg.delta, n)
        if message is not None:
            (logger or _log).warning("%s", message)
        q = 1.0 if cfg.mechanism == "local" else float(sample_rate)
        calibrated = cfg.noise_multiplier is None
        sigma = calibrate_noise(cfg.epsilon, cfg.delta, q, rounds, cfg.accountant) if calibrated else float(cfg.noise_multiplier)
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
            n_blocks=int(n_blocks),
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

    @property
    def local_sensitivity(self) -> float:
        """S: L2 change of one client's own upload when its data is replaced (local DP).

        Within one block the update moves by at most ``2C`` and the count coordinate
        stays. Moving from block g to block g' clears ``[u ; kappa]`` in g and writes
        ``[u' ; kappa]`` in g': ``sqrt(|u|^2 + kappa^2 + |u'|^2 + kappa^2) <=
        C sqrt(2 (1 + count_scale^2))``.
        """
        if math.isinf(self.clip):
            return math.inf
        within = 2.0 * self.clip
        if self.n_blocks <= 1:
            return within
        return max(within, self.clip * math.sqrt(2.0 * (1.0 + self.count_scale**2)))

    def honest_reporting(self, n_clients: int, min_reporting: int | None = None) -> int:
        """m: the fewest honest noise shares that reach the sum of a round of ``n_clients``.

        ``min_reporting`` (default ``n_clients``) is the fewest uploads the backend
        releases a sum of; at most ``n_clients - ceil(honest_fraction * n_clients)``
        clients are dishonest, and in the worst case all of them are among the survivors.

        Raises
        ------
        ConfigError
            If no honest share is guaranteed to reach the sum.
        """
        n = int(n_clients)
        r = n if min_reporting is None else int(min_reporting)
        dishonest = n - math.ceil(self.honest_fraction * n)
        m = r - dishonest
        if m < 1:
            raise ConfigError(
                f"distributed DP: of {n} clients as few as {r} may reach the sum and up to {dishonest} may be dishonest, "
                "so no honest noise share is guaranteed to reach it; raise privacy.honest_fraction or "
                "aggregation.threshold_fraction"
            )
        return m

    def _std(self, multiplier: float) -> float:
        if multiplier == 0.0:
            return 0.0
        return multiplier * self.sensitivity

    def central_std(self) -> float:
        """Std of the central draw (0 unless the mechanism is ``central``)."""
        return self._std(self.update_multiplier) if self.mechanism == "central" else 0.0

    def share_std(self, n_clients: int, min_reporting: int | None = None) -> float:
        """Std of each client's own noise share this round (0 for ``central``).

        ``distributed``: ``sigma * Delta / sqrt(m)`` with ``m`` :meth:`honest_reporting`;
        ``min_reporting`` is the backend's :meth:`Aggregator.min_reporting` (shares of
        clients that drop out never reach the sum). ``local``: ``sigma * S``
        (:attr:`local_sensitivity`).
        """
        if self.mechanism == "distributed":
            if self.update_multiplier == 0.0:
                return 0.0
            return self._std(self.update_multiplier) / math.sqrt(self.honest_reporting(n_clients, min_reporting))
        if self.mechanism == "local":
            return 0.0 if self.noise_multiplier == 0.0 else self.noise_multiplier * self.local_sensitivity
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

    def adapt_clip(self, noisy_fraction: float) -> None:
        """Adaptive clipping: move C from the noised fraction of unclipped clients.

        ``noisy_fraction`` must come from :func:`~gfmfr_secure.privacy.mechanisms.noisy_unclipped_fraction`
        (the centred count, sensitivity 1/2, that :func:`split_noise_multiplier` accounts for).
        """
        self.clip = adaptive_clip_step(self.clip, float(noisy_fraction), self.target_quantile, self.clip_lr)

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
