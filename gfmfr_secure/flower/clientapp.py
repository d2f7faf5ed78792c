"""The ClientApp: one SuperNode hosts a partition of the users, every user its own client.

Partition rule (:func:`~gfmfr_secure.flower.records.partition_users`): the node with
node config ``partition-id=p num-partitions=n`` hosts the users ``u`` with
``u % n == p`` (0-based user index of the loaded dataset). Each hosted user trains,
clips and uploads as its own client; the node answers with one message holding every
hosted cohort member's record (:class:`~gfmfr_secure.roles.messages.Upload`).

Node config keys: ``partition-id`` (default 0), ``num-partitions`` (default 1), ``data``
(the data folder on this machine; default the run config's ``data``, else
``$GFMFR_DATA``). Every node reads the whole folder (user indices must agree across
nodes and server) and keeps its partition's rows only.

flwr 1.42 starts one ``flwr-clientapp`` process per message (the SuperNode's SuperExec
launches it and it exits after the reply), so nothing survives in memory between
messages. The node's client state (the hosted clients' private state, the state kept at
the best validation round, this round's uploads until they are summed, under DP-SGD each
client's accountant events, and during a ``masking`` sum each party's SecAgg+ state with its
secret seed) is written, before the reply leaves, to
``<state-dir>/run-<run id>/node-<node id>.npz`` on the node's machine (node config
``state-dir``, default ``$FLWR_HOME/gfmfr-state``, ``$FLWR_HOME`` defaulting to
``~/.flwr``), and read back by the next message's process. Flower's ``Context.state``
is not used for it: ``flwr-clientapp`` hands its Context back to the SuperNode only after
pushing the reply, so the next message's process can start with the Context from before
(measured: with every ML-100K user in the cohort the test metrics of a 3-round run
differed from in-process by 1.1e-3). Every request carries its sequence number among the
requests to that node and the state file the one it followed; a mismatch is an error
(:class:`NodeStateError`), never training on stale state. The files stay after the run.

Message types (``query``/``train``/``evaluate`` with an action, as 1.42 requires):
``query.hello``, ``train``, ``query.aggregate``, ``query.secagg`` (one step of a ``masking``
sum: :mod:`gfmfr_secure.roles.secagg_party`), ``query.ckks`` (one step of a ``ckks`` sum:
:mod:`gfmfr_secure.roles.ckks_party`; the node with partition-id 0 is its key holder and
keeps the round's secret context in its state file until the one decryption), ``evaluate``. One-way messages (keep the
best round's state, server-side group assignment) travel in the next request's
``RecordDict`` under ``before.<i>`` and are applied first, in order.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from gfmfr_secure.errors import ConfigError, GfmfrError
from gfmfr_secure.flower.records import get_message, message_names, partition_users, put_message
from gfmfr_secure.flower.runconfig import check_supported, experiment_config
from gfmfr_secure.roles.client import ClientNode
from gfmfr_secure.roles.inprocess import InProcessClients
from gfmfr_secure.roles.ckks_party import KeyRound, NodeCKKS
from gfmfr_secure.roles.messages import Assignment, Broadcast, CKKSStep, EvalRequest, KeepSnapshot, MessageError, SecAggStep, SumRequest, Upload
from gfmfr_secure.roles.secagg_party import NodeParties, PartyRound

__all__ = ["NodeHost", "NodeStateError", "app", "read_records", "state_path", "write_records"]

#: the request's and the reply's record names; one-way messages are "before.<i>"; the sum request a secure-sum step carries;
#: the clients' adaptive-clipping count query a train reply carries (central DP under plain)
REQUEST, REPLY, BEFORE, SUM, UNCLIPPED = "request", "reply", "before", "sum", "unclipped"
#: state record names
STORE, BEST, NORMS, SCALARS, PENDING, SECAGG = "gfmfr.store", "gfmfr.best", "gfmfr.norms", "gfmfr.node", "gfmfr.upload", "gfmfr.secagg"
#: the ckks key holder's state (its round's secret context until the one decryption, then the release)
CKKS = "gfmfr.ckks"
#: state record of DP-SGD's accountant events: the clients (int64 [k]) and their events (float64 [k, 3]), each client's in order
DPSGD = "gfmfr.dpsgd"

#: the request's sequence number among those sent to this node (0: the hello)
SEQ = "seq"

ONE_WAY = {"KeepSnapshot": KeepSnapshot, "Assignment": Assignment}


def state_path(context: Context) -> Path:
    """Where this node keeps its clients' state for the run: ``<state-dir>/run-<run id>/node-<node id>.npz``."""
    base = context.node_config.get("state-dir") or Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "gfmfr-state"
    return Path(str(base)).expanduser() / f"run-{int(context.run_id)}" / f"node-{int(context.node_id)}.npz"


