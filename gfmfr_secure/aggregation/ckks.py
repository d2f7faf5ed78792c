"""``ckks``: homomorphically encrypted aggregation (TenSEAL CKKS); the server learns group sums only.

Each client encrypts its dense group-indexed layout (:mod:`.layout`) plus its own DP
noise share, as ``ceil(D / slots)`` CKKS ciphertexts serialised to bytes. The
aggregator holds only the public context and adds ciphertexts; the key holder
(``aggregation.custody``: a key authority apart from the aggregator, or a secret key
shared by the clients) decrypts the sum and, under central DP, adds the central draw
before releasing it, so nobody but the decryptor sees a noiseless sum. Parameters
and their 128-bit security are documented in :mod:`gfmfr_secure.secagg.ckks`.
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
    """Default ring (N = 4096, primes 42 + 42 bits) with the largest scale that cannot overflow.

    A sum of ``max_summands`` values of magnitude ``<= value_bound`` must stay below half
    the 42-bit data prime: scale bits ``<= 41 - log2(max_summands * value_bound)``, at most 31.
    """
    from gfmfr_secure.secagg.ckks import CKKSParams

    bits = min(31, math.floor(40.9 - math.log2(max_summands * value_bound)))
    return CKKSParams(4096, (42, 42), bits, max_abs_value=float(value_bound), max_summands=int(max_summands))


@register_aggregator("ckks")
class CKKSAggregatorBackend(Aggregator):
    """CKKS encrypted sums with explicit key custody."""

    exposure = Exposure.GROUP_SUMS

    def __init__(self, settings: Any = None, seed: int = 0, secrets: str = "os") -> None:
        super().__init__(settings, seed, secrets)  # type: ignore[arg-type]
        self._keys: Any = None

    def _key_holder(self, max_summands: int) -> Any:
        from gfmfr_secure.secagg.ckks import KeyHolder

        if self._keys is None or self._keys.params.max_summands < max_summands:
            bound = 8.0 if self.settings is None else self.settings.value_bound
            custody = "authority" if self.settings is None else self.settings.custody
            self._keys = KeyHolder(ckks_params_for(bound, max(max_summands, 1024)), custody=custody)
        return self._keys

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
        total = decryptor.decrypt(encrypted_sum, noise=None if central is None else (lambda size: central[:size]))
        dec_s = time.perf_counter() - t0
        self.last_cost = {
            "bytes_up_per_client": up_bytes / max(n, 1),
            # the context (public key, or the shared secret key) is downloaded once, in the first round
            "bytes_down_per_client": float(len(keys.client_context_bytes())) if self.rounds_done == 0 else 0.0,
            "context_bytes": float(len(keys.client_context_bytes())),
            "plain_dense_bytes_per_client": 4.0 * dim,
            "client_s": enc_s / max(n, 1),
            "server_s": t_server,
            "decrypt_s": dec_s,
        }
        self.rounds_done += 1
        return decode_sum(total, layout, n_clients=n, grouped=groups is not None)
