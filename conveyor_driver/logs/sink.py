"""What every log sink is: a structlog processor with a background shipper around it.

A sink's processor only queues (a log call never waits on the network); :meth:`LogSink.start`
starts the shipper on the running loop, :meth:`LogSink.close` flushes within a deadline,
and :attr:`LogSink.stats` counts the lines. How a sink reports is shared
(:class:`SinkReporter`): counts go to the metrics once a batch, and trouble goes to the
console logger once per kind, never through the chain the sink is a part of, so a failing
receiver cannot feed itself.

To add a sink: a module in this package with a class that satisfies :class:`LogSink`,
reporting through a :class:`SinkReporter`, started and closed by ``runtime/server.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .chain import build_logger

if TYPE_CHECKING:
    from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

    from ..runtime.publisher import Publisher

#: What a sink calls with ``("sent" | "dropped", lines)``: see ``Telemetry.line_counter``.
LineCounter = Callable[[str, int], None]


class SinkStats(Protocol):
    """Lines a sink has delivered and lines it gave up on, since it was made."""

    @property
    def sent(self) -> int: ...

    @property
    def dropped(self) -> int: ...


class LogSink(Protocol):
    """A structlog processor that ships lines in the background."""

    def __call__(
        self, logger: WrappedLogger, method: str, event_dict: EventDict, /
    ) -> EventDict: ...

    def start(self, publisher: Publisher) -> None:
        """Begin shipping on the running loop; lines logged before wait in the queue.

        ``publisher`` is the connection's acked publisher; a sink that ships elsewhere
        ignores it.
        """

    async def close(self) -> None:
        """Ship what is queued within the sink's deadline, then stop; a second call returns."""

    @property
    def stats(self) -> SinkStats: ...


class SinkReporter:
    """A sink's voice: line counts to the metrics, its own trouble to the console."""

    def __init__(
        self,
        sink: str,
        *,
        console: FilteringBoundLogger | None = None,
        on_lines: LineCounter | None = None,
    ) -> None:
        self.console = (console or build_logger()).bind(sink=sink)
        self._on_lines = on_lines
        self._sent = 0
        self._dropped = 0
        self._warned: set[str] = set()

    def started(self) -> None:
        """Both series exist from the start, at zero, so a dashboard shows a flat line."""
        if self._on_lines is not None:
            self._on_lines("sent", 0)
            self._on_lines("dropped", 0)

    def report(self, stats: SinkStats) -> None:
        """Hand the counts since the last report to the metrics (once a batch, not a line)."""
        if self._on_lines is None:
            return
        sent, dropped = stats.sent, stats.dropped
        if sent > self._sent:
            self._on_lines("sent", sent - self._sent)
            self._sent = sent
        if dropped > self._dropped:
            self._on_lines("dropped", dropped - self._dropped)
            self._dropped = dropped

    def warn_once(self, kind: str, event: str, **fields: object) -> None:
        """A warning on the console, the first time this kind of trouble happens."""
        if kind in self._warned:
            return
        self._warned.add(kind)
        self.console.warning(event, **fields)