def write_records(path: Path, records: RecordDict) -> None:
    """Save the array and config records of ``records`` to ``path`` (``np.savez``, configs as JSON; written atomically)."""
    arrays: dict[str, np.ndarray] = {}
    for name, record in records.array_records.items():
        arrays.update({f"a/{name}/{key}": array.numpy() for key, array in record.items()})
    configs = {name: dict(record) for name, record in records.config_records.items()}
    arrays["configs"] = np.frombuffer(json.dumps(configs).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def read_records(path: Path) -> RecordDict:
    """The records :func:`write_records` saved at ``path``; empty when there is no file yet."""
    records = RecordDict()
    if not path.is_file():
        return records
    with np.load(path, allow_pickle=False) as data:
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for key in data.files:
            if key.startswith("a/"):
                name, field = key[2:].rsplit("/", 1)
                grouped.setdefault(name, {})[field] = data[key]
        configs = json.loads(data["configs"].tobytes().decode("utf-8"))
    for name, fields in grouped.items():
        records[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in fields.items()})
    for name, values in configs.items():
        records[name] = ConfigRecord(values)
    return records


class NodeStateError(GfmfrError, RuntimeError):
    """A request that does not follow the state the node holds."""


def _tensors_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().numpy())) for k, v in state.items()})


def _record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


