"""One simulated secure-aggregation round: :func:`secure_sum` plays n clients and the server.

Used by the ``masking`` aggregation backend and by the tests; every message between the
roles passes as bytes.
"""

from __future__ import annotations

import multiprocessing
import secrets as _os_secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Protocol

import numpy as np

from gfmfr_secure.rng import SECRET_MODES
from gfmfr_secure.secagg.fixedpoint import centre, check_values, decode_sum
from gfmfr_secure.secagg.masking.client import SecAggClient
from gfmfr_secure.secagg.masking.messages import SecAggTranscript
from gfmfr_secure.secagg.masking.params import NeighbourGraph, SecAggConfig, neighbourhood_graph
from gfmfr_secure.secagg.masking.primitives import KEY_BYTES, Keystream, SecAggError, client_secret_seed, skipped_verify_seconds
from gfmfr_secure.secagg.masking.server import SecAggServer

__all__ = ["FORK_MIN_CLIENTS", "PARALLEL_MIN_DIM", "RowSource", "SecAggCosts", "SecAggRecording", "SecureSumResult", "secure_sum"]

#: Shortest vector whose masking round runs on ``workers`` threads. Threads pay only where
#: the GIL is released: the AES keystream, BLAKE3 and numpy on long vectors. The key rounds
#: (X25519, Ed25519, Shamir, message parsing) hold it, and on threads they run slower than
#: on one (a 943-client count phase, D = 5: 4.1 s on 2 threads, 2.7 s on one); they always
#: run on the calling thread. Timed on 2 cores with 943 clients, the masking round on 2
#: threads loses at 2^16 words (3.7 s against 3.2 s a sum) and wins at 2^17 (4.0 against 4.7).
PARALLEL_MIN_DIM = 1 << 17
#: Fewest clients for which, when ``workers > 1``, a forked process plays half the ring through
#: the GIL-bound rounds (ShareKeys, and the masking round of short vectors): below it the fork
#: and the hand-back of the clients' state cost more than they save.
FORK_MIN_CLIENTS = 128


class RowSource(Protocol):
    """The clients' inputs, one row at a time (e.g. :class:`gfmfr_secure.aggregation.layout.DenseRows`).

    ``shape`` is ``(n, D)``; ``row(u, out)`` returns client u's float32 [D] input, written
    into ``out`` (float32 [D]) or into a new array when ``out`` is None.
    """

    shape: tuple[int, int]

    def row(self, u: int, out: np.ndarray | None = None) -> np.ndarray: ...


