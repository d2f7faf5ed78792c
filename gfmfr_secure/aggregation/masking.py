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

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from gfmfr_secure.aggregation.base import Aggregator, register_aggregator
from gfmfr_secure.client.checks import CountEvidence
from gfmfr_secure.aggregation.layout import (
    DenseRows,
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

if TYPE_CHECKING:
    from gfmfr_secure.secagg.masking import SecureSumResult

__all__ = ["MaskingAggregator", "recorded_secure_sum"]


def recorded_secure_sum(
    vectors: np.ndarray, *, value_bound: float, threshold: int, neighbours: int | None, seed: int, dropped: list[int], round_id: int, secrets: str
) -> tuple[SecureSumResult, CountEvidence]:
    """One secure-aggregation round that keeps every message: its result and the clients' evidence.

    :func:`gfmfr_secure.secagg.masking.secure_sum` with ``record=True``, for short vectors
    (a count phase: D = G). The evidence holds the transcript of what the server received
    (signed key advertisements, share ciphertexts, masked uploads, share reveals) and each
    surviving client's own upload, for :func:`gfmfr_secure.client.checks.verify_count_evidence`.

    Parameters
    ----------
    vectors : float32 [n, D]; the other parameters as in ``secure_sum``.
    """
    from gfmfr_secure.secagg.masking import secure_sum

    result = secure_sum(
        vectors, value_bound=value_bound, threshold=threshold, neighbours=neighbours, seed=seed, dropped=dropped,
        round_id=round_id, secrets=secrets, workers=simulation_workers(), record=True,
    )
    rec = result.recording
    evidence = CountEvidence(
        layout=None, transcript=rec.transcript, config=rec.config, graph=rec.graph, identity_keys=rec.identity_keys, own_uploads=rec.transcript.uploads
    )
    return result, evidence


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

    def _round_shape(self, n: int) -> tuple[int | None, int]:
        """SecAgg+ degree k (None: complete graph) and Shamir threshold t of a round of ``n`` clients."""
        k = 0 if self.settings is None else self.settings.neighbours
        neighbours = None if (k == 0 or k >= n - 1) else k
        return neighbours, self._threshold(n, n if neighbours is None else neighbours + 1)

    def attestation_scope(self, n: int) -> tuple[Any, int]:
        """The neighbourhood graph of the next secure sum over ``n`` clients and ``t - 1``.

        A client's broadcast attestation goes to its neighbours in this graph, and it
        uploads only when at least ``t - 1`` of them attest its broadcast.
        """
        from gfmfr_secure.secagg.masking import neighbourhood_graph

        neighbours, threshold = self._round_shape(n)
        graph = None if neighbours is None else neighbourhood_graph(n, neighbours, derive_seed(self.seed, "masking", self.rounds_done))
        return graph, threshold - 1

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
        # the count phase keeps its (short) uploads whole; the main sum builds each client's row
        # as that client encodes it, so the [n, D] matrix never exists
        vectors = noisy_dense_uploads(update, layout, groups, noise) if self.record_transcript else DenseRows(update, layout, groups, noise)
        encode_s = time.perf_counter() - t0
        n = len(update)
        neighbours, threshold = self._round_shape(n)
        drop_frac = 0.0 if st is None else st.dropout
        dropped = np.flatnonzero(numpy_rng(self.seed, "dropout", t_round).random(n) < drop_frac).tolist() if drop_frac else []
        round_seed = derive_seed(self.seed, "masking", t_round)
        self.check_clients_accept(n, vectors.shape[1], threshold, neighbours, round_seed, t_round)
        value_bound = 8.0 if st is None else st.value_bound
        protocol = {"value_bound": value_bound, "threshold": threshold, "neighbours": neighbours, "seed": round_seed, "dropped": dropped, "round_id": t_round}
        if self.record_transcript:
            result, evidence = recorded_secure_sum(vectors, secrets=self.secrets.mode, **protocol)
            self.last_evidence = dataclasses.replace(evidence, layout=layout)
        else:
            result = secure_sum(vectors, secrets=self.secrets.mode, workers=simulation_workers(), **protocol)
        total, survivors = result.total, np.asarray(result.survivors)
        if noise is not None and noise.shares is not None:
            self.check_survivors(int(survivors.size), n, fix="lower aggregation.dropout or raise aggregation.threshold_fraction")
        agg = decode_sum(total, layout, n_clients=int(survivors.size), grouped=groups is not None)
        c = result.costs
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
