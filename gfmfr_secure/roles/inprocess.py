"""The in-process transport: client nodes in this process, messages through bytes.

:class:`InProcessClients` implements :class:`~gfmfr_secure.roles.transport.Clients` over
one :class:`ClientNode` hosting every user (the in-process engine) or several hosting a
partition of them (their uploads merged by client id, so the sums do not depend on the
partition).
Every message the server sends is serialised and read back before the node sees it, and
every reply before the server does, so the server works with exactly what crossed the
boundary. The secure protocols (masking, CKKS) and the clients' checks (broadcast
attestations, verified counts, round parameters) run here, as a simulation of every
client party over the node's uploads; the server receives only the released sums.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from gfmfr_secure.aggregation import get_aggregator
from gfmfr_secure.aggregation.layout import check_uniform, noisy_dense_uploads, secure_layout
from gfmfr_secure.client.checks import ClientRefusal, broadcast_digest, broadcast_refusals, check_reported_counts, verify_count_evidence
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.privacy.release import Release, ReleaseLayout, ReleaseNoise
from gfmfr_secure.rng import SecretSource
from gfmfr_secure.secagg.masking.primitives import skipped_verify_seconds
from gfmfr_secure.roles.client import ClientNode
from gfmfr_secure.roles.messages import (
    Assignment,
    Broadcast,
    EvalReply,
    EvalRequest,
    Hello,
    KeepSnapshot,
    Message,
    SumReply,
    SumRequest,
    Upload,
    merge_eval_replies,
    merge_hellos,
    merge_uploads,
    sum_reply,
)
from gfmfr_secure.roles.server import COUNT_TOLERANCE
from gfmfr_secure.server.grouping import SERVER_GROUPING
from gfmfr_secure.simulation.group_floor import count_inputs, count_phase
from gfmfr_secure.types import AggregateResult, CohortUpdate, Exposure

__all__ = ["InProcessClients", "counted_groups", "deliver_broadcast", "wire"]

M = TypeVar("M", bound=Message)


def wire(msg: M) -> M:
    """``msg`` as the other side reads it: serialised and decoded from those bytes."""
    return type(msg).from_bytes(msg.to_buffer())


def deliver_broadcast(msg: Broadcast, cohort: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray]:
    """What each cohort member received at the start of a round.

    Returns the distinct broadcasts (each: item table ``[I, d]``, head ``[H]``, teacher
    ``[G, I]`` or None, centroids ``[G, H]`` or None) and int64 [n] which one each client
    received. One message to the whole cohort: one broadcast.
    """
    parts = {"item_table": msg.item_table, "head": msg.head, "teacher": msg.teacher, "centroids": msg.centroids}
    return [parts], np.zeros(cohort.size, dtype=np.int64)


def counted_groups(
    aggregator: Any, upload: CohortUpdate, groups: np.ndarray, n_groups: int, dp: Any, source: SecretSource, round_idx: int, verify: bool,
    *, phase: Callable[..., Any] | None = None, check: Callable[..., Any] | None = None, n_total: int | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """The count phase and, under a secure backend, the clients' check of the counts the server reports.

    Returns the reported counts float64 [G] and the phase's cost. With ``verify`` the
    backend keeps the phase's evidence (masking: its transcript; ckks: the key holder's
    release) and the clients refuse counts that differ from it; the cost then also holds
    ``check_client_s``, the seconds one client's check takes as deployed (the check runs
    once for all of them here, and signatures this process verified before are charged,
    not verified again). ``phase`` and ``check`` replace
    :func:`count_phase` and :func:`check_reported_counts` (active-server experiments). ``n_total``:
    the uploads of the whole round when ``upload`` is one node's part (:func:`count_phase`).

    Raises
    ------
    ClientRefusal
        The reported counts differ from the verified ones, or the evidence does not verify.
    """
    aggregator.record_transcript = verify
    try:
        counts, cost = (phase or count_phase)(aggregator, upload, groups, n_groups, dp, source, round_idx, **({"n_total": n_total} if n_total else {}))
    finally:
        aggregator.record_transcript = False
    if verify:
        t0, skipped0 = time.perf_counter(), skipped_verify_seconds()
        verified = verify_count_evidence(aggregator.last_evidence)
        cost = {**cost, "check_client_s": time.perf_counter() - t0 + skipped_verify_seconds() - skipped0}
        (check or check_reported_counts)(counts, verified, tolerance=COUNT_TOLERANCE)
    return counts, cost


class InProcessClients:
    """Every client in this process, behind the message boundary.

    Parameters
    ----------
    cfg : the experiment config.
    nodes : the :class:`ClientNode` hosting every user, or several hosting disjoint sets of users.
    upload_hook : ``f(upload, round) -> upload`` on the cohort's clipped uploads just before
        aggregation (DP audits append canary clients this way).

    Attributes
    ----------
    aggregator : the backend's protocol simulation (plays every client party and the server's
        part of the protocol; the server role sees only what it releases).
    last : the round's client-side facts the simulation's observers may read (``upload``:
        the uploads as sent, ``shares``: the DP noise shares, ``groups``: each client's
        own group); never sent to the server.
    """

    def __init__(self, cfg: Any, nodes: ClientNode | Sequence[ClientNode], *, upload_hook: Callable[[Any, int], Any] | None = None) -> None:
        self.nodes = [nodes] if isinstance(nodes, ClientNode) else list(nodes)
        node = self.node = self.nodes[0]
        self.cfg, self.upload_hook = cfg, upload_hook
        seed = int(cfg.seed)
        self.secrets = node.secrets
        self.aggregator = get_aggregator(cfg.aggregation.backend, settings=cfg.aggregation, seed=seed, secrets=cfg.secrets, min_group_size=cfg.grouping.min_group_size)
        self.secure = self.aggregator.exposure != Exposure.PER_CLIENT
        self.n_items, self.d = node.split.n_items, int(cfg.model.latent_dim)
        self.head_size = 0 if node.backbone.private_head else node.template.head_flat().numel()
        self.upload: CohortUpdate | None = None
        self.trained = 0
        self.population = 0
        self.last: dict[str, Any] = {}
        #: the count phase as the server runs it and the clients' check of its counts (None: the honest ones;
        #: active-server experiments set them through roles.active.ActiveServer)
        self.count_phase: Callable[..., Any] | None = None
        self.check_counts: Callable[..., Any] | None = None

    def hello(self) -> Hello:
        return merge_hellos([wire(n.hello()) for n in self.nodes])

    def train(self, msg: Broadcast) -> Upload:
        msg = wire(msg)
        t, cohort, floor = int(msg.round), msg.cohort, int(self.cfg.grouping.min_group_size)
        self.population = int(msg.population)
        self.last, self.upload = {"upload": None, "shares": None, "groups": None}, None  # last round's are done with
        refused = 0
        if self.secure and cohort.size >= floor:
            # every client attests what it received; one with too few neighbours attesting the same refuses
            sent, received = deliver_broadcast(msg, cohort)
            digests = [broadcast_digest(t, parts) for parts in sent]
            first = {dg: i for i, dg in reversed(list(enumerate(digests)))}  # equal bytes, equal class
            classes = np.array([first[dg] for dg in digests], dtype=np.int64)[received]
            graph, min_matching = self.aggregator.attestation_scope(int(cohort.size))
            out = broadcast_refusals(classes, graph, min_matching)
            refused = int(out.sum())
            if refused:
                keep = ~out  # they neither train on the broadcast nor upload
                msg = dataclasses.replace(msg, cohort=cohort[keep], groups=None if msg.groups is None else msg.groups[keep])
                if keep.sum() < floor:
                    return wire(Upload.empty(self.d, t, refused=refused))
        # the uploads stay with the clients (the protocol simulation below plays their part); the server
        # receives them as bytes: under plain all of them, under a secure backend their public part
        sent_up = merge_uploads([n.train(msg) for n in self.nodes])
        update = sent_up.as_update()
        self.trained = len(update)
        if self.upload_hook is not None:
            update = self.upload_hook(update, t)
            if self.node.n_groups and self.cfg.grouping.method in SERVER_GROUPING and len(update) != self.trained:
                raise ConfigError("synthetic clients from upload_hook need client-side grouping (oblivious or none)")
        if self.cfg.train.weighting == "samples" and len(update) != self.trained:
            raise ConfigError("synthetic clients from upload_hook need train.weighting=uniform")
        self.upload = update
        self.last["upload"] = update
        out_msg = Upload.of(update, t, sent_up.dpsgd, refused)
        return wire(out_msg.public() if self.secure else out_msg)

    def aggregate(self, msg: SumRequest) -> SumReply:
        msg = wire(msg)
        return wire(self._aggregate(msg))

    def _aggregate(self, msg: SumRequest) -> SumReply:
        t, upload = int(msg.round), self.upload
        if upload is None:
            raise RuntimeError(f"round {t}: a sum was requested before any upload")
        dp = self.node.dp_plan(self.population)
        if dp is not None:
            dp.clip = float(msg.clip)
        if msg.phase == "count":
            try:
                counts, cost = counted_groups(
                    self.aggregator, upload, upload.group, int(msg.n_groups), dp, self.secrets, t, self.secure, phase=self.count_phase, check=self.check_counts,
                    n_total=int(msg.n_uploads) or None,
                )
            except ClientRefusal as err:
                return sum_reply(t, "count", refused=str(err))
            return sum_reply(t, "count", AggregateResult(n_clients=len(upload), weight_total=0.0, item_sum=torch.zeros(0, 0), head_sum=None, group_counts=torch.from_numpy(counts)), cost=cost)
        if msg.phase == "shares":
            layout = ReleaseLayout(1, self.n_items, self.d, self.head_size, dp.count_value)
            shares = Release(dp, layout, t).shares(self.secrets, upload.clients, int(msg.n_uploads) or self.trained)
            self.last["shares"] = shares
            share_sum = torch.zeros(int(msg.n_groups), layout.block_size) if shares is None else shares.sum_by_group(msg.labels, int(msg.n_groups))
            return sum_reply(t, "shares", share_sum=share_sum)
        upload, groups, weights, noise = self.release_input(msg, int(msg.n_uploads) or None)
        try:
            agg = self.aggregator.aggregate(upload, n_items=self.n_items, weights=weights, groups=groups, n_groups=int(msg.n_groups), noise=noise)
        except ClientRefusal as err:  # check_round_parameters: a round the clients' own configuration forbids
            return sum_reply(t, "sums", refused=str(err))
        if groups is not None:  # the round released: each client keeps its own group
            for n in self.nodes:
                n.commit_groups(upload.clients, groups)
        return sum_reply(t, "sums", agg, cost=dict(self.aggregator.last_cost), unclipped=self.unclipped_query())

    def unclipped_query(self) -> float:
        """This round's adaptive-clipping count query of the hosted clients: ``sum_i (b_i - 1/2)`` over their uploads."""
        return sum(n.unclipped_query() for n in self.nodes)

    def release_input(self, msg: SumRequest, n_total: int | None = None) -> tuple[CohortUpdate, np.ndarray | None, np.ndarray, ReleaseNoise | None]:
        """What the clients put into the ``sums`` of ``msg``: (uploads, groups int64 [n] or None, weights float64 [n], noise or None).

        Each client maps its own group through ``msg.merge``; under user-level DP each adds
        its noise share, sized for ``n_total`` uploads reaching the sum (default: this
        node's; across nodes, every node's) of which at least the backend's
        ``min_reporting(n_total)`` report.
        """
        t, upload = int(msg.round), self.upload
        if upload is None:
            raise RuntimeError(f"round {t}: a sum was requested before any upload")
        groups = None
        if msg.grouped:
            groups = upload.group if msg.merge is None else msg.merge[upload.group]  # each client maps its own choice
            upload = dataclasses.replace(upload, group=groups)
            self.last.update(groups=groups, upload=upload)
        weights = upload.n_samples.astype(np.float64) if msg.weighting == "samples" else np.ones(len(upload))
        noise = None
        if msg.central is not None:
            dp = self.node.dp_plan(self.population)
            dp.clip = float(msg.clip)
            n = len(upload) if n_total is None else int(n_total)
            layout = ReleaseLayout(int(msg.n_groups), self.n_items, self.d, self.head_size, dp.count_value, write_count=bool(msg.write_count))
            shares = Release(dp, layout, t).shares(self.secrets, upload.clients, n, self.aggregator.min_reporting(n))
            self.last["shares"] = shares
            noise = ReleaseNoise(layout, torch.from_numpy(np.array(msg.central)), shares)
        return upload, groups, weights, noise

    def dense_input(self, msg: SumRequest, n_total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, ReleaseLayout]:
        """What this node's clients upload to a secure sum of ``msg`` (phase ``count`` or ``sums``) of ``n_total`` uploads.

        Returns float32 [m, D] each client's dense upload with its DP noise share
        (:func:`~gfmfr_secure.aggregation.layout.noisy_dense_uploads`), int64 [m] the
        clients, int64 [m] their groups (None: one block) and the layout.
        """
        if self.upload is None:
            raise RuntimeError(f"round {msg.round}: a sum was requested before any upload")
        if msg.phase == "count":
            dp = self.node.dp_plan(self.population)
            if dp is not None:
                dp.clip = float(msg.clip)
            update, noise = count_inputs(self.aggregator, self.upload, self.upload.group, int(msg.n_groups), dp, self.secrets, int(msg.round), n_total)
            groups, n_items = update.group, 0
        else:
            update, groups, weights, noise = self.release_input(msg, n_total)
            check_uniform(weights, self.aggregator.name)
            n_items = self.n_items
        layout = secure_layout(update, n_items, groups, int(msg.n_groups), noise)
        return noisy_dense_uploads(update, layout, groups, noise), np.asarray(update.clients, dtype=np.int64), groups, layout

    def assign(self, msg: Assignment) -> None:
        for n in self.nodes:
            n.assign(wire(msg))

    def evaluate(self, msg: EvalRequest) -> EvalReply:
        return merge_eval_replies([wire(n.evaluate(wire(msg))) for n in self.nodes])

    def keep_snapshot(self, msg: KeepSnapshot) -> None:
        for n in self.nodes:
            n.keep_snapshot(wire(msg))
