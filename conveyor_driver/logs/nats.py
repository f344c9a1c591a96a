"""Ship run log lines to Conveyor over NATS (``docs/protocol.md#logs``).

Each line of a run becomes a ``Log`` entry published twice: on JetStream ``logs.<run>``,
which the server stores, and on core ``live.logs.<run>.<driver>``, which it relays live.
The processor only queues; a background task publishes in batches and awaits the stream's
acknowledgements, so a handler never waits on the network and a clean shutdown loses no
line.

A line too big for one NATS message is truncated, not split: the entry keeps the head of
its ``message`` and ends with a marker that states the line's whole size (see
:func:`~conveyor_driver.logs.chain.truncate_line`). The limit is the ``max_payload`` the
connected server announces (read at every batch, as a reconnect may reach another server),
less the JSON envelope and the trace headers, because the server counts headers and body
together and closes the connection of a client that sends more. One message per line keeps
each entry a whole line for the server's store and its live relay; a split line would come
back as pieces with nothing to join them.

Stored lines go out through the driver's acked publisher
(:class:`~conveyor_driver.runtime.publisher.Publisher`), a batch at a time, pipelined; its
answers are judged the publisher's way. Weather (no connection, no acknowledgement in
time, no responders while JetStream elects a leader, a 5xx from the stream) leaves the
entries queued, and they are tried again, a second apart, until they are stored or the
sink closes. A refusal that no retry can change (a 4xx from the stream, such as a
message above its ``max_msg_size``, or an entry the client cannot send) drops that entry
alone: it is counted as dropped and warned about once per kind on the console logger,
never through the chain this sink is a part of, and the entries behind it go on.

The publisher is handed in (``logs`` sits below ``runtime`` and imports nothing from it).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import TYPE_CHECKING

import attrs
import orjson

from .. import protocol
from ..models import LogEntry, encode_log_entry
from ..trace_context import current_span_context, inject
from .chain import render_message, truncate_line
from .sink import LineCounter, SinkReporter
from .stdlib import silence_bridge

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext
    from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

    from ..runtime.publisher import Publisher

_BATCH = 256
_Item = tuple[str, bytes, dict[str, str] | None]
#: A line as logged, with the span it was logged in (None: outside any).
_Line = tuple["EventDict", "SpanContext | None"]
_ACK_TIMEOUT = 5.0
#: The pause before a batch that met weather is tried again.
_RETRY_DELAY = 1.0


@attrs.define
class NatsStats:
    sent: int = 0
    dropped: int = 0


class NatsLogSink:
    """A structlog processor that forwards every line bound to a run to NATS.

    Lines without a ``run_id`` (driver start-up, connection news) are not a run's and stay
    on the console. The queue is bounded: when NATS is away long enough to fill it, the
    oldest lines are dropped and counted rather than growing without limit.
    """

    def __init__(
        self,
        driver: str,
        *,
        max_queue: int = 100_000,
        on_lines: LineCounter | None = None,
        console: FilteringBoundLogger | None = None,
    ) -> None:
        self.driver = driver
        self.max_queue = max_queue
        self.stats = NatsStats()
        self._reporter = SinkReporter("nats", console=console, on_lines=on_lines)
        self._queue: collections.deque[_Line] = collections.deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._publisher: Publisher | None = None
        self._in_flight: list[_Item] = []
        self._closing = False

    @property
    def sent(self) -> int:
        return self.stats.sent

    @property
    def dropped(self) -> int:
        return self.stats.dropped

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        if "run_id" in event_dict:
            # The span itself, not the ids the chain wrote: its flags say whether the trace
            # is sampled, and the entry's traceparent must say the same as the result's.
            span = current_span_context() if "trace_id" in event_dict else None
            self._enqueue((dict(event_dict), span))
        return event_dict

    def _encode(self, line: _Line, publisher: Publisher) -> _Item | str:
        """Render an entry in the shipper task, off the handler's path.

        The result fits in the server's ``max_payload`` with its headers; a string says
        why it cannot.
        """
        event_dict, span = line
        run_id = str(event_dict["run_id"])
        headers = inject({}, span) if span is not None else None
        entry = LogEntry(
            runid=run_id,
            driver=self.driver,
            pipeline=str(event_dict.get("pipeline") or ""),
            timestamp=str(event_dict.get("timestamp", "")),
            message=render_message(event_dict),
        )
        try:
            body = encode_log_entry(entry)
        except TypeError:  # lone surrogates (bytes decoded with surrogateescape): not UTF-8
            message = entry.message.encode("utf-8", "replace").decode()
            entry = attrs.evolve(entry, message=message)
            body = encode_log_entry(entry)
        limit = publisher.room(headers)
        if len(body) > limit:
            fitted = _fit(entry, body, limit)
            if fitted is None:
                return (
                    "an entry with an empty message is larger than max_payload "
                    f"{publisher.max_payload}"
                )
            body = fitted
        return run_id, body, headers

    def _enqueue(self, item: _Line) -> None:
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self.stats.dropped += 1
        self._queue.append(item)
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def start(self, publisher: Publisher) -> None:
        """Begin publishing through ``publisher``; lines logged before this wait in the queue."""
        self._publisher = publisher
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = asyncio.create_task(self._publish_forever(), name="nats-log-sink")
        self._reporter.started()
        if self._queue:
            self._wake.set()

    async def close(self, timeout: float = 10.0) -> None:
        """Publish what is queued (within ``timeout``), then stop; a second call returns.

        What is still unpublished at the deadline (NATS away) is counted as dropped. The
        shipper is cancelled and awaited here, so its cancellation never surfaces in a
        later call or at the loop's end.
        """
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.stats.dropped += len(self._in_flight) + len(self._queue)
            self._in_flight = []
            self._queue.clear()
            self._reporter.report(self.stats)

    def _drop(self, count: int, reason: str, kind: str) -> None:
        """Count entries that no retry can deliver; warn once per kind of refusal."""
        self.stats.dropped += count
        self._reporter.warn_once(
            kind,
            "nats refused log lines; dropping such lines (warned once)",
            lines=count,
            reason=reason,
        )

    async def _publish_forever(self) -> None:
        silence_bridge()
        try:
            await self._publish_all()
        finally:
            self._reporter.report(self.stats)

    async def _publish_all(self) -> None:
        assert self._publisher is not None
        nc = self._publisher.nc
        retry: list[_Item] = []
        while True:
            self._reporter.report(self.stats)
            if not retry and not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            self._in_flight = retry or self._take_batch()
            retry = await self._publish(self._in_flight) if self._in_flight else []
            self._in_flight = retry
            if retry:
                if self._closing and nc.is_closed:
                    self.stats.dropped += len(retry) + len(self._queue)
                    self._queue.clear()
                    self._in_flight = []
                    return
                await asyncio.sleep(_RETRY_DELAY)

    def _take_batch(self) -> list[_Item]:
        assert self._publisher is not None
        publisher = self._publisher
        batch: list[_Item] = []
        for _ in range(min(_BATCH, len(self._queue))):
            line = self._queue.popleft()
            try:
                item = self._encode(line, publisher)
            except Exception as exc:  # a value the encoder cannot take: this entry only
                self._drop(1, f"cannot encode the entry: {exc}", "encode")
                continue
            if isinstance(item, str):
                self._drop(1, item, "envelope")
            else:
                batch.append(item)
        return batch

    async def _publish(self, batch: list[_Item]) -> list[_Item]:
        """Publish a batch; return the entries to try again, in the batch's order.

        Each line goes live (core NATS, no answer) and to the stream (acked, through the
        publisher's batch: pipelined, awaited together). Entries refused for good are
        dropped here; only weather sends an entry back.
        """
        publisher = self._publisher
        assert publisher is not None
        nc = publisher.nc
        acked = publisher.batch()
        published: list[_Item] = []
        unsent: list[_Item] = []
        unsendable: list[str] = []
        for index, item in enumerate(batch):
            run_id, body, headers = item
            try:
                await nc.publish(
                    protocol.live_log_subject(run_id, self.driver), body, headers=headers
                )
                await acked.send(protocol.log_subject(run_id), body, headers)
            except Exception as exc:
                if publisher.is_permanent(exc):
                    unsendable.append(f"{type(exc).__name__}: {exc}")
                    continue
                unsent = batch[index:]  # the connection: this entry and those after it wait
                break
            published.append(item)
        retry: list[_Item] = []
        refused: list[str] = []
        for item, error in zip(published, await acked.wait(_ACK_TIMEOUT), strict=True):
            if error is None:
                self.stats.sent += 1
            elif publisher.is_permanent(error):
                refused.append(publisher.describe(error))
            else:
                retry.append(item)
        if unsendable:
            self._drop(len(unsendable), unsendable[0], "unsendable")
        if refused:
            self._drop(len(refused), refused[0], f"stream: {refused[0]}")
        return retry + unsent


def _fit(entry: LogEntry, body: bytes, limit: int) -> bytes | None:
    """``entry`` encoded in at most ``limit`` bytes, its message truncated with the marker.

    The message is cut by its UTF-8 size, but JSON escapes some characters (a quote takes
    two bytes, a control character six), so the cut text may still encode too long. Then
    the cut moves back by the excess: each byte cut off takes at least one byte of JSON
    with it, so the next try fits. None when even an empty message does not fit.
    """
    envelope = len(body) - len(orjson.dumps(entry.message))
    budget = limit - envelope  # for the message as a JSON string, quotes included
    room = budget - 2
    while room > 0:
        message = truncate_line(entry.message, room)
        over = len(orjson.dumps(message)) - budget
        if over <= 0:
            return encode_log_entry(attrs.evolve(entry, message=message))
        room = min(room, len(message.encode())) - over
    return None
