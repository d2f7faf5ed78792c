"""The client side of a ``masking`` sum across machines: one node's SecAgg+ parties.

Under a Flower deployment the secure sum runs for real between the machines: every
cohort member with an upload is its own party of the SecAgg+ protocol
(:class:`~gfmfr_secure.secagg.masking.SecAggClient`: its own keys, masks and Shamir
shares), played on the node that hosts it; the server's transport plays
:class:`~gfmfr_secure.secagg.masking.SecAggServer` and relays the wire messages
(:class:`~gfmfr_secure.roles.messages.SecAggStep`). :class:`NodeParties` answers one step
for the node's parties; between steps (one process per Flower message) each party's
state (:meth:`SecAggClient.export_state`, which holds its secret seed) is kept in
:class:`PartyRound`, which the node writes to its own state file, on its own machine.

What each party uploads is what the in-process engine's simulation sums for it: its
dense group-indexed layout (:func:`~gfmfr_secure.aggregation.layout.noisy_dense_uploads`)
with its DP noise share sized for every party of the sum
(:meth:`~gfmfr_secure.roles.inprocess.InProcessClients.release_input`).
"""

from __future__ import annotations

import dataclasses
import secrets as os_secrets
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gfmfr_secure.client.checks import ClientRefusal
from gfmfr_secure.roles.messages import SecAggRound, SecAggStep, SumRequest, pack_blobs
from gfmfr_secure.secagg.masking.client import SecAggClient
from gfmfr_secure.secagg.masking.params import NeighbourGraph, SecAggConfig, neighbourhood_graph
from gfmfr_secure.secagg.masking.primitives import KEY_BYTES, SecAggError, client_secret_seed

__all__ = ["NodeParties", "PartyRound", "round_parameters"]

def round_parameters(step: Any) -> tuple[SecAggConfig, NeighbourGraph]:
    """The SecAgg config and neighbourhood graph a step (or :class:`PartyRound`) announces."""
    config = SecAggConfig.create(int(step.n_parties), int(step.dim), threshold=int(step.threshold), value_bound=float(step.value_bound), round_id=int(step.round_id))
    return config, neighbourhood_graph(int(step.n_parties), int(step.neighbours) or None, int(step.graph_seed))


