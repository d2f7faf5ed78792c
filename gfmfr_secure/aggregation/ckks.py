"""``ckks``: homomorphically encrypted aggregation (TenSEAL CKKS); the server learns group sums only.

Each client encrypts its dense group-indexed layout (:mod:`.layout`) plus its own DP
noise share, as ``ceil(D / slots)`` CKKS ciphertexts serialised to bytes. The
aggregator holds only the public context and adds ciphertexts; the key holder
(``aggregation.custody``: a key authority apart from the aggregator, or a secret key
shared by the clients) decrypts the sum, floods it (an exact decryption would reveal the
secret key to the aggregator) and, under central DP, adds the central draw before
releasing it, so nobody but the decryptor sees a noiseless sum. Keys are fresh every
round: a round's release is the only decryption under its key, which is what the
flooding bound counts, and each client downloads the round's context. Parameters, their
128-bit security and the flooding bound are documented in :mod:`gfmfr_secure.secagg.ckks`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from gfmfr_secure.aggregation.base import Aggregator, register_aggregator
from gfmfr_secure.aggregation.layout import (
    check_uniform,
    decode_sum,
    noisy_dense_uploads,
    secure_layout,
)
from gfmfr_secure.privacy.release import ReleaseNoise
from gfmfr_secure.types import AggregateResult, CohortUpdate, Exposure

__all__ = ["CKKSAggregatorBackend", "ckks_params_for"]


def ckks_params_for(value_bound: float, max_summands: int) -> Any:
    """Ring N = 4096, data primes 34 + 34 bits and a 41-bit special prime, with the largest scale that cannot overflow.

    A sum of ``max_summands`` values of magnitude ``<= value_bound`` must stay below half
    the 68-bit data modulus: scale bits ``<= 67 - log2(max_summands * value_bound)``, at
    most 56. Two data primes keep the flooding noise small (1024 summands of ``|x| <= 8``:
    scale 2**53, flooding std 9.9e-3 on a sum of D = 579,850 values; see
    :meth:`gfmfr_secure.secagg.ckks.CKKSParams.flooding_std`).
    """
    from gfmfr_secure.secagg.ckks import CKKSParams

    bits = min(56, math.floor(66.9 - math.log2(max_summands * value_bound)))
    return CKKSParams(4096, (34, 34, 41), bits, max_abs_value=float(value_bound), max_summands=int(max_summands))


@register_aggregator("ckks")
class CKKSAggregatorBackend(Aggregator):
    """CKKS encrypted sums with explicit key custody."""

    exposure = Exposure.GROUP_SUMS

    def __init__(self, settings: Any = None, seed: int = 0, secrets: str = "os") -> None:
        super().__init__(settings, seed, secrets)  # type: ignore[arg-type]

    def _key_holder(self, max_summands: int) -> Any:
        """Fresh keys for this round (never cached: one broken key must not open every round)."""
        from gfmfr_secure.secagg.ckks import KeyHolder

        bound = 8.0 if self.settings is None else self.settings.value_bound
        custody = "authority" if self.settings is None else self.settings.custody
        return KeyHolder(ckks_params_for(bound, max(max_summands, 1024)), custody=custody)

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
        check_uniform(weights, self.name)
        n = len(update)
        layout = secure_layout(update, n_items, groups, n_groups, noise)
        vectors = noisy_dense_uploads(update, layout, groups, noise)
        dim = vectors.shape[1]
        keys = self._key_holder(n)
        encryptor, aggregator, decryptor = keys.encryptor(dim), keys.aggregator(dim), keys.decryptor(dim)
        up_bytes = 0
        enc_s = 0.0
        t_server = 0.0
        for i in range(n):
            t0 = time.perf_counter()
            upload = encryptor.encrypt(vectors[i])
            t1 = time.perf_counter()
            aggregator.add(upload)
            t_server += time.perf_counter() - t1
            enc_s += t1 - t0
            up_bytes += sum(len(c) for c in upload)
        t0 = time.perf_counter()
        encrypted_sum = aggregator.result()
        t_server += time.perf_counter() - t0
        central = None if noise is None or not noise.has_central else noise.central.reshape(-1).double().numpy()
        t0 = time.perf_counter()
        flood_key = self.secrets.key("ckks-flood", self.rounds_done)
        total = decryptor.decrypt(encrypted_sum, noise=None if central is None else (lambda size: central[:size]), flood_key=flood_key)
        dec_s = time.perf_counter() - t0
        self.last_cost = {
            "bytes_up_per_client": up_bytes / max(n, 1),
            # the round's fresh context (public key, or the shared secret key), downloaded every round
            "bytes_down_per_client": float(len(keys.client_context_bytes())),
            "context_bytes": float(len(keys.client_context_bytes())),
            "plain_dense_bytes_per_client": 4.0 * dim,
            "client_s": enc_s / max(n, 1),
            "server_s": t_server,
            "decrypt_s": dec_s,
            "flooding_std": decryptor.flooding_std,
        }
        self.rounds_done += 1
        return decode_sum(total, layout, n_clients=n, grouped=groups is not None)
