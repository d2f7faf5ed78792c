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
the best validation round, this round's uploads until they are summed) goes into
``Context.state``, which the SuperNode keeps for the run and hands to the next process.

Message types (``query``/``train``/``evaluate`` with an action, as 1.42 requires):
``query.hello``, ``train``, ``query.aggregate``, ``evaluate``. One-way messages (keep the
best round's state, server-side group assignment) travel in the next request's
``RecordDict`` under ``before.<i>`` and are applied first, in order.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from gfmfr_secure.errors import ConfigError
from gfmfr_secure.flower.records import get_message, message_names, partition_users, put_message
from gfmfr_secure.flower.runconfig import check_supported, experiment_config
from gfmfr_secure.roles.client import ClientNode
from gfmfr_secure.roles.inprocess import InProcessClients
from gfmfr_secure.roles.messages import Assignment, Broadcast, EvalRequest, KeepSnapshot, MessageError, SumRequest, Upload

__all__ = ["NodeHost", "app"]

#: the request's and the reply's record names; one-way messages are "before.<i>"
REQUEST, REPLY, BEFORE = "request", "reply", "before"
#: Context.state record names
STORE, BEST, NORMS, SCALARS, PENDING = "gfmfr.store", "gfmfr.best", "gfmfr.norms", "gfmfr.node", "gfmfr.upload"

ONE_WAY = {"KeepSnapshot": KeepSnapshot, "Assignment": Assignment}


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
        self.node = ClientNode(cfg, split, users)
        self.clients = InProcessClients(cfg, self.node)

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
        host.restore(context.state)
        return host

    # ------------------------------------------------------------------ state between messages

    def save(self, state: RecordDict) -> None:
        """Write the node's client state into ``state`` (Flower's ``Context.state``)."""
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
            "clip": float(getattr(node, "_clip", math.inf)),
            "population": int(clients.population),
            "trained": int(clients.trained),
            "pending": clients.upload is not None,
        })
        if clients.upload is not None:
            put_message(state, PENDING, Upload.of(clients.upload, 0))

    def restore(self, state: RecordDict) -> None:
        """Read back what :meth:`save` wrote (nothing on the run's first message)."""
        node, clients = self.node, self.clients
        if STORE not in state.array_records:
            return
        if BEST in state.array_records:
            node.load_state_dict(_record_to_tensors(state.array_records[BEST]))
            node.best = node.store
        node.load_state_dict(_record_to_tensors(state.array_records[STORE]))
        node._norms = torch.from_numpy(np.array(state.array_records[NORMS]["norms"].numpy()))  # noqa: SLF001 - kept between processes
        scalars = state.config_records[SCALARS]
        node._clip = float(scalars["clip"])  # noqa: SLF001
        clients.population, clients.trained = int(scalars["population"]), int(scalars["trained"])
        clients.upload = get_message(state, PENDING, Upload).as_update() if bool(scalars["pending"]) else None

    # ------------------------------------------------------------------ messages

    def handle(self, kind: str, content: RecordDict) -> RecordDict:
        """Apply the one-way messages in ``content``, answer its request; the reply's records."""
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
            out = self.clients.train(get_message(content, REQUEST, Broadcast))
        elif kind == "aggregate":
            out = self.clients.aggregate(get_message(content, REQUEST, SumRequest))
        elif kind == "evaluate":
            out = self.clients.evaluate(get_message(content, REQUEST, EvalRequest))
        else:
            raise MessageError(f"unknown request {kind!r}")
        put_message(reply, REPLY, out)
        return reply


app = ClientApp()


def _serve(kind: str, msg: Message, context: Context) -> Message:
    """Answer request ``kind`` (``hello``, ``train``, ``aggregate``, ``evaluate``) and keep the node's state.

    The replies: :class:`~gfmfr_secure.roles.messages.Hello`, :class:`~gfmfr_secure.roles.messages.Upload`
    (every hosted cohort member's record), :class:`~gfmfr_secure.roles.messages.SumReply` (this node's part
    of a sum), :class:`~gfmfr_secure.roles.messages.EvalReply` (per-user metrics of the hosted users).
    """
    host = NodeHost.from_context(context)
    reply = host.handle(kind, msg.content)
    host.save(context.state)
    return Message(reply, reply_to=msg)


for _kind, _register in (("hello", app.query("hello")), ("train", app.train()), ("aggregate", app.query("aggregate")), ("evaluate", app.evaluate())):
    _register(functools.partial(_serve, _kind))