@dataclass(frozen=True, eq=False)
class PartyRound(SecAggRound):
    """The node's parties in one secure sum, kept between messages in the node's state file.

    Attributes
    ----------
    round .. value_bound : the round's public parameters (:class:`~gfmfr_secure.roles.messages.SecAggRound`).
    parties : int64 [m] the party index of each of the node's parties still in the protocol.
    users : int64 [m] their user ids.
    states : uint8 [B] their :meth:`SecAggClient.export_state` bytes, concatenated; offsets int64 [m + 1].
    uploads : uint8 [U] the masked uploads they sent (empty before the upload step), concatenated;
        upload_offsets int64 [m + 1] (the count check needs each party's own bytes).
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {
        "parties": ("int64", 1), "users": ("int64", 1), "states": ("uint8", 1), "offsets": ("int64", 1), "uploads": ("uint8", 1), "upload_offsets": ("int64", 1),
    }

    parties: np.ndarray
    users: np.ndarray
    states: np.ndarray
    offsets: np.ndarray
    uploads: np.ndarray
    upload_offsets: np.ndarray

    def check(self, step: SecAggStep) -> None:
        """Raise :class:`SecAggError` unless ``step`` continues this round with the same parameters."""
        mine, theirs = self.parameters(), step.parameters()
        changed = [k for k in mine if mine[k] != theirs[k]]
        if changed:
            raise SecAggError(f"the {step.step} step changes the round's {', '.join(changed)}: this node's parties refuse it")

    def clients(self) -> dict[int, SecAggClient]:
        """Party index -> its client, resumed from its kept state."""
        config, graph = round_parameters(self)
        data = self.states.tobytes()
        return {int(p): SecAggClient.resume(config, graph, data[int(a) : int(b)]) for p, a, b in zip(self.parties.tolist(), self.offsets[:-1], self.offsets[1:], strict=True)}

    def keep(self, clients: dict[int, SecAggClient], uploads: list[bytes] | None = None) -> PartyRound:
        """This round with ``clients`` (party -> client; parties left out have left the protocol) and their ``uploads``, if sent."""
        parties = sorted(clients)
        users = self.users[np.searchsorted(self.parties, parties)] if parties else np.zeros(0, dtype=np.int64)
        states, offsets = pack_blobs([clients[p].export_state() for p in parties])
        sent, sent_offsets = pack_blobs(uploads) if uploads is not None else (self.uploads, self.upload_offsets)
        return dataclasses.replace(
            self, parties=np.asarray(parties, dtype=np.int64), users=np.asarray(users, dtype=np.int64), states=states, offsets=offsets,
            uploads=sent, upload_offsets=sent_offsets,
        )

    def own_uploads(self) -> tuple[bytes, ...]:
        """The masked uploads the parties sent, as bytes."""
        data = self.uploads.tobytes()
        return tuple(data[int(a) : int(b)] for a, b in zip(self.upload_offsets[:-1], self.upload_offsets[1:], strict=True))


class NodeParties:
    """One node's parties: answers each :class:`SecAggStep` for the node's uploads.

    Parameters
    ----------
    clients : the node's :class:`~gfmfr_secure.roles.inprocess.InProcessClients` (its
        uploads of the round, DP plan, secret source and backend settings).
    kept : the round's state from the previous step, or None.
    """

    def __init__(self, clients: Any, kept: PartyRound | None) -> None:
        self.clients, self.kept = clients, kept

    def answer(self, step: SecAggStep, request: SumRequest | None) -> tuple[SecAggStep, PartyRound | None]:
        """The reply to ``step`` and the state to keep for the next one."""
        if step.step == "advertise":
            return self._advertise(step)
        if self.kept is None:
            raise SecAggError(f"round {step.round}: a {step.step} step reached this node before its parties advertised keys")
        self.kept.check(step)
        clients = self.kept.clients()
        if step.step == "share":
            return self._share(step, clients)
        if step.step == "upload":
            if request is None:
                raise SecAggError(f"round {step.round}: the upload step carries no sum request")
            return self._upload(step, request, clients)
        if step.step == "reveal":
            return self._reveal(step, clients)
        if step.step == "check":
            if request is None:
                raise SecAggError(f"round {step.round}: the check step carries no sum request")
            return self._check(step, request), self.kept
        raise SecAggError(f"unknown secure-sum step {step.step!r}")

    def _advertise(self, step: SecAggStep) -> tuple[SecAggStep, PartyRound | None]:
        """Check the round's parameters, make each party's keys; reply with the signed adverts and identity keys."""
        upload = self.clients.upload
        if upload is None:
            raise SecAggError(f"round {step.round}: keys were asked for before any upload")
        aggregator = self.clients.aggregator
        config = round_parameters(step)[0]
        try:  # check_round_parameters, as each client runs it before it takes part
            aggregator.check_clients_accept(config.n_clients, config.dim, config.threshold, int(step.neighbours) or None, int(step.graph_seed), config.round_id)
        except ClientRefusal as err:
            return step.answer("advertise", [], [], refused=str(err)), None
        config, graph = round_parameters(step)
        mine = np.flatnonzero(np.isin(step.parties, upload.clients))
        reproducible = aggregator.secrets.reproducible  # secrets=reproducible: the in-process simulation's seeds
        clients = {}
        for p in mine.tolist():
            seed = client_secret_seed(int(step.graph_seed), p) if reproducible else os_secrets.token_bytes(KEY_BYTES)
            clients[p] = SecAggClient(p, config, graph, seed)
        adverts = [clients[p].advertise_keys() for p in sorted(clients)]
        kept = PartyRound(
            **step.parameters(), parties=mine.astype(np.int64), users=step.parties[mine],
            states=np.zeros(0, dtype=np.uint8), offsets=np.zeros(1, dtype=np.int64), uploads=np.zeros(0, dtype=np.uint8), upload_offsets=np.zeros(1, dtype=np.int64),
        ).keep(clients)
        return step.answer("advertise", sorted(clients), adverts, {p: c.identity_public_key for p, c in clients.items()}), kept

    def _share(self, step: SecAggStep, clients: dict[int, SecAggClient]) -> tuple[SecAggStep, PartyRound]:
        """Each party verifies its neighbours' adverts and sends its encrypted shares; one with too few neighbours aborts."""
        routed, pki = step.messages(), step.identity_keys()
        owners, blobs, active = [], [], {}
        for p, client in sorted(clients.items()):
            try:
                sent = client.share_keys(routed.get(p, []), pki)
            except SecAggError:  # too few neighbours advertised: this party aborts the round (it drops out)
                continue
            active[p] = client
            owners += [p] * len(sent)
            blobs += sent
        return step.answer("share", owners, blobs), self.kept.keep(active)

    def _upload(self, step: SecAggStep, request: SumRequest, clients: dict[int, SecAggClient]) -> tuple[SecAggStep, PartyRound]:
        """Each party takes its neighbours' shares, then uploads its masked dense layout."""
        routed = step.messages()
        vectors, members, groups, _ = self.clients.dense_input(request, int(step.n_parties))
        row = dict(zip(members.tolist(), range(members.size), strict=True))
        users = dict(zip(self.kept.parties.tolist(), self.kept.users.tolist(), strict=True))
        owners, blobs = [], []
        for p, client in sorted(clients.items()):
            client.receive_shares(routed.get(p, []))
            owners.append(p)
            blobs.append(client.masked_upload(vectors[row[users[p]]]))
        if groups is not None and request.phase == "sums":  # each party keeps the group its upload was summed in
            self.clients.node.commit_groups(members, groups)
        reply = step.answer("upload", owners, blobs, unclipped_query=float(self.clients.node.unclipped_query()))
        return reply, self.kept.keep(clients, blobs)

    def _check(self, step: SecAggStep, request: SumRequest) -> SecAggStep:
        """The clients' check of the counts the server reports (``step.reported``) against the phase's transcript.

        The transcript travels in ``blobs`` (``owners``: 0 adverts, 1 shares, 2 uploads,
        3 reveals) with the PKI the server used; it is replayed with the public server and
        each party's own upload must be in it (:func:`~gfmfr_secure.client.checks.verify_count_evidence`).
        The reply is refused when a check fails.
        """
        from gfmfr_secure.client.checks import CountEvidence, SecAggTranscript, check_reported_counts, verify_count_evidence
        from gfmfr_secure.roles.server import COUNT_TOLERANCE

        parts: list[list[bytes]] = [[], [], [], []]
        data = step.blobs.tobytes()
        for i, kind in enumerate(step.owners.tolist()):
            parts[int(kind)].append(data[int(step.offsets[i]) : int(step.offsets[i + 1])])
        config, graph = round_parameters(self.kept)
        layout = self.clients.dense_input(request, int(step.n_parties))[3]
        evidence = CountEvidence(layout, SecAggTranscript(*(tuple(p) for p in parts)), config, graph, step.identity_keys(), self.kept.own_uploads())
        try:
            check_reported_counts(step.reported, verify_count_evidence(evidence), tolerance=COUNT_TOLERANCE)
        except ClientRefusal as err:
            return step.answer("check", [], [], refused=str(err))
        return step.answer("check", [], [])

    def _reveal(self, step: SecAggStep, clients: dict[int, SecAggClient]) -> tuple[SecAggStep, PartyRound]:
        """Each surviving party answers its unmask request (shares of survivors' b_u, of dropped parties' mask keys)."""
        owners, blobs = [], []
        for p, requests in sorted(step.messages().items()):
            if p not in clients:
                raise SecAggError(f"unmask request for party {p}, which is not one of this node's parties in the round")
            for request in requests:
                owners.append(p)
                blobs.append(clients[p].reveal_shares(request))
        return step.answer("reveal", owners, blobs), self.kept.keep(clients)