class _ArrayRows:
    """A float32 [n, D] array as a :class:`RowSource` (rows are views; ``out`` is not used)."""

    def __init__(self, array: np.ndarray) -> None:
        self.shape = array.shape
        self._array = array

    def row(self, u: int, out: np.ndarray | None = None) -> np.ndarray:
        return self._array[u]


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
class SecAggRecording:
    """Every message the clients sent the server in one round, with the round's public setup.

    Attributes
    ----------
    transcript : adverts and uploads in client order, shares grouped by sender in client
        order, reveals in request order.
    config : the round's :class:`SecAggConfig`.
    graph : the round's :class:`NeighbourGraph`.
    identity_keys : client id -> its Ed25519 identity public key (the PKI).
    """

    transcript: SecAggTranscript
    config: SecAggConfig
    graph: NeighbourGraph
    identity_keys: dict[int, bytes]


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
    upload_digests : BLAKE3 digest of each survivor's masked payload, in the order of ``survivors``.
    costs : :class:`SecAggCosts`.
    recording : :class:`SecAggRecording` when ``record=True``, else None.
    """

    total: np.ndarray
    fixed_total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    frac_bits: int
    upload_digests: tuple[bytes, ...]
    costs: SecAggCosts
    recording: SecAggRecording | None = None


def _check_dropped(dropped: Sequence[int], n: int) -> frozenset[int]:
    ids = [int(u) for u in dropped]
    bad = [u for u in ids if not 0 <= u < n]
    if bad:
        raise ValueError(f"dropped ids must lie in [0, {n}), got {bad[:5]}")
    if len(set(ids)) != len(ids):
        raise ValueError("dropped ids must be distinct")
    return frozenset(ids)


@dataclass(frozen=True, eq=False)
class _ArcJob:
    """Round 2 for a contiguous arc of the ring: pair masks, masked uploads, delivery to the server.

    Each pair's mask is expanded once when both endpoints lie on the arc and once per
    endpoint otherwise (only pairs across the ends of an arc: about ``k^2 / 4`` per arc),
    and added to the running totals of its surviving endpoints on the arc; its cost is
    charged to each of them. Visiting the arc in ring order finishes a client as soon as
    all its pairs are done, so only the totals of about k clients are alive per arc.
    """

    clients: list[SecAggClient]
    rows: RowSource
    partners: dict[int, frozenset[int]]
    drop: frozenset[int]
    graph: NeighbourGraph
    mask_s: np.ndarray
    bytes_up: np.ndarray
    deliver: Callable[[int, bytes], None]

    def run(self, arc: list[int]) -> None:
        on_arc = set(arc)
        dim = self.rows.shape[1]
        keystream = Keystream(dim)
        row_buffer = np.empty(dim, dtype=np.float32)  # one per arc, reused: no fresh pages per client
        partial: dict[int, np.ndarray] = {}
        visited: set[int] = set()
        for u in arc:
            for v in self.graph.neighbours[u]:
                if v in visited:
                    continue
                ends = [w for w, other in ((u, v), (v, u)) if w in on_arc and w in self.partners and other in self.partners[w]]
                if not ends:
                    continue
                t0 = time.perf_counter()
                mask = keystream.fill(self.clients[ends[0]].pair_seed(v if ends[0] == u else u))
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
                    self.mask_s[w] += expand_s + time.perf_counter() - t0
            visited.add(u)
            if u in self.drop:
                continue
            pair_total = partial.pop(u, None)
            if pair_total is None:
                pair_total = np.zeros(dim, dtype=np.uint32)
            t0 = time.perf_counter()
            upload = self.clients[u].masked_upload(self.rows.row(u, row_buffer), pair_mask_total=pair_total)
            self.mask_s[u] += time.perf_counter() - t0
            self.bytes_up[u] += len(upload)
            self.deliver(u, upload)


def _expect(conn: Connection, tag: str) -> tuple:
    """The next message from the forked half of the ring, which must be ``tag``; its error re-raised."""
    try:
        got = conn.recv()
    except EOFError:
        raise RuntimeError("the forked process playing half the ring exited without answering") from None
    if got[0] == "error":
        raise got[1]
    if got[0] != tag:  # pragma: no cover - the two halves run the same code
        raise RuntimeError(f"the forked half of the ring sent {got[0]!r}, expected {tag!r}")
    return got[1:]


def _can_fork() -> bool:
    """Whether this process may fork a child: the platform has ``fork`` and this is no daemonic process."""
    return "fork" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon


def _arcs(graph: NeighbourGraph, k: int) -> list[list[int]]:
    """The ring (``graph.order``) cut into ``k`` contiguous arcs (fewer when there are fewer clients)."""
    n = len(graph.order)
    return [[int(u) for u in a] for a in np.array_split(np.asarray(graph.order), max(1, min(k, n))) if len(a)]


def _forked_half(
    clients: list[SecAggClient],
    config: SecAggConfig,
    graph: NeighbourGraph,
    halves: list[list[int]],
    share: Callable[[int], list[bytes]],
    route: Callable[[list[bytes]], dict[int, list[bytes]]],
    receive: Callable[[int, list[bytes]], None],
    mask_arc: Callable[[list[int], Callable[[int, bytes], None]], None] | None,
    deliver: Callable[[int, bytes], None],
    costs: tuple[np.ndarray, ...],
) -> list[bytes]:
    """Round 1 (and round 2 when ``mask_arc`` is given) with the second arc of ``halves`` played by a forked process.

    Returns the share messages in client order. These rounds hold the GIL (X25519,
    ChaCha20-Poly1305, Ed25519, Shamir, Python), so threads cannot split them; a forked child,
    which inherits the clients and the routed keys, can. The child sends its clients' share
    messages, receives the shares the server routed to them, masks their inputs
    (``mask_arc``), and hands back their masked uploads, each client's state
    (:meth:`SecAggClient.export_state`) and its entries of ``costs`` (per-client arrays
    that ``share``, ``receive`` and ``mask_arc`` add to); the parent plays the first arc
    meanwhile, passes the child's uploads to ``deliver`` and resumes its clients
    (:meth:`SecAggClient.resume`). Messages, routing and errors are those of the
    one-process round; an error of the parent's arc is raised first.
    """
    here_arc, their_arc = halves
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()

    def child() -> None:
        here.close()
        try:
            try:
                there.send(("sent", {u: share(u) for u in their_arc}))
                routed = there.recv()
                for u in their_arc:
                    receive(u, routed[u])
                masked: list[tuple[int, bytes]] = []
                if mask_arc is not None:
                    mask_arc(their_arc, lambda u, upload: masked.append((u, upload)))
                states = {u: clients[u].export_state() for u in their_arc}
                there.send(("state", states, [c[their_arc] for c in costs], masked))
            except (SecAggError, ValueError) as err:
                there.send(("error", err))
        except (EOFError, BrokenPipeError):  # the parent stopped the round (an error of its own arc) and closed the pipe
            return

    proc = ctx.Process(target=child, name="secagg-half-ring", daemon=True)
    proc.start()
    there.close()
    try:
        sent = {u: share(u) for u in here_arc}
        (theirs_sent,) = _expect(here, "sent")
        sent.update(theirs_sent)
        outgoing = [m for u in range(len(clients)) for m in sent[u]]
        routed = route(outgoing)
        here.send({u: routed.get(u, []) for u in their_arc})
        for u in here_arc:
            receive(u, routed.get(u, []))
        if mask_arc is not None:
            mask_arc(here_arc, deliver)
        states, parts, masked = _expect(here, "state")
    finally:
        here.close()
        proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for array, part in zip(costs, parts, strict=True):
        array[their_arc] = part
    for u, state in states.items():
        clients[u] = SecAggClient.resume(config, graph, state)
    for u, upload in masked:
        deliver(u, upload)
    return outgoing


def secure_sum(
    vectors: np.ndarray | RowSource,
    *,
    value_bound: float,
    threshold: int,
    neighbours: int | None,
    seed: int,
    dropped: Sequence[int] = (),
    round_id: int = 0,
    on_upload: Callable[[int, bytes], None] | None = None,
    secrets: str = "os",
    workers: int = 1,
    record: bool = False,
) -> SecureSumResult:
    """Simulate one full secure-aggregation round for n clients and return the survivors' sum.

    Clients in ``dropped`` take part in the key rounds, then vanish before uploading; their
    pairwise masks are recovered from the survivors' shares.

    Parameters
    ----------
    vectors : float32 [n, D], row u is client u's input; ``|x| <= value_bound``, finite. Or a
        :class:`RowSource` giving the rows one at a time (each row is then checked when its
        client encodes it, and a bad row stops the round there with the same error).
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
    workers : threads for the masking round (clients masking, the server hashing and checking
        their uploads) and the server's unmasking, when ``D >= PARALLEL_MIN_DIM``: the AES
        keystream, BLAKE3 and numpy release the GIL, the bulk of such a round. The key rounds
        hold the GIL and run on the calling thread, and so does everything for shorter vectors.
        The ring is cut into one arc per thread: pairs across two arcs are expanded once per
        arc. The sum does not depend on ``workers``.

    Returns
    -------
    SecureSumResult
    """
    wall0 = time.perf_counter()
    if isinstance(vectors, np.ndarray):
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise ValueError(f"vectors must be a float32 array of shape [n, D], got {vectors.dtype} {vectors.shape}")
        check_values(vectors, value_bound)
        rows: RowSource = _ArrayRows(vectors)
    elif callable(getattr(vectors, "row", None)) and len(getattr(vectors, "shape", ())) == 2:
        rows = vectors
    else:
        raise ValueError(f"vectors must be a float32 array of shape [n, D] or a RowSource, got {type(vectors).__name__}")
    if secrets not in SECRET_MODES:
        raise ValueError(f"secrets must be one of {', '.join(SECRET_MODES)}, got {secrets!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    n, dim = (int(v) for v in rows.shape)
    drop = _check_dropped(dropped, n)
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

    threads = workers if dim >= PARALLEL_MIN_DIM else 1
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    run = pool.map if pool is not None else map  # the masking round only (see PARALLEL_MIN_DIM)
    try:
        # Round 0: AdvertiseKeys (each client makes its keys from its own secret seed).
        def make_client(u: int) -> tuple[SecAggClient, bytes]:
            t0 = time.perf_counter()
            secret_seed = client_secret_seed(seed, u) if secrets == "reproducible" else _os_secrets.token_bytes(KEY_BYTES)
            client = SecAggClient(u, config, graph, secret_seed)
            advert = client.advertise_keys()
            keygen_s[u] += time.perf_counter() - t0
            bytes_up[u] += len(advert)
            return client, advert

        made = list(map(make_client, range(n)))
        clients = [c for c, _ in made]
        identity_keys = {u: c.identity_public_key for u, c in enumerate(clients)}
        server = SecAggServer(config, graph, identity_keys, workers=threads)
        t0 = time.perf_counter()
        adverts = tuple(a for _, a in made)
        routed_adverts = server.collect_adverts(adverts)
        server_setup += time.perf_counter() - t0
        del made

        # Round 1: ShareKeys.
        def share(u: int) -> list[bytes]:
            incoming = routed_adverts.get(u, [])
            bytes_down[u] += sum(len(m) for m in incoming)
            t0, skipped0 = time.perf_counter(), skipped_verify_seconds()
            sent = clients[u].share_keys(incoming, identity_keys)
            # a neighbour's advertisement the server (or another client) verified already is not
            # verified again in this process; its verification time is still this client's cost
            share_s[u] += time.perf_counter() - t0 + skipped_verify_seconds() - skipped0
            bytes_up[u] += sum(len(m) for m in sent)
            return sent

        def route(outgoing: list[bytes]) -> dict[int, list[bytes]]:
            nonlocal server_setup
            t0 = time.perf_counter()
            routed = server.route_shares(outgoing)
            server_setup += time.perf_counter() - t0
            return routed

        def receive(u: int, incoming: list[bytes]) -> None:
            bytes_down[u] += sum(len(m) for m in incoming)
            t0 = time.perf_counter()
            clients[u].receive_shares(incoming)
            share_s[u] += time.perf_counter() - t0

        # Round 2: MaskedInputCollection, one arc of the ring at a time (see _ArcJob).
        lock = threading.Lock()
        server_s = np.zeros(n)
        uploads: dict[int, bytes] = {}

        def deliver(u: int, upload: bytes) -> None:
            t0 = time.perf_counter()
            checked = server.check_upload(upload)  # hashing and the signature, in parallel
            with lock:
                if on_upload is not None:
                    on_upload(u, upload)
                if record:
                    uploads[u] = upload
                server.accept_upload(checked)
            server_s[u] = time.perf_counter() - t0

        def mask_arc(arc: list[int], send: Callable[[int, bytes], None]) -> None:
            partners = {u: frozenset(clients[u].mask_partners()) for u in arc if u not in drop}
            _ArcJob(clients, rows, partners, drop, graph, mask_s, bytes_up, send).run(arc)

        if workers > 1 and n >= FORK_MIN_CLIENTS and _can_fork():
            # Rounds 1 and 2 hold the GIL (round 2 only for short vectors): a forked process plays
            # half the ring through them
            masked = threads == 1
            outgoing = _forked_half(
                clients, config, graph, _arcs(graph, 2), share, route, receive, mask_arc if masked else None, deliver,
                (share_s, mask_s, bytes_up, bytes_down),
            )
        else:
            masked = False
            outgoing = [m for u in range(n) for m in share(u)]
            routed_shares = route(outgoing)
            for u in range(n):
                receive(u, routed_shares.get(u, []))
        shares = tuple(outgoing) if record else ()
        del outgoing
        if not masked:
            list(run(lambda arc: mask_arc(arc, deliver), _arcs(graph, threads)))
        server_aggregate = float(server_s.sum())

        # Round 3: Unmasking.
        t0 = time.perf_counter()
        requests = server.unmask_requests()
        server_unmask += time.perf_counter() - t0

        def reveal(item: tuple[int, bytes]) -> bytes:
            v, request = item
            bytes_down[v] += len(request)
            t0 = time.perf_counter()
            answer = clients[v].reveal_shares(request)
            unmask_s[v] += time.perf_counter() - t0
            bytes_up[v] += len(answer)
            return answer

        reveals = list(map(reveal, requests.items()))
        t0 = time.perf_counter()
        ring_total = server.finish(reveals)
        server_unmask += time.perf_counter() - t0
    finally:
        if pool is not None:
            pool.shutdown()

    survivors = server.survivors
    recording = (
        SecAggRecording(SecAggTranscript(adverts, shares, tuple(uploads[u] for u in sorted(uploads)), tuple(reveals)), config, graph, identity_keys)
        if record
        else None
    )
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
        recording=recording,
    )
