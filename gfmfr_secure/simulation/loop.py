"""The in-process federated engine (GFMFR and the federated baselines).

One round (DESIGN section 2) runs as an exchange of messages between two roles:
the server (:class:`~gfmfr_secure.roles.server.FederatedServer`: cohort sampling,
FedAvg, grouping, fusion and teacher, DP release noise, validation bookkeeping) and the
clients (:class:`~gfmfr_secure.roles.client.ClientNode`: negatives, local training,
clipping, oblivious group choice, DP noise shares, private state, scoring).
:func:`run_federated` hosts every user in one node behind
:class:`~gfmfr_secure.roles.inprocess.InProcessClients`, which passes every message
through bytes and plays the secure protocols among the clients; the server sees only
what crosses the boundary. Model selection uses validation only; the test split is
scored once, for the selected round. With a
:class:`~gfmfr_secure.simulation.checkpoint.Checkpointer` the state of both roles is
saved after each round, and a saved
:class:`~gfmfr_secure.simulation.checkpoint.LoopState` continues a run where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gfmfr_secure.client.state import ClientStateStore
from gfmfr_secure.data import Split
from gfmfr_secure.models import get_backbone  # bench_round scores with it
from gfmfr_secure.roles.active import ActiveServer
from gfmfr_secure.roles.client import ClientNode, check_finite, oblivious_groups
from gfmfr_secure.roles.inprocess import InProcessClients, counted_groups, deliver_broadcast
from gfmfr_secure.roles.server import COUNT_TOLERANCE, FederatedServer, RoundRelease, ServerData, evaluation_sample, releasable
from gfmfr_secure.server.grouping import SERVER_GROUPING
from gfmfr_secure.server.step import ServerState
from gfmfr_secure.simulation.checkpoint import (
    Checkpointer,
    LoopState,
    dp_state,
    global_rng_state,
    restore_dp,
    restore_selector,
    selector_state,
    set_global_rng_state,
)
from gfmfr_secure.types import AdversaryView, Exposure

__all__ = [
    "COUNT_TOLERANCE", "SERVER_GROUPING", "ActiveServer", "FederatedRun", "RoundCallback", "check_finite", "counted_groups", "deliver_broadcast",
    "evaluation_users", "get_backbone", "oblivious_groups", "releasable", "run_federated",
]

RoundCallback = Callable[[AdversaryView], None]


@dataclass
class FederatedRun:
    """Outcome of a federated run: final state at the selected round plus the record.

    ``store`` is the in-process node's client state at the selected round (simulation
    callers such as attacks read it); the server never held it.
    """

    shared: Any
    store: ClientStateStore
    server: ServerState
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def run_federated(
    cfg: Any,
    data: Any,
    split: Split,
    *,
    logger: logging.Logger | None = None,
    callbacks: Sequence[RoundCallback] = (),
    progress: bool = True,
    participants: np.ndarray | None = None,
    upload_hook: Callable[[Any, int], Any] | None = None,
    checkpoint: Checkpointer | None = None,
    resume: LoopState | None = None,
    label: str | None = None,
    active_server: ActiveServer | None = None,
) -> FederatedRun:
    """Train a federated recommender as configured and score it.

    Parameters
    ----------
    cfg : ExperimentConfig.
    data : InteractionData (the server reads only its item features).
    split : the leave-one-out split (the clients' data).
    callbacks : receive one :class:`AdversaryView` per observer per round.
    participants : int64 user ids allowed to take part in training (default: every user
        with training data). Others never train or upload (membership experiments, DP
        audits); all users are still evaluated.
    upload_hook : ``f(upload, round) -> upload`` called on the cohort's clipped uploads just
        before aggregation; it may append synthetic clients (DP audits insert canary updates
        this way). Appended clients never train and are not in the client store.
    checkpoint : saves both roles' state after the rounds it says are due.
    resume : a saved state (from ``checkpoint.load()``) to continue from instead of round 0;
        ``cfg`` and the data must be those it was saved with.
    label : the progress bar's label (default: the method). The bar is drawn only when
        ``progress`` and stderr is a terminal.
    active_server : the steps a simulated malicious server replaces (security experiments);
        None: an honest server.
    """
    log = logger or logging.getLogger("gfmfr_secure")
    server = FederatedServer(cfg, ServerData.of(data, split.n_users, split.n_items), logger=log, participants=participants)
    node = ClientNode(cfg, split, np.arange(split.n_users, dtype=np.int64))
    clients = InProcessClients(cfg, node, upload_hook=upload_hook)
    if active_server is not None:
        active_server.install(server, clients)
    server.meet(clients)
    start, stopped = 0, False
    if resume is not None:
        start, stopped = resume.next_round, resume.stopped
        _restore(server, node, clients, resume)
        log.info("resuming after round %d of %d%s", start - 1, cfg.train.rounds, " (early stopping had ended training)" if stopped else "")
    if callbacks:
        server.on_release = lambda rel: [_emit_views(cb, rel, server, clients) for cb in callbacks]  # type: ignore[func-returns-value]
    if checkpoint is not None:
        server.on_round_end = lambda t, stop: _save(checkpoint, server, node, clients, t, stop, log)
    server.run(clients, start=start, stopped=stopped, progress=progress, label=label)
    metrics = server.finish(clients)
    return FederatedRun(shared=server.selector.snapshot, store=node.best, server=server.state, metrics=metrics, history=server.history)


def _restore(server: FederatedServer, node: ClientNode, clients: InProcessClients, resume: LoopState) -> None:
    """Put a saved :class:`LoopState` back into the two roles."""
    st = server.state
    st.shared, node.store = resume.shared, resume.store
    if st.fusion is not None and resume.fusion is not None:
        st.fusion.load_state_dict(resume.fusion)
    st.teacher, st.assignment, server.centroids = resume.teacher, resume.assignment, resume.centroids
    clients.aggregator.rounds_done = resume.aggregator_rounds
    server.floor_stats, server.history, server.timing = resume.floor_stats, resume.history, resume.timing
    restore_dp(server.dp, resume.dp)
    if server.record_dp is not None and resume.dpsgd_events is not None:
        server.record_dp.events = resume.dpsgd_events
        if node.record_dp is not None:
            node.record_dp.events = {c: list(h) for c, h in resume.dpsgd_events.items()}
    restore_selector(server.selector, resume.selector, None if resume.snapshot is None else resume.snapshot[0])
    node.best = None if resume.snapshot is None else resume.snapshot[1]
    set_global_rng_state(resume.rng)


def _save(checkpoint: Checkpointer, server: FederatedServer, node: ClientNode, clients: InProcessClients, t: int, stop: bool, log: logging.Logger) -> None:
    """Save both roles' state after round ``t`` when the checkpointer says it is due."""
    if not checkpoint.due(t, server.cfg.train.rounds, stop):
        return
    st, sel = server.state, server.selector
    state = LoopState(
        next_round=t + 1, stopped=stop, shared=st.shared, store=node.store, teacher=st.teacher,
        fusion=None if st.fusion is None else st.fusion.state_dict(),
        assignment=st.assignment, centroids=server.centroids, aggregator_rounds=clients.aggregator.rounds_done,
        floor_stats=server.floor_stats, dp=dp_state(server.dp), dpsgd_events=None if server.record_dp is None else server.record_dp.events,
        selector=selector_state(sel), snapshot=None if sel.snapshot is None else (sel.snapshot, node.best), history=server.history, timing=server.timing,
        rng=global_rng_state(),
    )
    seconds, size = checkpoint.save(state)
    log.info("round %d: checkpoint written in %.2fs (%.0f MB)", t, seconds, size / 1e6)


def evaluation_users(split: Split, max_users: int, seed: int) -> np.ndarray | None:
    """The users validation and test rank: None (all) or a fixed sample, int64 [max_users] ascending.

    With more than ``max_users`` users holding a test item (and ``max_users > 0``),
    ``max_users`` of them are drawn uniformly without replacement from the run's seed;
    every validation and the test use the same sample (a validation ranks those of
    them with a validation item).
    """
    return evaluation_sample(np.flatnonzero(split.test_items >= 0), max_users, seed)


def _emit_views(cb: RoundCallback, rel: RoundRelease, server: FederatedServer, clients: InProcessClients) -> None:
    """Hand the round's adversary views (server and outsider) to a callback.

    Under ``plain`` the server receives each client's upload as sent (clipped when
    DP is on; its own noise share, if any, in ``noise_shares``), and the released
    sums; secure backends give it only the sums. ``truth`` (the clients' own groups)
    comes from the in-process clients, for scoring attacks only.
    """
    agg, dp, last = rel.agg, server.dp, clients.last
    upload, shares, groups = last.get("upload"), last.get("shares"), last.get("groups")
    if server.exposure == Exposure.PER_CLIENT:
        # with noise shares a client uploads its dense noisy vector: row_items are then not visible
        received = {"per_client": upload, "noise_shares": shares, "upload_format": "sparse" if shares is None else "dense"}
    else:
        received = {}
    received["broadcast"] = rel.before  # the model the server sent at the start of the round
    received.update(item_sum=agg.item_sum, head_sum=agg.head_sum, group_counts=agg.group_counts, group_item_sum=agg.group_item_sum, group_head_sum=agg.group_head_sum, weight_total=agg.weight_total)
    st = server.state
    released = {"shared": st.shared.clone(), "teacher": None if st.teacher is None else st.teacher.clone()}
    meta = {"n_clients": agg.n_clients, "n_groups": st.n_groups, "grouping": server.grouping, "dp": None if dp is None else {"mechanism": dp.mechanism, "clip": dp.clip, "noise_multiplier": dp.noise_multiplier}}
    truth = {"clients": upload.clients, "groups": np.asarray(groups) if groups is not None else (None if rel.labels is None else np.asarray(rel.labels))}
    for observer, rec in (("server", received), ("outsider", {})):
        cb(AdversaryView(round=rel.round, backend=server.backend, exposure=server.exposure, observer=observer, received=rec, released=released, meta=meta, truth=truth))
