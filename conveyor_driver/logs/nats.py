"""Ship run log lines to Conveyor over NATS (PROTOCOL.md section 4).

Each line of a run becomes a ``Log`` entry published twice: on JetStream ``logs.<run>``,
which the server stores, and on core ``live.logs.<run>.<driver>``, which it relays live.
The processor only queues; a background task publishes in batches and awaits the stream's
acknowledgements, so a handler never waits on the network and a clean shutdown loses no
line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import protocol
from ..models import LogEntry, encode_log_entry
from ..telemetry import inject, span_context_from_ids
from .chain import render_message
from .stdlib import silence_bridge

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from structlog.typing import EventDict, WrappedLogger

_BATCH = 256
_Item = tuple[str, bytes, dict[str, str] | None]
_ACK_TIMEOUT = 5.0
_RETRY_DELAY = 1.0


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
        on_lines: Callable[[str, int], None] | None = None,
    ) -> None:
        self.driver = driver
        self._on_lines = on_lines
        self._reported = {"sent": 0, "dropped": 0}
        self.max_queue = max_queue
        self.sent = 0
        self.dropped = 0
        self._queue: collections.deque[EventDict] = collections.deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._nc: Client | None = None
        self._ack_prefix: str | None = None
        self._sequence = 0
        self._awaiting: dict[str, _Item] = {}
        self._failed: list[_Item] = []
        self._all_acked = asyncio.Event()
        self._closing = False

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        if "run_id" in event_dict:
            self._enqueue(dict(event_dict))
        return event_dict

    def _encode(self, event_dict: EventDict) -> _Item:
        """Render an entry in the publisher task, off the handler's path."""
        run_id = str(event_dict["run_id"])
        headers = None
        if "trace_id" in event_dict and "span_id" in event_dict:
            span = span_context_from_ids(event_dict["trace_id"], event_dict["span_id"])
            headers = inject({}, span)
        entry = LogEntry(
            runid=run_id,
            driver=self.driver,
            pipeline=str(event_dict.get("pipeline") or ""),
            timestamp=str(event_dict.get("timestamp", "")),
            message=render_message(event_dict),
        )
        return run_id, encode_log_entry(entry), headers

    def _enqueue(self, item: EventDict) -> None:
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(item)
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def start(self, nc: Client) -> None:
        """Begin publishing on ``nc``; lines logged before this wait in the queue."""
        self._nc = nc
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = asyncio.create_task(self._publish_forever(), name="nats-log-sink")
        if self._on_lines is not None:  # both series exist from the start, at zero
            self._on_lines("sent", 0)
            self._on_lines("dropped", 0)
        if self._queue:
            self._wake.set()

    async def close(self, timeout: float = 10.0) -> None:
        """Publish what is queued (within ``timeout``), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            self.dropped += len(self._queue)
            self._queue.clear()

    def _report(self) -> None:
        """Hand the counts since the last report to the metrics (once a batch, not a line)."""
        if self._on_lines is None:
            return
        for status, total in (("sent", self.sent), ("dropped", self.dropped)):
            if total > self._reported[status]:
                self._on_lines(status, total - self._reported[status])
                self._reported[status] = total

    async def _publish_forever(self) -> None:
        silence_bridge()
        try:
            await self._publish_all()
        finally:
            self._report()

    async def _publish_all(self) -> None:
        retry: list[_Item] = []
        while True:
            self._report()
            if not retry and not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch = retry or [
                self._encode(self._queue.popleft()) for _ in range(min(_BATCH, len(self._queue)))
            ]
            retry = await self._publish(batch)
            if retry:
                if self._closing and self._nc is not None and self._nc.is_closed:
                    self.dropped += len(retry) + len(self._queue)
                    self._queue.clear()
                    return
                await asyncio.sleep(_RETRY_DELAY)

    async def _publish(self, batch: list[_Item]) -> list[_Item]:
        """Publish a batch; return the entries whose storage was not acknowledged.

        Acknowledgements come back on one wildcard inbox and are matched by a counter in
        the reply subject: per line, two writes to the socket and one small callback, where
        the client library's async publish adds a task and a JSON parse per line.
        """
        assert self._nc is not None
        if self._ack_prefix is None:
            self._ack_prefix = self._nc.new_inbox()
            await self._nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)
        self._awaiting = {}
        self._failed = []
        self._all_acked.clear()
        try:
            for item in batch:
                run_id, body, headers = item
                self._sequence += 1
                token = str(self._sequence)
                self._awaiting[token] = item
                await self._nc.publish(
                    protocol.live_log_subject(run_id, self.driver), body, headers=headers
                )
                await self._nc.publish(
                    protocol.log_subject(run_id),
                    body,
                    reply=f"{self._ack_prefix}.{token}",
                    headers=headers,
                )
        except Exception:
            self._awaiting = {}
            return batch
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_acked.wait(), _ACK_TIMEOUT)
        failed = self._failed + list(self._awaiting.values())
        self._awaiting = {}
        return failed

    async def _on_ack(self, msg: Msg) -> None:
        item = self._awaiting.pop(msg.subject.rpartition(".")[2], None)
        if item is None:
            return
        # A PubAck names the stream; an error, or "no responders" (no stream), does not.
        if msg.data.startswith(b'{"stream"') or (
            b'"seq"' in msg.data and b'"error"' not in msg.data
        ):
            self.sent += 1
        else:
            self._failed.append(item)
        if not self._awaiting:
            self._all_acked.set()
