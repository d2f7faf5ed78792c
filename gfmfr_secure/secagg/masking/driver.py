"""One simulated secure-aggregation round: :func:`secure_sum` plays n clients and the server.

Used by the ``masking`` aggregation backend and by the tests; every message between the
roles passes as bytes.
"""

from __future__ import annotations

import secrets as _os_secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gfmfr_secure.rng import SECRET_MODES
from gfmfr_secure.secagg.fixedpoint import centre, check_values, decode_sum
from gfmfr_secure.secagg.masking.client import SecAggClient
from gfmfr_secure.secagg.masking.params import SecAggConfig, neighbourhood_graph
from gfmfr_secure.secagg.masking.primitives import KEY_BYTES, Keystream, client_secret_seed
from gfmfr_secure.secagg.masking.server import SecAggServer

__all__ = ["SecAggCosts", "SecureSumResult", "secure_sum"]


@dataclass(frozen=True, eq=False)
class SecAggCosts:
    """Communication and computation of one simulated round.

    Attributes
    ----------
    bytes_up : int64 [n], bytes each client sent (keys, shares, masked upload, revealed shares).
    bytes_down : int64 [n], bytes each client received (neighbours' keys, shares, unmask request).
    client_keygen_s, client_share_s, client_mask_s, client_unmask_s : float64 [n], seconds per
        client: identity and round key generation; verifying keys, sharing, encrypting and
        decrypting shares; encoding, pairwise and self masks, signing; answering the unmask request.
        Each pair mask expanded once by the driver is charged in full to both surviving endpoints.
    mean_client_s : mean over survivors of keygen + share + mask seconds.
    server_setup_s : verifying and routing keys and shares.
    server_aggregate_s : checking and summing the masked uploads.
    server_unmask_s : reconstructing secrets and removing masks.
    wall_s : wall time of :func:`secure_sum`.
    plain_bytes : 4 D, the size of a plain float32 upload.
    """

    bytes_up: np.ndarray
    bytes_down: np.ndarray
    client_keygen_s: np.ndarray
    client_share_s: np.ndarray
    client_mask_s: np.ndarray
    client_unmask_s: np.ndarray
    mean_client_s: float
    server_setup_s: float
    server_aggregate_s: float
    server_unmask_s: float
    wall_s: float
    plain_bytes: int


@dataclass(frozen=True, eq=False)
class SecureSumResult:
    """Outcome of :func:`secure_sum`.

    Attributes
    ----------
    total : float64 [D], the decoded sum over the survivors.
    fixed_total : int64 [D], the exact integer (fixed-point) sum, ``total = fixed_total * 2^-f``.
    survivors : ids whose upload was aggregated, sorted.
    dropped : ids that shared keys but did not upload, sorted.
    frac_bits : f.
    upload_digests : SHA-256 of each survivor's masked payload, in the order of ``survivors``.
    costs : :class:`SecAggCosts`.
    """

    total: np.ndarray
    fixed_total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    frac_bits: int
    upload_digests: tuple[bytes, ...]
    costs: SecAggCosts


def _check_dropped(dropped: Sequence[int], n: int) -> frozenset[int]:
    ids = [int(u) for u in dropped]
    bad = [u for u in ids if not 0 <= u < n]
    if bad:
        raise ValueError(f"dropped ids must lie in [0, {n}), got {bad[:5]}")
    if len(set(ids)) != len(ids):
        raise ValueError("dropped ids must be distinct")
    return frozenset(ids)


