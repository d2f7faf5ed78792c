"""The group floor of oblivious grouping, and the randomness-mode record of a run.

Under oblivious grouping each client writes its update into its own group's block and
the server learns per-group sums. A group of one client would release that client's
exact update, so a round runs in two phases:

1. **Counts.** Each client uploads only the count coordinate of its group's block
   (``kappa`` in its own group, zero elsewhere), through the same aggregation backend
   and with the same DP noise as the count coordinate of a full release. The server
   learns the G group counts (noised under DP) and nothing else.
2. **Merge, then sums.** Every group below ``grouping.min_group_size`` is folded into
   its nearest group (:func:`gfmfr_secure.server.grouping.merge_small_groups`, a public
   function of the released counts and the broadcast centroids that every client applies
   to its own choice); the clients then upload their updates under the merged groups.
   Under DP the clients write zero into the count coordinate in this phase, so the count
   is released once (phase 1) and the two phases together are the one Gaussian release
   the accountant records. A round whose whole cohort is below the floor releases nothing.

What the floor does not cover: the phase-1 counts themselves (a count of 1 tells the
server that one cohort member is nearest to that centroid, not what it uploaded); under
DP the merge is decided on noised counts, so a group's released sum may cover fewer
clients than the floor and is then protected by the noise alone; and clients that drop
between the phases (``aggregation.dropout``) leave their group smaller than counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gfmfr_secure.privacy.release import Release, ReleaseLayout, ReleaseNoise
from gfmfr_secure.rng import SecretSource
from gfmfr_secure.types import CohortUpdate

__all__ = ["count_inputs", "count_phase", "count_release", "floor_report", "secrets_report"]


def count_phase(
    aggregator: Any,
    upload: CohortUpdate,
    groups: np.ndarray,
    n_groups: int,
    dp: Any,
    source: SecretSource,
    round_idx: int,
    n_total: int | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Phase 1 of an oblivious round: the group counts, through the aggregation backend.

    Parameters
    ----------
    aggregator : the run's backend (its exposure is the main release's).
    upload : the cohort's uploads (only ``clients`` and the group choice are used).
    groups : int64 [n] each client's own group.
    n_groups : G.
    dp : the run's user-level DP plan, or None.
    source : where the noise keys come from.
    round_idx : t.
    n_total : the uploads of the whole round when ``upload`` is one node's part of them (the
        clients' noise shares are sized for all of them); None: ``len(upload)``.

    Returns
    -------
    counts : float64 [G], the released count of each group (noised under DP).
    cost : the phase's aggregation cost (the backend's ``last_cost``).
    """
    counts_only, noise = count_inputs(aggregator, upload, groups, n_groups, dp, source, round_idx, n_total)
    agg = aggregator.aggregate(counts_only, n_items=0, weights=np.ones(len(upload)), groups=np.asarray(groups, dtype=np.int64), n_groups=n_groups, noise=noise)
    return agg.group_counts.double().numpy(), dict(aggregator.last_cost)


def count_inputs(
    aggregator: Any, upload: CohortUpdate, groups: np.ndarray, n_groups: int, dp: Any, source: SecretSource, round_idx: int, n_total: int | None = None,
) -> tuple[CohortUpdate, ReleaseNoise | None]:
    """What the clients put into the count phase: uploads with only a group (no rows, no head) and the phase's DP noise.

    Parameters as :func:`count_phase`. Returns the count-only :class:`CohortUpdate` [n]
    (summed with ``n_items=0``: one count coordinate per group) and the noise (layout
    ``[G, 1]``, the releasing party's central draw and the clients' ``dp-count`` shares), or None without DP.
    """
    n = len(upload)
    d = int(upload.item_delta.shape[1])
    counts_only = CohortUpdate(
        clients=upload.clients,
        n_samples=np.zeros(n, dtype=np.int64),
        row_ptr=np.zeros(n + 1, dtype=np.int64),
        row_items=np.zeros(0, dtype=np.int64),
        item_delta=torch.zeros(0, d),
        head_delta=None,
        head_after=None,
        group=np.asarray(groups, dtype=np.int64),
        loss=np.zeros(n),
    )
    if dp is None:
        return counts_only, None
    release = count_release(dp, n_groups, d, round_idx)
    layout = release.layout
    m = n if n_total is None else int(n_total)
    shares = release.shares(source, upload.clients, m, aggregator.min_reporting(m))  # shares of dropped clients never arrive
    return counts_only, ReleaseNoise(layout, release.central(source), shares)


def count_release(dp: Any, n_groups: int, d: int, round_idx: int) -> Release:
    """The count phase's DP release of round ``round_idx``: layout ``[G, 1]`` (one count coordinate per group), kind ``dp-count``."""
    return Release(dp, ReleaseLayout(n_groups, 0, d, 0, dp.count_value), round_idx, kind="dp-count")


def floor_report(min_group_size: int, merged_rounds: int, skipped_rounds: int, smallest: float | None) -> dict[str, Any]:
    """The ``group_floor`` entry of the privacy block of metrics.json."""
    return {
        "min_group_size": int(min_group_size),
        "rounds_with_merged_groups": int(merged_rounds),
        "rounds_skipped_cohort_below_floor": int(skipped_rounds),
        "smallest_released_group": smallest,
        "covers": "every released group sum and count covers at least min_group_size clients (exact counts without DP)",
        "not_covered": [
            "the phase-1 group counts are released before merging (noised under DP)",
            "under DP the merge uses noised counts; a smaller group is then protected by the noise only",
            "clients dropping between the count and the sum phase (aggregation.dropout)",
        ],
    }


def secrets_report(mode: str) -> dict[str, str]:
    """The ``secrets`` entry of the privacy block of metrics.json: where keys, masks and noise came from."""
    if mode == "os":
        return {"mode": "os", "source": "operating-system CSPRNG (keys, mask seeds, Shamir coefficients, DP noise)"}
    return {
        "mode": "reproducible",
        "source": "derived from the run seed written to config.yaml and run.json",
        "warning": "simulation mode: anyone with the seed can strip the masks and subtract the DP noise; "
        "no security or privacy claim holds for this run",
    }
