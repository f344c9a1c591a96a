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

Failures come in two kinds. Weather (no connection, no acknowledgement in time, no
responders while JetStream elects a leader, a 5xx from the stream) leaves the entries
queued, and they are tried again until they are stored or the sink closes. A refusal that
no retry can change (a 4xx from the stream, such as a message above its ``max_msg_size``,
or an entry the client cannot send) drops that entry alone: it is counted as dropped and
warned about once per kind on the console logger, never through the chain this sink is a
part of, and the entries behind it go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import nats.errors
import orjson

from .. import protocol
from ..models import LogEntry, encode_log_entry
from ..telemetry import inject, span_context_from_ids
from .chain import build_logger, render_message, truncate_line
from .stdlib import silence_bridge

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

_BATCH = 256
_Item = tuple[str, bytes, dict[str, str] | None]
_ACK_TIMEOUT = 5.0
_RETRY_DELAY = 1.0
#: ``NATS/1.0\r\n`` before the headers and ``\r\n`` after them, as the client writes them.
_HEADER_FRAME = len(b"NATS/1.0\r\n") + len(b"\r\n")
#: Errors of ``publish`` that say the entry itself can never be sent.
_UNSENDABLE = (nats.errors.MaxPayloadError, nats.errors.BadSubjectError, nats.errors.BadHeaderError)


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
        console: FilteringBoundLogger | None = None,
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
        self._failed: set[str] = set()
        self._refused: dict[str, str] = {}
        self._in_flight: list[_Item] = []
        self._all_acked = asyncio.Event()
        self._closing = False
        self._console = (console or build_logger()).bind(sink="nats")
        self._warned: set[str] = set()

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        if "run_id" in event_dict:
            self._enqueue(dict(event_dict))
        return event_dict

    def _encode(self, event_dict: EventDict, max_payload: int) -> _Item | str:
        """Render an entry in the publisher task, off the handler's path.

        The result fits in ``max_payload`` with its headers; a string says why it cannot.
        """
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
        try:
            body = encode_log_entry(entry)
        except TypeError:  # lone surrogates (bytes decoded with surrogateescape): not UTF-8
            message = entry.message.encode("utf-8", "replace").decode()
            entry = attrs.evolve(entry, message=message)
            body = encode_log_entry(entry)
        limit = max_payload - _headers_size(headers)
        if len(body) > limit:
            fitted = _fit(entry, body, limit)
            if fitted is None:
                return f"an entry with an empty message is larger than max_payload {max_payload}"
            body = fitted
        return run_id, body, headers

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
        """Publish what is queued (within ``timeout``), then stop; a second call returns.

        What is still unpublished at the deadline (NATS away) is counted as dropped. The
        publisher is cancelled and awaited here, so its cancellation never surfaces in a
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
            self.dropped += len(self._in_flight) + len(self._queue)
            self._in_flight = []
            self._queue.clear()
            self._report()

    def _report(self) -> None:
        """Hand the counts since the last report to the metrics (once a batch, not a line)."""
        if self._on_lines is None:
            return
        for status, total in (("sent", self.sent), ("dropped", self.dropped)):
            if total > self._reported[status]:
                self._on_lines(status, total - self._reported[status])
                self._reported[status] = total

    def _drop(self, count: int, reason: str, kind: str) -> None:
        """Count entries that no retry can deliver; warn once per kind of refusal."""
        self.dropped += count
        if kind in self._warned:
            return
        self._warned.add(kind)
        self._console.warning(
            "nats refused log lines; dropping such lines (warned once)",
            lines=count,
            reason=reason,
        )

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
            self._in_flight = retry or self._take_batch()
            retry = await self._publish(self._in_flight) if self._in_flight else []
            self._in_flight = retry
            if retry:
                if self._closing and self._nc is not None and self._nc.is_closed:
                    self.dropped += len(retry) + len(self._queue)
                    self._queue.clear()
                    self._in_flight = []
                    return
                await asyncio.sleep(_RETRY_DELAY)

    def _take_batch(self) -> list[_Item]:
        assert self._nc is not None
        max_payload = self._nc.max_payload
        batch: list[_Item] = []
        for _ in range(min(_BATCH, len(self._queue))):
            event_dict = self._queue.popleft()
            try:
                item = self._encode(event_dict, max_payload)
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

        Acknowledgements come back on one wildcard inbox and are matched by a counter in
        the reply subject: per line, two writes to the socket and one small callback, where
        the client library's async publish adds a task and a JSON parse per line. Entries
        refused for good are dropped here; only weather sends an entry back.
        """
        assert self._nc is not None
        if self._ack_prefix is None:
            self._ack_prefix = self._nc.new_inbox()
            await self._nc.subscribe(f"{self._ack_prefix}.*", cb=self._on_ack)
        self._awaiting = {}
        self._failed = set()
        self._refused = {}
        self._all_acked.clear()
        published: list[tuple[str, _Item]] = []
        unsent: list[_Item] = []
        unsendable: list[str] = []
        for index, item in enumerate(batch):
            run_id, body, headers = item
            self._sequence += 1
            token = str(self._sequence)
            self._awaiting[token] = item
            try:
                await self._nc.publish(
                    protocol.live_log_subject(run_id, self.driver), body, headers=headers
                )
                await self._nc.publish(
                    protocol.log_subject(run_id),
                    body,
                    reply=f"{self._ack_prefix}.{token}",
                    headers=headers,
                )
            except _UNSENDABLE as exc:
                del self._awaiting[token]
                unsendable.append(f"{type(exc).__name__}: {exc}")
                continue
            except Exception:  # the connection: this entry and those after it wait
                del self._awaiting[token]
                unsent = batch[index:]
                break
            published.append((token, item))
        if self._awaiting:
            # Set early if every ack so far came in while the loop was still publishing.
            self._all_acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_acked.wait(), _ACK_TIMEOUT)
        if unsendable:
            self._drop(len(unsendable), unsendable[0], "unsendable")
        if self._refused:
            reason = next(iter(self._refused.values()))
            self._drop(len(self._refused), reason, f"stream: {reason}")
        retry = [
            item for token, item in published if token in self._failed or token in self._awaiting
        ]
        self._awaiting = {}
        return retry + unsent

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        if self._awaiting.pop(token, None) is None:
            return
        # A PubAck names the stream first; an error, or "no responders" (no stream), does not.
        if msg.data.startswith(b'{"stream"') or (
            b'"seq"' in msg.data and b'"error"' not in msg.data
        ):
            self.sent += 1
        else:
            refusal = _refusal(msg.data)
            if refusal is None:
                self._failed.add(token)
            else:
                self._refused[token] = refusal
        if not self._awaiting:
            self._all_acked.set()


def _refusal(data: bytes) -> str | None:
    """The stream's reason when its answer is a refusal for good (4xx); None for weather.

    No responders (an empty 503), 5xx errors (storage, cluster) and anything unreadable
    are weather: they may pass, so the entry is tried again.
    """
    with contextlib.suppress(orjson.JSONDecodeError):
        answer: Any = orjson.loads(data)
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict):
            code = error.get("code")
            if isinstance(code, int) and 400 <= code < 500:
                return f"{code} {error.get('description', '')}".strip()
    return None


def _headers_size(headers: dict[str, str] | None) -> int:
    """The bytes the client writes for ``headers``: NATS counts them in ``max_payload``."""
    if not headers:
        return 0
    return _HEADER_FRAME + sum(
        len(key.strip().encode()) + len(value.strip().encode()) + 4  # ": " and "\r\n"
        for key, value in headers.items()
    )


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
