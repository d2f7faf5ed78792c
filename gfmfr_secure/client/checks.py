"""Checks an honest client runs on what the server tells it, before it uploads anything.

Secure aggregation hides each upload inside a sum, but a malicious server can still
shape what the sum covers. Three of its moves need the client's own cooperation, and
each check below withholds it (the client raises :class:`ClientRefusal` and uploads
nothing this round; the round then fails or goes on without it):

* **Different broadcasts to different clients** (model inconsistency; Pasquini et al.,
  "Eluding Secure Aggregation in Federated Learning via Model Inconsistency", CCS 2022).
  The server sends the target a crafted model that makes its update stand out of the
  sum, and the others the honest one. Each client signs the SHA-256 digest of the
  broadcast it received (:func:`broadcast_digest`, :func:`attest_broadcast`) with its
  long-term Ed25519 identity key; the server routes the signed digests of a client's
  neighbourhood to it, as it routes key advertisements, and the client uploads only
  when every one it gets carries its own digest and at least ``min_matching`` do
  (:func:`check_consistent_broadcast`). The server cannot forge a neighbour's
  signature, and withholding neighbours' digests leaves too few of them.
* **Group counts no secure sum produced.** Under oblivious grouping the clients merge
  every group whose released count is below the floor; a server that reports a count
  of ``min_group_size`` for a group holding only the target keeps it unmerged, and the
  group's sum is the target's update. :func:`verify_count_transcript` replays the count
  phase from its transcript (the signed key advertisements, masked uploads and share
  reveals the server received: ``G`` words per upload) through the public
  :class:`~gfmfr_secure.secagg.masking.SecAggServer`, checks that the client's own upload
  is in it, and returns the counts; :func:`check_reported_counts` refuses counts that
  differ. Every upload and reveal is signed by its sender, so a transcript can only
  sum genuine uploads: the server can leave some out but cannot raise a count.
* **A round too small to hide anyone.** :func:`check_round_parameters` compares the
  public parameters of a secure round with the client's own configuration: at least
  ``min_group_size`` clients, a Shamir threshold of at least
  ``ceil(threshold_fraction * |N[u]|)`` and a strict majority of the closed
  neighbourhood.

What no check here can see: a crafted broadcast sent to *every* client alike (the
client cannot tell a crafted model from a trained one), and Sybil clients the server
controls inside the target's group (their inputs are known to it, so the group sum
minus them is the target's update). Differential privacy noise in the release is the
defence against both (``docs/active-attacks.md``).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gfmfr_secure.secagg.fixedpoint import decode_sum
from gfmfr_secure.secagg.masking import MaskedUpload, NeighbourGraph, SecAggConfig, SecAggError, SecAggServer, SecAggTranscript
from gfmfr_secure.secagg.masking.primitives import payload_digest

__all__ = [
    "BroadcastAttestation",
    "ClientRefusal",
    "CountEvidence",
    "SecAggTranscript",
    "attest_broadcast",
    "broadcast_digest",
    "broadcast_refusals",
    "check_consistent_broadcast",
    "check_reported_counts",
    "check_round_parameters",
    "verify_count_evidence",
    "verify_count_transcript",
]


class ClientRefusal(SecAggError):
    """An honest client refuses to upload: what the server sent fails one of its checks."""


# --------------------------------------------------------------------------- broadcast consistency


def broadcast_digest(round_id: int, parts: Mapping[str, np.ndarray | torch.Tensor | None]) -> bytes:
    """SHA-256 of everything a client received at the start of a round (32 bytes).

    Parameters
    ----------
    round_id : the round the broadcast belongs to (0 <= round_id < 2^32).
    parts : name -> array (shared item table ``[I, d]``, head ``[H]``, teacher ``[G, I]``,
        centroids ``[G, H]``, released counts ``[G]`` ...), or None for an absent part.
        Each part enters with its name, dtype and shape, in name order, so two broadcasts
        have the same digest exactly when every part is bit for bit the same.
    """
    h = hashlib.sha256(b"gfmfr-broadcast/v1/" + struct.pack("<I", int(round_id)))
    for name in sorted(parts):
        value = parts[name]
        h.update(struct.pack("<I", len(name)) + name.encode("utf-8"))
        if value is None:
            h.update(b"\x00")
            continue
        arr = np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value))
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header = f"{arr.dtype.str}{arr.shape}".encode("ascii")
        h.update(b"\x01" + struct.pack("<I", len(header)) + header + arr.tobytes())
    return h.digest()


_ATTEST = struct.Struct("<4sII32s")  # magic, round, client, digest; + Ed25519 signature


@dataclass(frozen=True)
class BroadcastAttestation:
    """A client's signed statement "in round r I received the broadcast with this digest" (108 bytes)."""

    round_id: int
    client: int
    digest: bytes
    signature: bytes

    MAGIC = b"GBA1"
    SIZE = _ATTEST.size + 64

    def signed_part(self) -> bytes:
        return _ATTEST.pack(self.MAGIC, self.round_id, self.client, self.digest)

    def to_bytes(self) -> bytes:
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> BroadcastAttestation:
        if not isinstance(data, (bytes, bytearray)):
            raise ClientRefusal(f"a broadcast attestation must be bytes, got {type(data).__name__}")
        if len(data) != cls.SIZE:
            raise ClientRefusal(f"a broadcast attestation is {cls.SIZE} bytes, got {len(data)}")
        magic, round_id, client, digest = _ATTEST.unpack_from(data)
        if magic != cls.MAGIC:
            raise ClientRefusal(f"not a broadcast attestation: bad magic {magic!r}")
        return cls(round_id, client, digest, bytes(data[_ATTEST.size :]))


