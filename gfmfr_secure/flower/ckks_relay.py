"""The server's part of a ``ckks`` sum across SuperNodes: add ciphertexts, relay between the key holder and the clients.

Every cohort member with an upload encrypts it on the node that hosts it; the key holder
is the node hosting user 0 (node config ``partition-id=0``; :mod:`gfmfr_secure.roles.ckks_party`).
:func:`relay_encrypted_sum` asks, one Flower message per node and step
(:class:`~gfmfr_secure.roles.messages.CKKSStep`)::

    keys (key holder) -> encrypt (the nodes with uploads) -> add here -> decrypt (key holder)

It holds the round's public context only (:class:`~gfmfr_secure.secagg.ckks.CKKSAggregator`
refuses a context with a secret key): it sees ciphertexts and the key holder's release,
never a plaintext upload or a secret key. The round's public parameters are those the
in-process backend uses for the same round (n uploads, their length D, the value bound,
the backend's count of sums, which names the flooding key), so the release equals the
in-process one up to the encryption error (random: SEAL's encryption cannot be seeded),
far below the flooding noise.

A node that does not answer the encrypt step is dropped; the sum of the others' uploads is
released (under distributed DP the transport refuses it, the noise shares being sized for
every party). If the key holder's node does not answer, the sum cannot be decrypted and
the run stops (:class:`~gfmfr_secure.flower.loopback.DeploymentError`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gfmfr_secure.flower.loopback import DeploymentError
from gfmfr_secure.roles.messages import CKKS_WIRE, CKKSStep, SumRequest
from gfmfr_secure.secagg.ckks.server import CKKSAggregator

__all__ = ["RelayedCKKS", "relay_ckks_count_check", "relay_encrypted_sum"]

#: ``exchange(kind, request or {node: request}, nodes, extra) -> {node: reply}`` (FlowerClients._exchange, bound)
Exchange = Callable[[str, Any, list[int], dict[str, Any] | None], dict[int, CKKSStep]]


@dataclass(frozen=True)
class RelayedCKKS:
    """Outcome of :func:`relay_encrypted_sum`.

    Attributes
    ----------
    total : float64 [D] the key holder's release (None when refused).
    parties : n, the parties the round started with; survivors : those whose ciphertexts were added.
    refused : why the clients refused the round, or "".
    unclipped_query : the nodes' adaptive-clipping query sums, added.
    bytes_up : bytes of the parties' ciphertexts; context_bytes : bytes of the public context.
    flooding_std : std of the flooding noise on every released value.
    seconds : wall time of the steps.
    step : the round's keys request (its public parameters).
    """

    total: np.ndarray | None
    parties: int
    survivors: int
    refused: str
    unclipped_query: float = 0.0
    bytes_up: int = 0
    context_bytes: int = 0
    flooding_std: float = 0.0
    seconds: float = 0.0
    step: CKKSStep | None = None


def _holder_reply(replies: dict[int, CKKSStep], holder: int, what: str) -> CKKSStep:
    if holder not in replies:
        raise DeploymentError(f"the key holder's node {holder} did not answer the {what} step: the encrypted sum cannot be decrypted")
    return replies[holder]


def relay_encrypted_sum(exchange: Exchange, msg: SumRequest, aggregator: Any, hosted: dict[int, np.ndarray], holder: int, dim: int) -> RelayedCKKS:
    """Run one encrypted sum among the parties ``hosted`` (node -> int64 user ids with an upload), decrypted by node ``holder``.

    Parameters
    ----------
    exchange : sends one step to nodes and returns their decoded replies (missing nodes are dropped).
    msg : the sum request; it travels with the encrypt and decrypt steps.
    aggregator : the run's :class:`~gfmfr_secure.aggregation.ckks.CKKSAggregatorBackend` (value bound,
        count of sums); its count of sums advances by one.
    holder : the key holder's node id.
    dim : D, the length of every party's dense upload.

    Raises
    ------
    DeploymentError
        The key holder's node did not answer.
    CKKSError
        A malformed context or ciphertext, or one made under other parameters.
    """
    t0 = time.perf_counter()
    parties = np.sort(np.concatenate([np.asarray(u, dtype=np.int64) for u in hosted.values()])) if hosted else np.zeros(0, dtype=np.int64)
    n = int(parties.size)
    value_bound = 8.0 if aggregator.settings is None else float(aggregator.settings.value_bound)
    empty = np.zeros(0, dtype=np.int64)
    step = CKKSStep(
        round=int(msg.round), phase=msg.phase, step="keys", round_id=int(aggregator.rounds_done), n_parties=n, dim=int(dim), value_bound=value_bound,
        parties=parties, owners=empty, blobs=np.zeros(0, dtype=np.uint8), offsets=np.zeros(1, dtype=np.int64),
    )
    kind = f"{msg.phase}-"
    keys = _holder_reply(exchange(kind + "keys", step, [holder], None), holder, "keys")
    context = keys.only_blob("the public context")
    params = step.ckks_params()
    server = CKKSAggregator(context, params, int(dim), wire=CKKS_WIRE)  # refuses a context holding a secret key
    try:
        replies = exchange(kind + "encrypt", step.answer("encrypt", [0], [context], parties=parties), sorted(hosted), {"sum": msg})
        refused = "; ".join(r.refused for r in replies.values() if r.refused)
        if refused:
            return RelayedCKKS(None, n, 0, refused, step=step)
        sent = 0
        for node in sorted(replies):
            for _, upload in sorted(replies[node].messages().items()):
                server.add(upload)
                sent += sum(len(b) for b in upload)
        survivors = server.n_added
        encrypted = server.result()
    finally:
        server.close()
    request = step.answer("decrypt", [0] * len(encrypted), encrypted, n_summands=survivors)
    release = _holder_reply(exchange(kind + "decrypt", request, [holder], {"sum": msg}), holder, "decrypt")
    aggregator.rounds_done += 1
    unclipped = float(sum(r.unclipped_query for r in replies.values()))
    return RelayedCKKS(
        np.asarray(release.released, dtype=np.float64), n, survivors, "", unclipped, sent, len(context), float(release.flooding_std), time.perf_counter() - t0, step,
    )


def relay_ckks_count_check(exchange: Exchange, msg: SumRequest, out: RelayedCKKS, counts: np.ndarray, holder: int) -> str:
    """Ask the key holder's node whether ``counts`` (float64 [G]) are the count phase it released; its refusal, or ""."""
    if out.step is None:
        raise ValueError("relay_ckks_count_check needs a completed encrypted sum")
    request = out.step.answer("check", [], [], reported=np.asarray(counts, dtype=np.float64))
    return _holder_reply(exchange(f"{msg.phase}-check", request, [holder], {"sum": msg}), holder, "check").refused
