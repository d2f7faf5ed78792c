"""The interface the server loop talks to: a cohort of client nodes behind some transport.

:class:`Clients` is all the server role knows of the clients. The in-process engine
(:class:`gfmfr_secure.roles.inprocess.InProcessClients`) implements it with one
:class:`~gfmfr_secure.roles.client.ClientNode` and passes every message through bytes;
a Flower Grid implements it across machines. Every argument and result is a message of
:mod:`gfmfr_secure.roles.messages`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gfmfr_secure.roles.messages import Assignment, Broadcast, EvalReply, EvalRequest, Hello, KeepSnapshot, SumReply, SumRequest, Upload

__all__ = ["Clients"]


@runtime_checkable
class Clients(Protocol):
    """The clients as the server sees them: messages in, messages out.

    Order within a round: :meth:`train`, then :meth:`aggregate` (once per phase), then
    :meth:`assign` (server-side grouping only); :meth:`evaluate` and
    :meth:`keep_snapshot` after the rounds that validate.
    """

    def hello(self) -> Hello:
        """Which users the nodes host, which have training data and which a held-out item."""
        ...

    def train(self, msg: Broadcast) -> Upload:
        """Local training of the cohort members the nodes host; their uploads.

        Under the plain backend the full uploads (the server sees each anyway); under a
        secure backend :meth:`Upload.public` (the updates stay with the clients until
        :meth:`aggregate`). Cohort members that refuse the broadcast do not train
        (``Upload.refused``).
        """
        ...

    def aggregate(self, msg: SumRequest) -> SumReply:
        """A sum of this round's uploads through the aggregation backend, as it is released."""
        ...

    def assign(self, msg: Assignment) -> None:
        """Tell cohort members the group server-side grouping put them in."""
        ...

    def evaluate(self, msg: EvalRequest) -> EvalReply:
        """Each hosted user's ranking metrics of the requested model."""
        ...

    def keep_snapshot(self, msg: KeepSnapshot) -> None:
        """Keep the clients' current state as the best round's."""
        ...