def attest_broadcast(identity: Ed25519PrivateKey, client: int, round_id: int, digest: bytes) -> bytes:
    """Sign the digest of the broadcast ``client`` received; the bytes the server routes to its neighbours."""
    if len(digest) != 32:
        raise ValueError(f"a broadcast digest is 32 bytes, got {len(digest)}")
    unsigned = BroadcastAttestation(int(round_id), int(client), bytes(digest), b"")
    return BroadcastAttestation(unsigned.round_id, unsigned.client, unsigned.digest, identity.sign(unsigned.signed_part())).to_bytes()


def check_consistent_broadcast(
    client: int,
    round_id: int,
    own_digest: bytes,
    attestations: Iterable[bytes],
    identity_keys: Mapping[int, bytes],
    neighbours: Iterable[int],
    min_matching: int,
) -> None:
    """Refuse to upload unless the neighbours received the broadcast this client received.

    Parameters
    ----------
    client : this client's id u.
    round_id : the current round.
    own_digest : :func:`broadcast_digest` of what u received.
    attestations : :class:`BroadcastAttestation` bytes of u's neighbours, as routed by the server.
    identity_keys : the PKI: client id -> raw Ed25519 public key.
    neighbours : N(u), the clients whose sums u's upload may enter (everyone else in the
        cohort for the complete graph).
    min_matching : fewest matching attestations u accepts: ``t - 1`` (t the Shamir
        threshold), since fewer surviving neighbours could not unmask u anyway, and a
        server that withholds the digests of the neighbours it lied to leaves fewer.

    Raises
    ------
    ClientRefusal
        A forged, malformed, duplicated or foreign attestation, one for another round,
        one whose digest differs from ``own_digest``, or fewer than ``min_matching``.
    """
    nbrs = frozenset(int(v) for v in neighbours) - {int(client)}
    seen: set[int] = set()
    for raw in attestations:
        att = BroadcastAttestation.from_bytes(raw)
        v = att.client
        if v not in nbrs or v not in identity_keys:
            raise ClientRefusal(f"client {client} refuses: a broadcast attestation of client {v}, which is not its neighbour")
        if v in seen:
            raise ClientRefusal(f"client {client} refuses: two broadcast attestations of client {v}")
        try:
            Ed25519PublicKey.from_public_bytes(identity_keys[v]).verify(att.signature, att.signed_part())
        except InvalidSignature:
            raise ClientRefusal(f"client {client} refuses: the broadcast attestation of client {v} is forged or tampered") from None
        if att.round_id != round_id:
            raise ClientRefusal(f"client {client} refuses: the broadcast attestation of client {v} is for round {att.round_id}, not {round_id}")
        if att.digest != own_digest:
            raise ClientRefusal(
                f"client {client} refuses to upload: neighbour {v} received a different broadcast in round {round_id} "
                f"(digest {att.digest.hex()[:16]}..., own {own_digest.hex()[:16]}...); the server sent different models"
            )
        seen.add(v)
    if len(seen) < min_matching:
        raise ClientRefusal(
            f"client {client} refuses to upload: only {len(seen)} neighbours attested the round-{round_id} broadcast, "
            f"{min_matching} required"
        )


