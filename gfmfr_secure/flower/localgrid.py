"""The Flower apps in one process: a ``Grid`` whose SuperNodes are direct ClientApp calls.

Every message is answered by ``clientapp.app(message, context)`` with the node's own
``Context`` and nothing else kept between messages, as a ``flwr-clientapp`` process per
message has it in a deployment. The ServerApp's logic (:func:`~gfmfr_secure.flower.serverapp.run_server`)
then runs against it unchanged: the transport, the records, the node state kept in
``Context.state`` and the dropout handling, without SuperLink, SuperNodes or polling.
Used by the tests and for debugging; nodes in :attr:`LocalGrid.silent` never answer
(a node that stopped).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from gfmfr_secure.errors import GfmfrError

__all__ = ["LocalGrid", "task_identity"]


@contextmanager
def task_identity(run_id: int = 1) -> Iterator[None]:
    """Set the task identity flwr 1.42's ``Message()`` reads (a ServerApp process has one), then restore it.

    ``flwr.supercore.task_identity.TaskIdentity`` is internal to Flower; only this
    in-process stand-in for a ServerApp process needs it.
    """
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # noqa: SLF001
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # noqa: SLF001


class LocalGrid(Grid):
    """SuperNodes ``100 + p`` for partitions ``p = 0 .. n - 1``, each a ``Context`` in this process.

    Parameters
    ----------
    run_config : the run config every node sees.
    node_configs : one node config per node (``partition-id``, ``num-partitions``, ``data``).
    state_dir : the nodes' ``state-dir`` (where each keeps its clients' state between messages).
    silent_from : ``{group_id: node id}``: from the first request with that group id on
        (e.g. ``"train-1"``), that node never answers.

    Attributes
    ----------
    calls : ``(node id, message type, group id)`` of every message sent, in order.
    silent : nodes that no longer answer.
    """

    def __init__(
        self, run_config: Mapping[str, Any], node_configs: list[dict[str, Any]], state_dir: str | Path, silent_from: Mapping[str, int] | None = None
    ) -> None:
        from gfmfr_secure.flower import clientapp

        self.app = clientapp.app
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"state-dir": str(state_dir), **nc}, state=RecordDict(), run_config=dict(run_config))
            for i, nc in enumerate(node_configs)
        }
        self.silent_from = dict(silent_from or {})
        self.silent: set[int] = set()
        self.calls: list[tuple[int, str, str]] = []

    def set_run(self, run: Any) -> None:
        """Nothing to set: one run per grid."""

    @property
    def run(self) -> Any:
        raise NotImplementedError("LocalGrid has no Run record")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers in send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers in send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Each message's reply from its node's ClientApp, in order; silent nodes' messages get none.

        A ClientApp raising one of this package's errors answers with Flower's error reply
        (code ``CLIENT_APP_RAISED_EXCEPTION``), as ``flwr-clientapp`` does; anything else propagates.
        """
        replies = []
        for msg in messages:
            node, group = int(msg.metadata.dst_node_id), msg.metadata.group_id
            if self.silent_from.get(group) == node:
                self.silent.add(node)
            self.calls.append((node, msg.metadata.message_type, group))
            if node in self.silent:
                continue
            try:
                replies.append(self.app(msg, self.contexts[node]))
            except GfmfrError as err:  # as flwr-clientapp answers when its ClientApp raises
                reason = f"{type(err)}:<'{err}'>"
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg))
        return replies