class NodeHost:
    """The clients of one SuperNode, rebuilt in each ``flwr-clientapp`` process.

    Parameters
    ----------
    cfg : the experiment config (from the run config; data folder of this machine).
    split : the leave-one-out split of the data folder.
    users : int64 [k] the hosted users.

    Attributes
    ----------
    node : the :class:`~gfmfr_secure.roles.client.ClientNode`.
    clients : the node's clients behind the message boundary
        (:class:`~gfmfr_secure.roles.inprocess.InProcessClients` over ``node``: the same
        code path as the in-process engine, restricted to this node's users).
    """

    def __init__(self, cfg: Any, split: Any, users: np.ndarray) -> None:
        check_supported(cfg)
        self.cfg = cfg
        self.seq = -1  # the last request whose state this node holds (-1: none yet)
        self.node = ClientNode(cfg, split, users)
        self.clients = InProcessClients(cfg, self.node)
        self.secagg: PartyRound | None = None  # the node's parties in the secure sum under way
        self.ckks: KeyRound | None = None  # the key holder's state in the ckks sum under way (partition 0 only)

    @classmethod
    def from_context(cls, context: Context) -> NodeHost:
        """Load the data folder, take this node's partition and restore the state kept in ``context.state``."""
        from gfmfr_secure.simulation.runner import prepare_data

        nc = context.node_config
        data = nc.get("data")
        cfg = experiment_config(context.run_config, str(data) if data else None)
        _, split = prepare_data(cfg)
        try:
            pid, n = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))
        except (TypeError, ValueError):
            raise ConfigError(f"node config partition-id / num-partitions must be integers, got {nc.get('partition-id')!r} / {nc.get('num-partitions')!r}") from None
        host = cls(cfg, split, partition_users(split.n_users, pid, n))
        host.restore(read_records(state_path(context)))
        return host

    # ------------------------------------------------------------------ state between messages

    def save(self, state: RecordDict) -> None:
        """Write the node's client state into the records ``state`` (saved with :func:`write_records`)."""
        node, clients = self.node, self.clients
        state[STORE] = _tensors_to_record(node.state_dict())
        if node.best is not None:
            current = node.store
            node.store = node.best
            try:
                state[BEST] = _tensors_to_record(node.state_dict())
            finally:
                node.store = current
        state[NORMS] = ArrayRecord({"norms": Array(np.ascontiguousarray(getattr(node, "_norms", torch.zeros(0)).numpy()))})
        state[SCALARS] = ConfigRecord({
            "seq": int(self.seq),
            "clip": float(getattr(node, "_clip", math.inf)),
            "population": int(clients.population),
            "trained": int(clients.trained),
            "pending": clients.upload is not None,
        })
        if clients.upload is not None:
            put_message(state, PENDING, Upload.of(clients.upload, 0))
        if self.secagg is not None:  # the parties' secrets stay on this machine, in this file
            put_message(state, SECAGG, self.secagg)
        if self.ckks is not None:  # the key holder's secret context stays on this machine, in this file
            put_message(state, CKKS, self.ckks)
        if node.record_dp is not None:
            owners = [c for c, hist in sorted(node.record_dp.events.items()) for _ in hist]
            events = [ev for _, hist in sorted(node.record_dp.events.items()) for ev in hist]
            state[DPSGD] = ArrayRecord({
                "clients": Array(np.asarray(owners, dtype=np.int64)), "events": Array(np.asarray(events, dtype=np.float64).reshape(-1, 3)),
            })

    def restore(self, state: RecordDict) -> None:
        """Read back what :meth:`save` wrote (nothing on the run's first message)."""
        node, clients = self.node, self.clients
        if STORE not in state.array_records:
            self.seq = -1
            return
        if BEST in state.array_records:
            node.load_state_dict(_record_to_tensors(state.array_records[BEST]))
            node.best = node.store
        node.load_state_dict(_record_to_tensors(state.array_records[STORE]))
        node._norms = torch.from_numpy(np.array(state.array_records[NORMS]["norms"].numpy()))  # noqa: SLF001 - kept between processes
        scalars = state.config_records[SCALARS]
        self.seq = int(scalars["seq"])
        node._clip = float(scalars["clip"])  # noqa: SLF001
        clients.population, clients.trained = int(scalars["population"]), int(scalars["trained"])
        clients.upload = get_message(state, PENDING, Upload).as_update() if bool(scalars["pending"]) else None
        self.secagg = get_message(state, SECAGG, PartyRound) if f"{SECAGG}.config" in state.config_records else None
        self.ckks = get_message(state, CKKS, KeyRound) if f"{CKKS}.config" in state.config_records else None
        if node.record_dp is not None and DPSGD in state.array_records:
            record = state.array_records[DPSGD]
            node.record_dp.events = {}
            for c, (sigma, q, steps) in zip(record["clients"].numpy().tolist(), record["events"].numpy().tolist(), strict=True):
                node.record_dp.events.setdefault(int(c), []).append((float(sigma), float(q), int(steps)))

    # ------------------------------------------------------------------ messages

    def handle(self, kind: str, content: RecordDict) -> RecordDict:
        """Apply the one-way messages in ``content``, answer its request; the reply's records.

        Raises
        ------
        NodeStateError
            If the request's sequence number does not follow the one whose state
            ``Context.state`` holds (the state of a previous message did not reach the
            SuperNode, so the clients would train on stale state).
        """
        seq = int(content.config_records[SEQ]["seq"]) if SEQ in content.config_records else self.seq + 1
        if seq != self.seq + 1:
            raise NodeStateError(
                f"this node holds the clients' state after request {self.seq}, but this is request {seq}: the state kept "
                "after an earlier request did not reach the SuperNode (flwr-clientapp failed to push its Context)"
            )
        self.seq = seq
        for name in message_names(content, BEFORE):
            config = content.config_records[f"{name}.config"]
            cls = ONE_WAY.get(str(config.get("__type__")))
            if cls is None:
                raise MessageError(f"one-way message {name!r} has unknown type {config.get('__type__')!r}")
            msg = get_message(content, name, cls)
            if cls is KeepSnapshot:
                self.clients.keep_snapshot(msg)
            else:
                self.clients.assign(msg)
        reply = RecordDict()
        if kind == "hello":
            out: Any = self.clients.hello()
        elif kind == "train":
            self.secagg = self.ckks = None
            out = self.clients.train(get_message(content, REQUEST, Broadcast))
            pc = self.cfg.privacy
            if not self.clients.secure and pc.mechanism == "central" and pc.adaptive_clip:  # the server releases the sums (FlowerClients)
                reply[UNCLIPPED] = ConfigRecord({"query": float(self.clients.unclipped_query())})
        elif kind == "aggregate":
            out = self.clients.aggregate(get_message(content, REQUEST, SumRequest))
        elif kind == "secagg":
            request = get_message(content, SUM, SumRequest) if f"{SUM}.config" in content.config_records else None
            out, self.secagg = NodeParties(self.clients, self.secagg).answer(get_message(content, REQUEST, SecAggStep), request)
        elif kind == "ckks":
            request = get_message(content, SUM, SumRequest) if f"{SUM}.config" in content.config_records else None
            key_holder = bool(np.isin(0, self.node.users))  # partition-id 0 hosts user 0
            out, self.ckks = NodeCKKS(self.clients, self.ckks, key_holder).answer(get_message(content, REQUEST, CKKSStep), request)
        elif kind == "evaluate":
            out = self.clients.evaluate(get_message(content, REQUEST, EvalRequest))
        else:
            raise MessageError(f"unknown request {kind!r}")
        put_message(reply, REPLY, out)
        return reply


app = ClientApp()


def _serve(kind: str, msg: Message, context: Context) -> Message:
    """Answer request ``kind`` (``hello``, ``train``, ``aggregate``, ``secagg``, ``evaluate``) and keep the node's state.

    The replies: :class:`~gfmfr_secure.roles.messages.Hello`, :class:`~gfmfr_secure.roles.messages.Upload`
    (every hosted cohort member's record), :class:`~gfmfr_secure.roles.messages.SumReply` (this node's part
    of a sum), :class:`~gfmfr_secure.roles.messages.EvalReply` (per-user metrics of the hosted users).
    """
    host = NodeHost.from_context(context)
    reply = host.handle(kind, msg.content)
    state = RecordDict()
    host.save(state)
    write_records(state_path(context), state)
    return Message(reply, reply_to=msg)


_HANDLERS = (("hello", app.query("hello")), ("train", app.train()), ("aggregate", app.query("aggregate")), ("secagg", app.query("secagg")), ("ckks", app.query("ckks")), ("evaluate", app.evaluate()))
for _kind, _register in _HANDLERS:
    _register(functools.partial(_serve, _kind))
