"""One simulated CKKS aggregation round: :func:`encrypted_sum` plays the key holder, n clients and the server.

Used by the ``ckks`` aggregation backend and by the tests.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gfmfr_secure.secagg.ckks.client import Encryptor
from gfmfr_secure.secagg.ckks.keyholder import KeyHolder
from gfmfr_secure.secagg.ckks.params import CKKSParams
from gfmfr_secure.secagg.ckks.primitives import PACKING, CKKSError, Custody, NoiseFn, WireFormat, check_wire, gaussian_noise
from gfmfr_secure.secagg.ckks.server import CKKSAggregator

__all__ = ["CKKSCost", "encrypted_sum"]


@dataclass(frozen=True)
class CKKSCost:
    """Bytes and seconds of one simulated encrypted sum.

    Attributes
    ----------
    n_clients, dim, n_ciphertexts : n, D and ``ceil(D / slots)``.
    custody, wire : the key custody and the ciphertext format.
    bytes_up_per_client : mean bytes of one upload (all its ciphertexts).
    bytes_down_per_client : bytes of the context each client downloads once
        (public key under ``authority``, secret key under ``shared-clients``).
    bytes_public_context : bytes of the aggregator's context.
    bytes_encrypted_sum : bytes the aggregator sends to the decryptor.
    keygen_s : key holder's context creation.
    encrypt_s_mean : mean seconds one client spends encrypting (serialisation included).
    aggregate_s : server seconds for all uploads (deserialise, validate, add) plus
        serialising the sum; summed over the worker processes that shared the work.
    decrypt_s : decryption of the sum (noise included).
    flooding_std : std of the flooding noise on every released value.
    workers : processes the simulated clients and the server's ingestion ran on.
    """

    n_clients: int
    dim: int
    n_ciphertexts: int
    custody: str
    wire: str
    bytes_up_per_client: float
    bytes_down_per_client: int
    bytes_public_context: int
    bytes_encrypted_sum: int
    keygen_s: float
    encrypt_s_mean: float
    aggregate_s: float
    decrypt_s: float
    flooding_std: float = 0.0
    workers: int = 1

    @property
    def bytes_per_value(self) -> float:
        """Upload bytes per value of the vector."""
        return self.bytes_up_per_client / self.dim

    @property
    def ratio_to_float32(self) -> float:
        """Upload bytes over the ``4 * D`` bytes of the float32 vector."""
        return self.bytes_up_per_client / (4.0 * self.dim)

    @property
    def aggregate_s_per_client(self) -> float:
        """Server seconds per added client."""
        return self.aggregate_s / self.n_clients

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view, derived ratios included."""
        out = asdict(self)
        out.update(
            bytes_per_value=self.bytes_per_value,
            ratio_to_float32=self.ratio_to_float32,
            aggregate_s_per_client=self.aggregate_s_per_client,
        )
        return out