def secure_sum(
    vectors: np.ndarray,
    *,
    value_bound: float,
    threshold: int,
    neighbours: int | None,
    seed: int,
    dropped: Sequence[int] = (),
    round_id: int = 0,
    on_upload: Callable[[int, bytes], None] | None = None,
    secrets: str = "os",
) -> SecureSumResult:
    """Simulate one full secure-aggregation round for n clients and return the survivors' sum.

    Clients in ``dropped`` take part in the key rounds, then vanish before uploading; their
    pairwise masks are recovered from the survivors' shares.

    Parameters
    ----------
    vectors : float32 [n, D], row u is client u's input; ``|x| <= value_bound``, finite.
    value_bound : B, fixes the fixed-point resolution (see :func:`choose_frac_bits`).
    threshold : t, Shamir threshold within each closed neighbourhood (n for the complete graph,
        k + 1 for SecAgg+).
    neighbours : k (even) for a SecAgg+ graph, None for the complete graph.
    seed : root seed of the (public) graph, and of every secret in ``reproducible`` mode.
    dropped : ids of clients that drop after sharing their keys.
    round_id : round number mixed into keys and messages.
    on_upload : optional callback ``(client, upload_bytes)`` for each masked upload sent.
    secrets : ``os`` (default): each client's secret seed is 32 bytes from the OS CSPRNG.
        ``reproducible``: derived from ``seed`` (:func:`client_secret_seed`), so equal seeds give
        identical uploads; a simulation mode that protects nothing against whoever knows the seed.

    Returns
    -------
    SecureSumResult
    """
    wall0 = time.perf_counter()
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype != np.float32:
        got = (
            f"{vectors.dtype} {vectors.shape}"
            if isinstance(vectors, np.ndarray)
            else type(vectors).__name__
        )
        raise ValueError(f"vectors must be a float32 array of shape [n, D], got {got}")
    if secrets not in SECRET_MODES:
        raise ValueError(f"secrets must be one of {', '.join(SECRET_MODES)}, got {secrets!r}")
    n, dim = vectors.shape
    drop = _check_dropped(dropped, n)
    check_values(vectors, value_bound)
    config = SecAggConfig.create(
        n, dim, threshold=threshold, value_bound=value_bound, round_id=round_id
    )
    graph = neighbourhood_graph(n, neighbours, seed)
    config.check_graph(graph)

    bytes_up = np.zeros(n, dtype=np.int64)
    bytes_down = np.zeros(n, dtype=np.int64)
    keygen_s = np.zeros(n)
    share_s = np.zeros(n)
    mask_s = np.zeros(n)
    unmask_s = np.zeros(n)
    server_setup = server_aggregate = server_unmask = 0.0

    clients = []
    for u in range(n):
        t0 = time.perf_counter()
        secret_seed = (
            client_secret_seed(seed, u) if secrets == "reproducible" else _os_secrets.token_bytes(KEY_BYTES)
        )
        clients.append(SecAggClient(u, config, graph, secret_seed))
        keygen_s[u] += time.perf_counter() - t0
    identity_keys = {u: c.identity_public_key for u, c in enumerate(clients)}
    server = SecAggServer(config, graph, identity_keys)

    # Round 0: AdvertiseKeys.
    adverts = []
    for u, client in enumerate(clients):
        t0 = time.perf_counter()
        adverts.append(client.advertise_keys())
        keygen_s[u] += time.perf_counter() - t0
        bytes_up[u] += len(adverts[-1])
    t0 = time.perf_counter()
    routed_adverts = server.collect_adverts(adverts)
    server_setup += time.perf_counter() - t0

    # Round 1: ShareKeys.
    outgoing: list[bytes] = []
    for u, client in enumerate(clients):
        incoming = routed_adverts.get(u, [])
        bytes_down[u] += sum(len(m) for m in incoming)
        t0 = time.perf_counter()
        sent = client.share_keys(incoming, identity_keys)
        share_s[u] += time.perf_counter() - t0
        bytes_up[u] += sum(len(m) for m in sent)
        outgoing.extend(sent)
    t0 = time.perf_counter()
    routed_shares = server.route_shares(outgoing)
    server_setup += time.perf_counter() - t0
    del outgoing
    for u, client in enumerate(clients):
        incoming = routed_shares.get(u, [])
        bytes_down[u] += sum(len(m) for m in incoming)
        t0 = time.perf_counter()
        client.receive_shares(incoming)
        share_s[u] += time.perf_counter() - t0

    # Round 2: MaskedInputCollection. Each pair's mask is expanded once (by a surviving endpoint)
    # and added to both endpoints' running totals; its cost is charged to both. Visiting clients
    # in ring order finishes each client as soon as all its pairs are done, so only the totals of
    # about k clients are alive at once for a SecAgg+ graph.
    keystream = Keystream(dim)
    partners = {u: frozenset(clients[u].mask_partners()) for u in range(n) if u not in drop}
    partial: dict[int, np.ndarray] = {}
    visited: set[int] = set()
    for u in graph.order:
        for v in graph.neighbours[u]:
            if v in visited:
                continue
            ends = [w for w, other in ((u, v), (v, u)) if w in partners and other in partners[w]]
            if not ends:
                continue
            t0 = time.perf_counter()
            mask = keystream.fill(clients[ends[0]].pair_seed(v if ends[0] == u else u))
            expand_s = time.perf_counter() - t0
            for w in ends:
                other = v if w == u else u
                t0 = time.perf_counter()
                acc = partial.get(w)
                if acc is None:
                    acc = partial[w] = np.zeros(dim, dtype=np.uint32)
                if other > w:
                    np.add(acc, mask, out=acc)
                else:
                    np.subtract(acc, mask, out=acc)
                mask_s[w] += expand_s + time.perf_counter() - t0
        visited.add(u)
        if u in drop:
            continue
        pair_total = partial.pop(u, None)
        if pair_total is None:
            pair_total = np.zeros(dim, dtype=np.uint32)
        t0 = time.perf_counter()
        upload = clients[u].masked_upload(vectors[u], pair_mask_total=pair_total)
        mask_s[u] += time.perf_counter() - t0
        bytes_up[u] += len(upload)
        if on_upload is not None:
            on_upload(u, upload)
        t0 = time.perf_counter()
        server.receive_upload(upload)
        server_aggregate += time.perf_counter() - t0
        del upload, pair_total

    # Round 3: Unmasking.
    t0 = time.perf_counter()
    requests = server.unmask_requests()
    server_unmask += time.perf_counter() - t0
    reveals = []
    for v, request in requests.items():
        bytes_down[v] += len(request)
        t0 = time.perf_counter()
        reveals.append(clients[v].reveal_shares(request))
        unmask_s[v] += time.perf_counter() - t0
        bytes_up[v] += len(reveals[-1])
    t0 = time.perf_counter()
    ring_total = server.finish(reveals)
    server_unmask += time.perf_counter() - t0

    survivors = server.survivors
    alive = np.array(survivors, dtype=np.int64)
    per_client = keygen_s + share_s + mask_s
    costs = SecAggCosts(
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        client_keygen_s=keygen_s,
        client_share_s=share_s,
        client_mask_s=mask_s,
        client_unmask_s=unmask_s,
        mean_client_s=float(per_client[alive].mean()),
        server_setup_s=server_setup,
        server_aggregate_s=server_aggregate,
        server_unmask_s=server_unmask,
        wall_s=time.perf_counter() - wall0,
        plain_bytes=4 * dim,
    )
    return SecureSumResult(
        total=decode_sum(ring_total, frac_bits=config.frac_bits),
        fixed_total=centre(ring_total),
        survivors=survivors,
        dropped=server.dropped,
        frac_bits=config.frac_bits,
        upload_digests=tuple(server.upload_digest(u) for u in survivors),
        costs=costs,
    )
