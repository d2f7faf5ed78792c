"""``ckks``: homomorphically encrypted aggregation (TenSEAL CKKS); the server learns group sums only.

Each client encrypts its dense group-indexed layout (:mod:`.layout`) plus its own DP
noise share, one value per polynomial coefficient (the ``packed`` wire format:
``ceil(D / 8192)`` SEAL ciphertexts, 22 bytes per value under ``authority`` custody (their words),
about half that under ``shared-clients``). The aggregator holds only the public context and adds
ciphertexts; the key holder (``aggregation.custody``: a key authority apart from the
aggregator, or a secret key shared by the clients) decrypts the sum, floods it (an
exact decryption would reveal the secret key to the aggregator) and, under central DP,
adds the central draw before releasing it, so nobody but the decryptor sees a
noiseless sum. Keys are fresh every round: a round's release is the only decryption
under its key, which is what the flooding bound counts, and each client downloads the
round's context. The simulated clients (and the server's ingestion of their uploads)
are spread over the CPUs this process may use. Parameters, their 128-bit security and
the flooding bound are documented in :mod:`gfmfr_secure.secagg.ckks`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gfmfr_secure.aggregation.base import Aggregator, register_aggregator
from gfmfr_secure.aggregation.layout import (
    check_uniform,
    decode_sum,
    noisy_dense_uploads,
    secure_layout,
)
from gfmfr_secure.client.checks import CountEvidence
from gfmfr_secure.privacy.release import ReleaseNoise
from gfmfr_secure.secagg.simulation import simulation_workers
from gfmfr_secure.types import AggregateResult, CohortUpdate, Exposure

__all__ = ["CKKSAggregatorBackend", "ckks_params_for"]


def ckks_params_for(value_bound: float, max_summands: int, packing: str = "slots") -> Any:
    """CKKS parameters for ``max_summands`` values of magnitude ``<= value_bound``, largest scale that cannot overflow.

    ``packing="slots"`` (wire formats ``tenseal`` and ``seeded``): N = 4096, data primes
    34 + 34 bits and a 41-bit special prime. A sum must stay below half the 68-bit data
    modulus: scale bits ``<= 67 - log2(max_summands * value_bound)``, at most 56 (1024
    summands of ``|x| <= 8``: scale 2**53, flooding std 9.9e-3 on a sum of D = 579,850 values).

    ``packing="coefficients"`` (wire format ``packed``, the backend's): N = 8192, data
    primes of 60 and 20 bits and a 45-bit special prime, 125 bits in all (the
    HomomorphicEncryption.org table allows 218 at 128-bit and 152 at 192-bit security for
    N = 8192); the scale is the largest the 80-bit data modulus holds with the flooding
    noise added before decryption (943 summands of ``|x| <= 8``: 2**66, flooding std
    1.2e-8 on a sum of D = 579,850 values, 22 bytes per value). The single 60-bit data
    prime that N = 4096 allows (16 bytes per value) holds a scale of 2**46 only: its
    flooding std, 9.1e-3 on a sum, moved the validation NDCG@10 of a default run by 2.1e-3
    in two rounds.
    """
    from gfmfr_secure.secagg.ckks import CKKSError, CKKSParams

    if packing == "coefficients":
        for bits in range(79, 0, -1):
            try:
                return CKKSParams(8192, (60, 20, 45), bits, max_abs_value=float(value_bound), max_summands=int(max_summands))
            except CKKSError:
                continue
        raise CKKSError(f"no scale lets {max_summands} values |x| <= {value_bound} fit an 80-bit data modulus")
    bits = min(56, math.floor(66.9 - math.log2(max_summands * value_bound)))
    return CKKSParams(4096, (34, 34, 41), bits, max_abs_value=float(value_bound), max_summands=int(max_summands))


@register_aggregator("ckks")
class CKKSAggregatorBackend(Aggregator):
    """CKKS encrypted sums with explicit key custody."""

    exposure = Exposure.GROUP_SUMS

    def __init__(self, settings: Any = None, seed: int = 0, secrets: str = "os", min_group_size: int = 2) -> None:
        super().__init__(settings, seed, secrets, min_group_size)  # type: ignore[arg-type]

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
        from gfmfr_secure.secagg.ckks import encrypted_sum

        check_uniform(weights, self.name)
        n = len(update)
        layout = secure_layout(update, n_items, groups, n_groups, noise)
        vectors = noisy_dense_uploads(update, layout, groups, noise)
        bound = 8.0 if self.settings is None else self.settings.value_bound
        custody = "authority" if self.settings is None else self.settings.custody
        central = None if noise is None or not noise.has_central else noise.central.reshape(-1).double().numpy()
        self.check_clients_accept(n, vectors.shape[1], n, None, self.seed, self.rounds_done)  # the sum needs every upload: t = n
        total, cost = encrypted_sum(
            vectors,
            params=ckks_params_for(bound, max(n, 1), packing="coefficients"),
            custody=custody,
            wire="packed",
            noise=None if central is None else (lambda size: central[:size]),
            flood_key=self.secrets.key("ckks-flood", self.rounds_done),
            workers=simulation_workers(),
        )
        self.last_cost = {
            "bytes_up_per_client": cost.bytes_up_per_client,
            # the round's fresh context (public key, or the shared secret key), downloaded every round
            "bytes_down_per_client": float(cost.bytes_down_per_client),
            "context_bytes": float(cost.bytes_down_per_client),
            "plain_dense_bytes_per_client": 4.0 * vectors.shape[1],
            "client_s": cost.encrypt_s_mean,
            "server_s": cost.aggregate_s,
            "decrypt_s": cost.decrypt_s,
            "flooding_std": cost.flooding_std,
            "workers": float(cost.workers),
        }
        if self.record_transcript:  # what the key holder released: the clients compare reported counts with it
            self.last_evidence = CountEvidence(layout=layout, released=np.asarray(total, dtype=np.float64).copy())
        self.rounds_done += 1
        return decode_sum(total, layout, n_clients=n, grouped=groups is not None)