def broadcast_refusals(received: np.ndarray, graph: NeighbourGraph | None, min_matching: int) -> np.ndarray:
    """Which clients :func:`check_consistent_broadcast` makes refuse, for a whole cohort at once; bool [n].

    The cohort-level form of the check that the round loop runs: each broadcast is hashed
    once (:func:`broadcast_digest`) and ``received[u]`` names the distinct digest client u
    got. Attestations are signed by their senders, so the server can only withhold them;
    its best routing sends each client exactly the attestations that match its own digest
    (any other one makes it refuse on a mismatch). Client u therefore uploads exactly when
    at least ``min_matching`` of its neighbours received u's digest.

    Parameters
    ----------
    received : int64 [n] index of the broadcast each client received (equal index = equal digest).
    graph : the round's neighbourhood graph over the n positions, or None for the complete graph.
    min_matching : as in :func:`check_consistent_broadcast` (``t - 1``).
    """
    got = np.asarray(received, dtype=np.int64)
    if graph is None or graph.degree is None:
        matching = np.bincount(got)[got] - 1
    else:
        nbrs = np.asarray(graph.neighbours, dtype=np.int64)  # [n, k]
        matching = (got[nbrs] == got[:, None]).sum(axis=1)
    return matching < int(min_matching)


# --------------------------------------------------------------------------- round parameters


