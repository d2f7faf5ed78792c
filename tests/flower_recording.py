"""A LocalGrid that keeps every protocol step the server received, for the Flower secure-sum tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from flwr.app import Message

from gfmfr_secure.flower.localgrid import LocalGrid
from gfmfr_secure.flower.records import get_message


class RecordingGrid(LocalGrid):
    """LocalGrid that appends each successful ``message_type`` reply, read as ``step_cls``, to ``received``."""

    message_type: ClassVar[str]
    step_cls: ClassVar[type]
    received: list[Any]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.metadata.message_type == self.message_type and not reply.has_error():
                self.__dict__.setdefault("received", []).append(get_message(reply.content, "reply", self.step_cls))
        return replies