def encrypted_sum(
    vectors: ArrayLike,
    *,
    params: CKKSParams | None = None,
    custody: Custody = "authority",
    seed: int = 0,
    wire: WireFormat | None = None,
    noise_std: float = 0.0,
    noise: NoiseFn | None = None,
    flood_key: bytes | None = None,
    n_threads: int = 1,
    workers: int = 1,
) -> tuple[NDArray[np.float64], CKKSCost]:
    """Simulate one round: n clients encrypt, the server sums, the key holder decrypts.

    Fresh keys are made for every call (one key per released sum). With ``workers > 1``
    the clients are split into contiguous shards, one per forked process: each process
    plays its clients (encryption with the client context) and the server's ingestion
    of their uploads (validation and addition with the public context only), and the
    server merges the partial encrypted sums (:meth:`CKKSAggregator.merge`). The result
    does not depend on ``workers``: ciphertext addition is exact.

    Parameters
    ----------
    vectors : float32 or float64 [n, D], one row per client, ``|x| <= params.max_abs_value``.
    params : CKKS parameters (default :class:`CKKSParams`).
    custody : ``"authority"`` or ``"shared-clients"``.
    seed : root seed of the release noise (``numpy_rng(seed, "ckks", "release-noise")``).
        Encryption randomness cannot be seeded: ciphertexts differ between runs,
        decrypted sums agree within ``params.sum_tolerance(n)``.
    wire : ciphertext format; default :func:`default_wire` of ``custody``.
    noise_std : std of the Gaussian noise the decryptor adds before release (0: none).
    noise : a release-noise hook for :meth:`Decryptor.decrypt` instead of ``noise_std``.
    flood_key : 32 secret bytes of the flooding noise (default: fresh from the OS).
    n_threads : threads of every TenSEAL context.
    workers : processes to spread the clients over (1: all in this process; needs ``fork``).

    Returns
    -------
    total : float64 [D], the decrypted sum of the rows, flooded (:meth:`CKKSParams.flooding_std`)
        and, with ``noise_std`` or ``noise``, noised.
    cost : :class:`CKKSCost`.
    """
    from gfmfr_secure.rng import numpy_rng

    x = vectors if isinstance(vectors, np.ndarray) and vectors.dtype in (np.float32, np.float64) else np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise CKKSError(f"vectors must be a non-empty [n, D] array, got shape {x.shape}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CKKSError(f"workers must be an int >= 1, got {workers!r}")
    if noise is not None and noise_std > 0:
        raise CKKSError("pass either noise_std or a noise hook, not both")
    n, dim = x.shape
    t0 = time.perf_counter()
    holder = KeyHolder(params, custody=custody, n_threads=n_threads)
    keygen_s = time.perf_counter() - t0
    w = holder.default_wire if wire is None else check_wire(wire)
    client_ctx = holder.client_context_bytes()
    public_ctx = holder.public_context_bytes()
    decryptor = holder.decryptor(dim, wire=w)
    job = _ShardJob(x, client_ctx, public_ctx, holder.params, w, n_threads)
    shards = _shards(n, workers if n * dim >= _PARALLEL_MIN_VALUES else 1)
    if len(shards) == 1:
        parts = [job.run(0, n)]
    else:
        parts = _run_forked(job, shards)

    server = CKKSAggregator(public_ctx, holder.params, dim, wire=w, n_threads=n_threads)
    t0 = time.perf_counter()
    for part in parts:
        server.merge(part.partial, part.count)
    enc_sum = server.result()
    agg_s = time.perf_counter() - t0 + sum(part.aggregate_s for part in parts)
    server.close()

    hook = noise if noise is not None else (gaussian_noise(noise_std, numpy_rng(seed, "ckks", "release-noise")) if noise_std > 0 else None)
    t0 = time.perf_counter()
    total = decryptor.decrypt(enc_sum, noise=hook, flood_key=flood_key)
    dec_s = time.perf_counter() - t0

    cost = CKKSCost(
        n_clients=n,
        dim=dim,
        n_ciphertexts=holder.params.n_ciphertexts(dim, PACKING[w]),
        custody=holder.custody,
        wire=w,
        bytes_up_per_client=sum(part.bytes_up for part in parts) / n,
        bytes_down_per_client=len(client_ctx),
        bytes_public_context=len(public_ctx),
        bytes_encrypted_sum=sum(len(b) for b in enc_sum),
        keygen_s=keygen_s,
        encrypt_s_mean=sum(part.encrypt_s for part in parts) / n,
        aggregate_s=agg_s,
        decrypt_s=dec_s,
        flooding_std=decryptor.flooding_std,
        workers=len(shards),
    )
    return total, cost


#: Below this many values in all (n * D) a round runs in one process: forking costs more.
_PARALLEL_MIN_VALUES = 1 << 22


@dataclass(frozen=True)
class _ShardResult:
    """What one shard hands back: its partial encrypted sum and its costs."""

    partial: list[bytes]
    count: int
    bytes_up: int
    encrypt_s: float
    aggregate_s: float


@dataclass(frozen=True, eq=False)
class _ShardJob:
    """Clients ``start:stop`` encrypt their rows; the server's ingestion adds them (public context only)."""

    vectors: np.ndarray
    client_context: bytes
    public_context: bytes
    params: CKKSParams
    wire: WireFormat
    n_threads: int

    def run(self, start: int, stop: int) -> _ShardResult:
        dim = self.vectors.shape[1]
        encryptor = Encryptor(self.client_context, self.params, dim, wire=self.wire, n_threads=self.n_threads)
        server = CKKSAggregator(self.public_context, self.params, dim, wire=self.wire, n_threads=self.n_threads)
        enc_s = agg_s = 0.0
        up_bytes = 0
        try:
            for i in range(start, stop):
                t0 = time.perf_counter()
                upload = encryptor.encrypt(self.vectors[i])
                t1 = time.perf_counter()
                server.add(upload)
                agg_s += time.perf_counter() - t1
                enc_s += t1 - t0
                up_bytes += sum(len(c) for c in upload)
            t0 = time.perf_counter()
            partial = server.result()
            agg_s += time.perf_counter() - t0
        finally:
            encryptor.close()
            server.close()
        return _ShardResult(partial, stop - start, up_bytes, enc_s, agg_s)


def _shards(n: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous ``(start, stop)`` ranges covering ``range(n)`` (fewer when n is small)."""
    k = max(1, min(int(workers), n))
    if k > 1 and "fork" not in multiprocessing.get_all_start_methods():
        k = 1
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


_FORKED_JOB: _ShardJob | None = None


def _forked_shard(bounds: tuple[int, int]) -> _ShardResult:
    if _FORKED_JOB is None:  # pragma: no cover - only reachable if the pool was not forked
        raise CKKSError("the shard worker was not forked from the process that set up the job")
    return _FORKED_JOB.run(*bounds)


def _run_forked(job: _ShardJob, shards: list[tuple[int, int]]) -> list[_ShardResult]:
    """Run the shards in forked processes; the vectors reach them through the fork, not a pipe."""
    global _FORKED_JOB
    _FORKED_JOB = job
    try:
        with ProcessPoolExecutor(len(shards), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_forked_shard, shards))
    finally:
        _FORKED_JOB = None