def check_round_parameters(config: SecAggConfig, graph: NeighbourGraph, *, min_group_size: int, threshold_fraction: float) -> None:
    """Refuse a secure round whose public parameters could expose one client.

    Parameters
    ----------
    config, graph : the round's public parameters, as the server announced them.
    min_group_size : the client's own ``grouping.min_group_size``: the fewest clients a
        released sum may cover.
    threshold_fraction : the client's own ``aggregation.threshold_fraction``.

    Raises
    ------
    ClientRefusal
        Fewer than ``min_group_size`` clients, a graph of another size, or a threshold
        below ``ceil(threshold_fraction * |N[u]|)`` or not a strict majority of ``|N[u]|``.
    """
    n, size = int(config.n_clients), int(graph.neighbourhood_size)
    if n < min_group_size:
        raise ClientRefusal(
            f"refusing a secure round of {n} clients: a sum of fewer than grouping.min_group_size={min_group_size} "
            "clients may be one client's update"
        )
    if graph.n_clients != n:
        raise ClientRefusal(f"refusing a secure round whose graph has {graph.n_clients} clients and whose config has {n}")
    need = max(size // 2 + 1, math.ceil(threshold_fraction * size))
    if config.threshold < need:
        raise ClientRefusal(
            f"refusing a secure round with threshold t={config.threshold}: closed neighbourhoods of {size} clients "
            f"need t >= {need} (aggregation.threshold_fraction={threshold_fraction} and a strict majority)"
        )


# --------------------------------------------------------------------------- verifiable counts


def _replay(transcript: SecAggTranscript, config: SecAggConfig, graph: NeighbourGraph, identity_keys: Mapping[int, bytes]) -> tuple[SecAggServer, np.ndarray]:
    """Run the public server over a transcript; the replayed server and the float64 [D] sum.

    Raises
    ------
    ClientRefusal
        Any message fails the server's checks, or an upload is not in the transcript.
    """
    try:
        server = SecAggServer(config, graph, identity_keys)
        server.collect_adverts(transcript.adverts)
        server.route_shares(transcript.shares)
        for u in transcript.uploads:
            server.receive_upload(u)
        server.unmask_requests()
        ring = server.finish(transcript.reveals)
    except SecAggError as err:  # a protocol error in the transcript is a reason to refuse, not a crash
        raise ClientRefusal(f"the transcript of round {config.round_id} does not verify: {err}") from err
    return server, decode_sum(ring, frac_bits=config.frac_bits)


def _check_own_upload(server: SecAggServer, own_upload: bytes, config: SecAggConfig) -> None:
    """Refuse unless the bytes this client sent are the upload the replayed server summed for it."""
    mine = MaskedUpload.from_bytes(own_upload, config.dim)
    if mine.client not in server.survivors or server.upload_digest(mine.client) != payload_digest(mine.payload):
        raise ClientRefusal(f"client {mine.client} refuses: its own upload is not in the transcript of round {config.round_id}")


def verify_count_transcript(
    transcript: SecAggTranscript,
    config: SecAggConfig,
    graph: NeighbourGraph,
    identity_keys: Mapping[int, bytes],
    own_upload: bytes,
) -> np.ndarray:
    """Recompute a secure sum from its transcript; float64 [D] (the group counts of a count phase).

    The replay runs the public :class:`SecAggServer` over the transcript: every signature,
    commitment and reconstructed key is checked as the server checks them, so the result
    is the sum of genuine uploads of this round. ``own_upload`` (the bytes this client
    sent) must be among them: that ties the transcript to this round's keys.

    Raises
    ------
    ClientRefusal
        The client's own upload is missing, or any message fails the server's checks.
    """
    MaskedUpload.from_bytes(own_upload, config.dim)  # a malformed own upload is the caller's error, raised first
    server, total = _replay(transcript, config, graph, identity_keys)
    _check_own_upload(server, own_upload, config)
    return total


@dataclass(frozen=True)
class CountEvidence:
    """What the clients of a round check the server's reported group counts against.

    Exactly one of two forms:

    * ``masking``: ``transcript`` with the round's public ``config``, ``graph`` and PKI
      ``identity_keys``, and ``own_uploads`` (the masked upload bytes each client kept);
      the counts are the replayed sum.
    * ``ckks``: ``released``, float64 [D] the sum as the key holder decrypted and released it
      (the aggregator cannot produce a decryption; the key holder's release is what the
      clients compare with).

    ``layout`` maps the summed vector to counts: the count coordinate of each block,
    divided by ``layout.count_value``.
    """

    layout: Any
    transcript: SecAggTranscript | None = None
    config: SecAggConfig | None = None
    graph: NeighbourGraph | None = None
    identity_keys: Mapping[int, bytes] | None = None
    own_uploads: tuple[bytes, ...] = ()
    released: np.ndarray | None = None


def verify_count_evidence(evidence: CountEvidence) -> np.ndarray:
    """The verified group counts, float64 [G], as every client of the round computes them.

    The transcript is replayed once: every client holds the same bytes, and the replay is
    deterministic. Each client then checks that its own upload is the one summed for it.

    Raises
    ------
    ClientRefusal
        The transcript does not verify, or a client's own upload is not in it.
    """
    if evidence.transcript is not None:
        server, total = _replay(evidence.transcript, evidence.config, evidence.graph, evidence.identity_keys)
        for own in evidence.own_uploads:
            _check_own_upload(server, own, evidence.config)
    elif evidence.released is not None:
        total = np.asarray(evidence.released, dtype=np.float64)
    else:
        raise ValueError("count evidence needs a transcript (masking) or the key holder's release (ckks)")
    layout = evidence.layout
    return total.reshape(layout.n_groups, layout.block_size)[:, -1] / float(layout.count_value)


def check_reported_counts(reported: Sequence[float] | np.ndarray, verified: np.ndarray, *, count_value: float = 1.0, tolerance: float = 1e-6) -> None:
    """Refuse when the counts the server reported differ from the verified sum.

    Parameters
    ----------
    reported : float [G] the counts the server sent.
    verified : float [G] :func:`verify_count_transcript`'s sum (each client wrote
        ``count_value`` into its group's coordinate).
    count_value : kappa.
    tolerance : absolute slack on each count (fixed-point rounding).
    """
    rep = np.asarray(reported, dtype=np.float64)
    ver = np.asarray(verified, dtype=np.float64) / float(count_value)
    if rep.shape != ver.shape:
        raise ClientRefusal(f"the server reported {rep.size} group counts, the count phase summed {ver.size}")
    bad = np.flatnonzero(np.abs(rep - ver) > tolerance)
    if bad.size:
        g = int(bad[0])
        raise ClientRefusal(
            f"refusing to upload: the server reported {rep[g]:g} clients in group {g}, the count phase's transcript sums to {ver[g]:g}"
        )
