"""The server's part of a ``masking`` sum across SuperNodes: :class:`SecAggServer` plus message relay.

Every cohort member with an upload is a party of one SecAgg+ round (Bonawitz et al.
2017 with Bell et al. 2020's neighbourhoods, :mod:`gfmfr_secure.secagg.masking`); its
client role runs on the node that hosts it (:mod:`gfmfr_secure.roles.secagg_party`).
:func:`relay_secure_sum` plays the server role and relays the wire messages, one Flower
message per node and step (:class:`~gfmfr_secure.roles.messages.SecAggStep`)::

    advertise -> collect_adverts -> share -> route_shares -> upload (masked) ->
    receive_upload -> unmask_requests -> reveal -> finish

It never holds a client secret: it sees signed public keys, share ciphertexts it cannot
read, masked uploads and the shares survivors reveal. A node that does not answer a
step is dropped (:meth:`FlowerClients._exchange`); its parties then count as dropped
at that step: before uploading, their pairwise masks are removed with the shares the
survivors reveal (dropout recovery), while at least ``t`` of every neighbourhood remain.

The round's public parameters are those the in-process backend uses for the same
round (:class:`~gfmfr_secure.aggregation.masking.MaskingAggregator`: threshold and
SecAgg+ degree from the number of parties, graph seed and round id from the backend's
count of sums), so the released sum is the in-process one. Parties are numbered in
client-id order, as the in-process simulation numbers the merged uploads.

There is no PKI between the machines: each party's Ed25519 identity key is made for the
round and reaches the other parties through this relay with its advert, so the
protocol's signatures authenticate messages against other parties and the network, not
against the relaying server (the honest-but-curious server of the protocol's threat model).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gfmfr_secure.roles.messages import SecAggStep, SumRequest
from gfmfr_secure.rng import derive_seed
from gfmfr_secure.secagg.fixedpoint import decode_sum as decode_ring
from gfmfr_secure.secagg.masking.params import SecAggConfig, neighbourhood_graph
from gfmfr_secure.secagg.masking.server import SecAggServer

__all__ = ["RelayedSum", "relay_count_check", "relay_secure_sum"]

#: ``exchange(kind, request or {node: request}, nodes, extra) -> {node: reply}`` (FlowerClients._exchange, bound)
Exchange = Callable[[str, Any, list[int], dict[str, Any] | None], dict[int, SecAggStep]]


@dataclass(frozen=True)
class RelayedSum:
    """Outcome of :func:`relay_secure_sum`.

    Attributes
    ----------
    total : float64 [D] the decoded sum of the survivors' uploads (None when refused).
    parties : n, the parties the round started with.
    survivors : parties whose masked upload was summed.
    recovered : dropped parties whose pairwise masks were removed from the sum.
    refused : why the clients refused the round's parameters, or "".
    unclipped_query : the nodes' adaptive-clipping query sums, added.
    bytes_up : bytes the parties sent (adverts with identity keys, shares, uploads, reveals).
    seconds : wall time of the four steps.
    transcript : every protocol message the server received: (adverts, shares, uploads, reveals).
    identity_keys : the PKI the server checked them with (party -> raw Ed25519 public key, every party).
    step : the round's advertise request (its public parameters).
    """

    total: np.ndarray | None
    parties: int
    survivors: int
    recovered: int
    refused: str
    unclipped_query: float
    bytes_up: int
    seconds: float
    transcript: tuple[list[bytes], list[bytes], list[bytes], list[bytes]] = ([], [], [], [])
    identity_keys: dict[int, bytes] | None = None
    step: SecAggStep | None = None


def _step(msg: SumRequest, aggregator: Any, parties: np.ndarray, dim: int) -> tuple[SecAggStep, SecAggConfig, Any]:
    """The advertise request of the next secure sum over ``parties`` (int64 [n] user ids), its config and graph."""
    n = int(parties.size)
    neighbours, threshold = aggregator._round_shape(n)  # noqa: SLF001 - the backend's own rule for a round of n
    round_id = int(aggregator.rounds_done)
    seed = derive_seed(aggregator.seed, "masking", round_id)
    value_bound = 8.0 if aggregator.settings is None else float(aggregator.settings.value_bound)
    config = SecAggConfig.create(n, dim, threshold=threshold, value_bound=value_bound, round_id=round_id)
    z = np.zeros(0, dtype=np.int64)
    step = SecAggStep(
        round=int(msg.round), phase=msg.phase, step="advertise", round_id=round_id, n_parties=n, dim=dim, threshold=threshold,
        neighbours=neighbours or 0, graph_seed=seed, value_bound=value_bound, parties=parties, owners=z, blobs=np.zeros(0, dtype=np.uint8),
        offsets=np.zeros(1, dtype=np.int64), key_owners=z, keys=np.zeros((0, 32), dtype=np.uint8),
    )
    return step, config, neighbourhood_graph(n, neighbours, seed)


def _by_node(routed: dict[int, list[bytes]], home: dict[int, int], step: SecAggStep, name: str, keys: dict[int, bytes] | None = None) -> dict[int, SecAggStep]:
    """One request per node: the routed messages of its parties (``home``: party -> node)."""
    owners: dict[int, list[int]] = {}
    blobs: dict[int, list[bytes]] = {}
    for party in sorted(routed):
        node = home[party]
        for blob in routed[party]:
            owners.setdefault(node, []).append(party)
            blobs.setdefault(node, []).append(blob)
    return {node: step.answer(name, owners.get(node, []), blobs.get(node, []), keys) for node in sorted(set(home.values()))}


def _sent(replies: dict[int, SecAggStep]) -> list[bytes]:
    """Every protocol message in ``replies``, node by node in party order."""
    return [blob for node in sorted(replies) for _, blobs in sorted(replies[node].messages().items()) for blob in blobs]


def relay_secure_sum(exchange: Exchange, msg: SumRequest, aggregator: Any, hosted: dict[int, np.ndarray], dim: int) -> RelayedSum:
    """Run one SecAgg+ round among the parties ``hosted`` (node -> int64 user ids with an upload) over ``exchange``.

    Parameters
    ----------
    exchange : sends one step to nodes and returns their decoded replies (missing nodes are dropped).
    msg : the sum request; it travels with the upload step (each party builds its dense upload from it).
    aggregator : the run's :class:`~gfmfr_secure.aggregation.masking.MaskingAggregator` (round shape,
        seeds, value bound); its count of sums advances by one.
    dim : D, the length of every party's dense upload.

    Raises
    ------
    SecAggError
        A forged or malformed message, or too few survivors (fewer than ``t`` of a neighbourhood).
    """
    t0 = time.perf_counter()
    parties = np.sort(np.concatenate([np.asarray(u, dtype=np.int64) for u in hosted.values()])) if hosted else np.zeros(0, dtype=np.int64)
    home = {int(np.searchsorted(parties, u)): node for node, users in hosted.items() for u in users.tolist()}
    step, config, graph = _step(msg, aggregator, parties, dim)
    kind = f"{msg.phase}-"
    replies = exchange(kind + "advertise", step, sorted(hosted), None)
    refused = "; ".join(r.refused for r in replies.values() if r.refused)
    if refused:
        return RelayedSum(None, int(parties.size), 0, 0, refused, 0.0, 0, time.perf_counter() - t0)
    pki: dict[int, bytes] = {}
    for reply in replies.values():
        pki.update(reply.identity_keys())
    nobody = Ed25519PrivateKey.generate().public_key().public_bytes_raw()  # parties that never advertised: no message of theirs verifies
    identity_keys = {p: pki.get(p, nobody) for p in range(config.n_clients)}
    server = SecAggServer(config, graph, identity_keys)
    adverts = _sent(replies)
    sent = sum(len(b) for b in adverts) + 32 * len(pki)
    routed = server.collect_adverts(adverts)
    replies = exchange(kind + "share", _by_node(routed, home, step, "share", pki), sorted({home[p] for p in routed}), None)
    shares = _sent(replies)
    routed = server.route_shares(shares)
    senders = {p for r in replies.values() for p in r.owners.tolist()}
    requests = _by_node({p: routed.get(p, []) for p in senders}, home, step, "upload")
    replies = exchange(kind + "upload", requests, sorted(requests), {"sum": msg})
    uploads = _sent(replies)
    for upload in uploads:
        server.receive_upload(upload)
    unclipped = float(sum(r.unclipped_query for r in replies.values()))
    unmask = server.unmask_requests()
    requests = _by_node({p: [b] for p, b in unmask.items()}, home, step, "reveal")
    replies = exchange(kind + "reveal", requests, sorted(requests), None)
    reveals = _sent(replies)
    total = decode_ring(server.finish(reveals), frac_bits=config.frac_bits)
    aggregator.rounds_done += 1
    sent += sum(len(b) for part in (shares, uploads, reveals) for b in part)
    survivors = len(server.survivors)
    recovered = sum(1 for u in server.dropped if set(graph.neighbours[u]) & set(server.survivors))
    transcript = (adverts, shares, uploads, reveals)
    return RelayedSum(total, int(parties.size), survivors, recovered, "", unclipped, sent, time.perf_counter() - t0, transcript, identity_keys, step)


def relay_count_check(exchange: Exchange, msg: SumRequest, out: RelayedSum, counts: np.ndarray, nodes: list[int]) -> str:
    """Ask ``nodes`` whether their parties accept ``counts`` (float64 [G]) as the count phase's release.

    Each node replays ``out.transcript`` with the public server and checks its parties'
    own uploads are in it (:meth:`~gfmfr_secure.roles.secagg_party.NodeParties`, step
    ``check``). Returns the refusals, "" when every node accepts.
    """
    if out.step is None or out.identity_keys is None:
        raise ValueError("relay_count_check needs a completed secure sum")
    kinds = [k for k, part in enumerate(out.transcript) for _ in part]
    blobs = [b for part in out.transcript for b in part]
    request = dataclasses.replace(out.step.answer("check", kinds, blobs, out.identity_keys), reported=np.asarray(counts, dtype=np.float64))
    replies = exchange(f"{msg.phase}-check", request, nodes, {"sum": msg})
    return "; ".join(r.refused for r in replies.values() if r.refused)
