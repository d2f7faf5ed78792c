"""Console log output that keeps progress bars and log lines apart.

A tqdm bar redraws its line in place with ``\\r`` and no newline. A log record
written to the same stream in the middle of a bar lands after the bar's text on
the same line. :class:`ProgressLogHandler` writes each record through
``tqdm.write``, which clears the bars on that stream, writes the line and
redraws them below it. When the stream is not a terminal (a pipe or a file),
where clearing does not move to a new line, it also starts a line first, so
that every log line stands on a line of its own.
"""

from __future__ import annotations

import logging
from typing import TextIO

from tqdm.auto import tqdm

__all__ = ["ProgressLogHandler", "bars_open"]


def bars_open() -> bool:
    """Whether some enabled tqdm bar is open (disabled bars are never registered)."""
    # tqdm keeps its open bars in this class attribute; tqdm.write reads it the same way.
    return bool(getattr(tqdm, "_instances", ()))


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


class ProgressLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose lines never share a line with a tqdm progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record on a line of its own, above any open bar."""
        try:
            message = self.format(record)
            stream = self.stream
            if bars_open() and not _is_terminal(stream):
                message = "\n" + message
            tqdm.write(message, file=stream)
            self.flush()
        except RecursionError:
            raise
        except (OSError, ValueError):
            self.handleError(record)
