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
import threading
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..models import LogEntry, encode
from .chain import render_message
from .stdlib import silence_bridge

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from structlog.typing import EventDict, WrappedLogger

_BATCH = 256
_ACK_TIMEOUT = 5.0
_RETRY_DELAY = 1.0


class NatsLogSink:
    """A structlog processor that forwards every line bound to a run to NATS.

    Lines without a ``run_id`` (driver start-up, connection news) are not a run's and stay
    on the console. The queue is bounded: when NATS is away long enough to fill it, the
    oldest lines are dropped and counted rather than growing without limit.
    """

    def __init__(self, driver: str, *, max_queue: int = 100_000) -> None:
        self.driver = driver
        self.max_queue = max_queue
        self.sent = 0
        self.dropped = 0
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._closing = False

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        run_id = event_dict.get("run_id")
        if run_id is None:
            return event_dict
        entry = LogEntry(
            runid=str(run_id),
            driver=self.driver,
            pipeline=str(event_dict.get("pipeline") or ""),
            timestamp=str(event_dict.get("timestamp", "")),
            message=render_message(event_dict),
        )
        self._enqueue((str(run_id), encode(entry)))
        return event_dict

    def _enqueue(self, item: tuple[str, bytes]) -> None:
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
        self._js = nc.jetstream()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = asyncio.create_task(self._publish_forever(), name="nats-log-sink")
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

    async def _publish_forever(self) -> None:
        silence_bridge()
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
            failed = await self._publish(batch)
            if failed:
                self._queue.extendleft(reversed(failed))
                if self._closing and self._nc is not None and self._nc.is_closed:
                    self.dropped += len(self._queue)
                    self._queue.clear()
                    return
                await asyncio.sleep(_RETRY_DELAY)

    async def _publish(self, batch: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Publish a batch; return the entries whose storage was not acknowledged."""
        assert self._nc is not None and self._js is not None
        pending: list[tuple[tuple[str, bytes], asyncio.Future[Any]]] = []
        try:
            for item in batch:
                run_id, body = item
                await self._nc.publish(protocol.live_log_subject(run_id, self.driver), body)
                future = await self._js.publish_async(protocol.log_subject(run_id), body)
                pending.append((item, future))
        except Exception:
            for _, future in pending:
                future.cancel()
            return batch
        failed: list[tuple[str, bytes]] = []
        done, _ = await asyncio.wait([f for _, f in pending], timeout=_ACK_TIMEOUT)
        for item, future in pending:
            if future in done and not future.cancelled() and future.exception() is None:
                self.sent += 1
            else:
                future.cancel()
                failed.append(item)
        return failed
