"""The node side of a ``ckks`` sum across machines: the clients' encryption and the key holder.

Under a Flower deployment each cohort member with an upload encrypts its own dense
group-indexed layout, with its DP noise share, on the node that hosts it
(:meth:`~gfmfr_secure.roles.inprocess.InProcessClients.dense_input`, the upload the
in-process backend encrypts for it), under the round's public context. The server's
transport only adds ciphertexts. The key holder (``aggregation.custody=authority``) is
the node hosting user 0 (node config ``partition-id=0``): for each sum it makes fresh
keys, sends the public context only, decrypts the encrypted sum once, floods it and,
under central DP, adds the central draw before releasing it, as
:class:`~gfmfr_secure.aggregation.ckks.CKKSAggregatorBackend` does in process. Between
its messages (one process per Flower message) the round's secret context is kept in
:class:`KeyRound`, in the node's own state file, and dropped after the one decryption;
the count phase's release is kept until the clients' check of the reported counts.

The key holder shares its machine with the clients of partition 0, whose plaintext uploads
that machine holds anyway; it receives the other nodes' uploads only as their encrypted
sum.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gfmfr_secure.client.checks import ClientRefusal, CountEvidence, check_reported_counts, verify_count_evidence
from gfmfr_secure.roles.messages import CKKS_WIRE, CKKSStep, Message, SumRequest
from gfmfr_secure.secagg.ckks.primitives import CKKSError

__all__ = ["KeyRound", "NodeCKKS"]


@dataclass(frozen=True, eq=False)
class KeyRound(Message):
    """The key holder's state in one sum, kept between messages in its node's state file.

    Attributes
    ----------
    round, phase, round_id, n_parties, dim, value_bound : the round's public parameters (:class:`CKKSStep`).
    secret : uint8 [S] the round's context with its secret key (empty once the sum was decrypted).
    released : float64 [D] the release of the sum (None before the decryption).
    """

    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {"secret": ("uint8", 1), "released": ("float64", 1)}

    round: int
    phase: str
    round_id: int
    n_parties: int
    dim: int
    value_bound: float
    secret: np.ndarray
    released: np.ndarray | None = None

    def check(self, step: CKKSStep) -> None:
        """Raise :class:`CKKSError` unless ``step`` continues this round with the same parameters."""
        mine = {k: getattr(self, k) for k in step.parameters()}
        changed = [k for k, v in step.parameters().items() if mine[k] != v]
        if changed:
            raise CKKSError(f"the {step.step} step changes the round's {', '.join(changed)}: the key holder refuses it")


class NodeCKKS:
    """One node's part of a ``ckks`` sum: its clients' encryption and, on the key holder's node, the keys.

    Parameters
    ----------
    clients : the node's :class:`~gfmfr_secure.roles.inprocess.InProcessClients`.
    kept : the key holder's state from its previous step, or None.
    key_holder : whether this node is the key holder.
    """

    def __init__(self, clients: Any, kept: KeyRound | None, key_holder: bool) -> None:
        self.clients, self.kept, self.key_holder = clients, kept, bool(key_holder)

    def answer(self, step: CKKSStep, request: SumRequest | None) -> tuple[CKKSStep, KeyRound | None]:
        """The reply to ``step`` and the key holder's state to keep for the next one."""
        if step.step == "encrypt":
            if request is None:
                raise CKKSError(f"round {step.round}: the encrypt step carries no sum request")
            return self._encrypt(step, request), self.kept
        if not self.key_holder:
            raise CKKSError(f"round {step.round}: a {step.step} step reached a node that is not the key holder (the node with partition-id 0)")
        if step.step == "keys":
            return self._keys(step)
        if self.kept is None:
            raise CKKSError(f"round {step.round}: a {step.step} step reached the key holder before it made the round's keys")
        self.kept.check(step)
        if step.step == "decrypt":
            if self.kept.released is not None or not self.kept.secret.size:
                raise CKKSError(f"round {step.round}: the key holder already released this sum; it decrypts once under a key")
            if request is None:
                raise CKKSError(f"round {step.round}: the decrypt step carries no sum request")
            return self._decrypt(step, request)
        if step.step == "check":
            if request is None:
                raise CKKSError(f"round {step.round}: the check step carries no sum request")
            return self._check(step, request), self.kept
        raise CKKSError(f"unknown ckks step {step.step!r}")

    def _keys(self, step: CKKSStep) -> tuple[CKKSStep, KeyRound]:
        """Fresh keys for this sum; reply with the public context (no secret key), keep the secret one."""
        from gfmfr_secure.secagg.ckks.keyholder import KeyHolder

        holder = KeyHolder(step.ckks_params(), custody="authority")
        secret = np.frombuffer(holder.secret_context_bytes(), dtype=np.uint8).copy()
        kept = KeyRound(**step.parameters(), secret=secret)
        return step.answer("keys", [0], [holder.public_context_bytes()]), kept

    def _encrypt(self, step: CKKSStep, request: SumRequest) -> CKKSStep:
        """Each of the node's parties checks the round and encrypts its dense upload under the public context."""
        from gfmfr_secure.secagg.ckks.client import Encryptor

        clients = self.clients
        if clients.upload is None:
            raise CKKSError(f"round {step.round}: an encryption was asked for before any upload")
        aggregator = clients.aggregator
        n = int(step.n_parties)
        try:  # the sum needs every upload: t = n, as the in-process backend asks the clients
            aggregator.check_clients_accept(n, int(step.dim), n, None, aggregator.seed, int(step.round_id))
        except ClientRefusal as err:
            return step.answer("encrypt", [], [], refused=str(err))
        context = step.only_blob("the public context")
        vectors, members, groups, _ = clients.dense_input(request, n)
        if vectors.shape[1] != int(step.dim):
            raise CKKSError(f"round {step.round}: the clients' uploads hold {vectors.shape[1]} values, the step says {step.dim}")
        row = dict(zip(members.tolist(), range(members.size), strict=True))
        encryptor = Encryptor(context, step.ckks_params(), int(step.dim), wire=CKKS_WIRE)
        owners, blobs = [], []
        try:
            for p in np.flatnonzero(np.isin(step.parties, members)).tolist():
                sent = encryptor.encrypt(vectors[row[int(step.parties[p])]])
                owners += [p] * len(sent)
                blobs += sent
        finally:
            encryptor.close()
        if groups is not None and request.phase == "sums":  # each party keeps the group its upload was summed in
            clients.node.commit_groups(members, groups)
        return step.answer("encrypt", owners, blobs, unclipped_query=float(clients.node.unclipped_query()))

    def _decrypt(self, step: CKKSStep, request: SumRequest) -> tuple[CKKSStep, KeyRound]:
        """Decrypt the sum once, flood it, add the central DP draw; forget the secret key, keep the release."""
        from gfmfr_secure.secagg.ckks.keyholder import Decryptor

        central = self._central(request)
        decryptor = Decryptor(self.kept.secret.tobytes(), step.ckks_params(), int(step.dim), wire=CKKS_WIRE)
        flood_key = self.clients.aggregator.secrets.key("ckks-flood", int(step.round_id))
        released = decryptor.decrypt(list(step.messages().get(0, [])), noise=None if central is None else (lambda size: central[:size]), flood_key=flood_key)
        kept = dataclasses.replace(self.kept, secret=np.zeros(0, dtype=np.uint8), released=released)
        return step.answer("decrypt", [], [], released=released, flooding_std=float(decryptor.flooding_std)), kept

    def _central(self, request: SumRequest) -> np.ndarray | None:
        """float64 [G * block] the central DP draw the decryptor adds to this release, or None.

        ``sums``: the draw the request carries; ``count``: the releasing party's ``dp-count``
        draw, from the key holder's own secret source (as the in-process count phase draws it).
        """
        if request.phase == "sums":
            central = None if request.central is None else np.asarray(request.central, dtype=np.float64).reshape(-1)
        else:
            from gfmfr_secure.simulation.group_floor import count_release

            dp = self.clients.node.dp_plan(self.clients.population)
            if dp is None:
                return None
            dp.clip = float(request.clip)
            release = count_release(dp, int(request.n_groups), int(self.clients.d), int(request.round))
            central = release.central(self.clients.secrets).reshape(-1).double().numpy()
        return None if central is None or not np.any(central) else central

    def _check(self, step: CKKSStep, request: SumRequest) -> CKKSStep:
        """The clients' check of the counts the server reports (``step.reported``) against the key holder's release."""
        from gfmfr_secure.privacy.release import ReleaseLayout
        from gfmfr_secure.roles.server import COUNT_TOLERANCE

        if self.kept.released is None or self.kept.phase != "count":
            raise CKKSError(f"round {step.round}: counts were reported before the key holder released the count phase")
        dp = self.clients.node.dp_plan(self.clients.population)
        layout = ReleaseLayout(int(request.n_groups), 0, int(self.clients.d), 0, 1.0 if dp is None else dp.count_value)
        try:
            check_reported_counts(step.reported, verify_count_evidence(CountEvidence(layout, released=self.kept.released)), tolerance=COUNT_TOLERANCE)
        except ClientRefusal as err:
            return step.answer("check", [], [], refused=str(err))
        return step.answer("check", [], [])
