"""``masking``: pairwise-mask secure aggregation; the server learns group sums and counts only.

Each client uploads its dense group-indexed layout (:mod:`.layout`), fixed-point encoded
in Z_{2^32} and masked by :mod:`gfmfr_secure.secagg.masking` (X25519 key agreement,
AES-256-CTR masks, Shamir-shared seeds, Ed25519-signed uploads, SecAgg+ neighbourhoods).
Clients that drop after masking are recovered while at least t of each neighbourhood
remain. DP noise must come from the clients (``privacy.mechanism=distributed`` or
``local``): the server unmasks the sum itself, so central noise would be added after it
had seen the noiseless sum, and is refused.
"""

from __future__ import annotations

import math
import time

import numpy as np

from gfmfr_secure.aggregation.base import Aggregator, register_aggregator
from gfmfr_secure.aggregation.layout import (
    check_uniform,
    decode_sum,
    noisy_dense_uploads,
    secure_layout,
)
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy.release import ReleaseNoise
from gfmfr_secure.rng import derive_seed, numpy_rng
from gfmfr_secure.secagg.simulation import simulation_workers
from gfmfr_secure.types import AggregateResult, CohortUpdate, Exposure

__all__ = ["MaskingAggregator"]


@register_aggregator("masking")
class MaskingAggregator(Aggregator):
    """Pairwise-mask secure aggregation (Bonawitz et al. 2017; SecAgg+ neighbourhoods)."""

    exposure = Exposure.GROUP_SUMS

    def _threshold(self, n: int, hood: int) -> int:
        frac = 0.6 if self.settings is None else self.settings.threshold_fraction
        return max(2, math.ceil(frac * hood)) if n > 1 else 1

    def min_reporting(self, n: int) -> int:
        """``ceil(threshold_fraction * n)`` (at least 2): the fewest survivors whose sum is released.

        With a complete graph this is the Shamir threshold below which the round cannot
        be unmasked; with SecAgg+ neighbourhoods the protocol could recover from fewer,
        and :meth:`aggregate` refuses to release such a sum when it carries DP noise
        shares (they were sized for this many survivors).
        """
        return self._threshold(n, n)

    def aggregate(
        self,
        update: CohortUpdate,
        *,
        n_items: int,
        weights: np.ndarray,
        groups: np.ndarray | None = None,
        n_groups: int = 0,
        noise: ReleaseNoise | None = None,
    ) -> AggregateResult:
        from gfmfr_secure.secagg.masking import secure_sum

        check_uniform(weights, self.name)
        if noise is not None and noise.has_central:
            raise ConfigError(
                "aggregation.backend=masking: the server unmasks the sum, so central DP noise would be added after it saw "
                "the noiseless sum; use privacy.mechanism=distributed (or local)"
            )
        st = self.settings
        t_round = self.rounds_done
        layout = secure_layout(update, n_items, groups, n_groups, noise)
        t0 = time.perf_counter()
        vectors = noisy_dense_uploads(update, layout, groups, noise)
        encode_s = time.perf_counter() - t0
        n = len(update)
        k = 0 if st is None else st.neighbours
        neighbours = None if (k == 0 or k >= n - 1) else k
        hood = n if neighbours is None else neighbours + 1
        threshold = self._threshold(n, hood)
        drop_frac = 0.0 if st is None else st.dropout
        dropped = np.flatnonzero(numpy_rng(self.seed, "dropout", t_round).random(n) < drop_frac).tolist() if drop_frac else []
        result = secure_sum(
            vectors,
            value_bound=8.0 if st is None else st.value_bound,
            threshold=threshold,
            neighbours=neighbours,
            seed=derive_seed(self.seed, "masking", t_round),
            dropped=dropped,
            round_id=t_round,
            secrets=self.secrets.mode,
            workers=simulation_workers(),
        )
        c = result.costs
        survivors = np.asarray(result.survivors)
        if noise is not None and noise.shares is not None and survivors.size < self.min_reporting(n):
            raise ConfigError(
                f"aggregation.backend=masking: only {survivors.size} of {n} clients survived, but the distributed DP "
                f"noise shares were sized for at least {self.min_reporting(n)} survivors; the sum would carry less noise "
                "than accounted and is not released: lower aggregation.dropout or raise aggregation.threshold_fraction"
            )
        agg = decode_sum(result.total, layout, n_clients=int(survivors.size), grouped=groups is not None)
        self.last_cost = {
            "workers": float(simulation_workers()),
            "bytes_up_per_client": float(np.mean(c.bytes_up[survivors])),
            "bytes_down_per_client": float(np.mean(c.bytes_down[survivors])),
            "plain_dense_bytes_per_client": float(c.plain_bytes),
            "client_s": float(c.mean_client_s) + encode_s / max(n, 1),
            "server_s": float(c.server_setup_s + c.server_aggregate_s + c.server_unmask_s),
            "dropped": float(len(dropped)),
        }
        self.rounds_done += 1
        return agg
