"""The one acked JetStream publisher: send, then wait for the stream's PubAck.

Results, run log lines (and later the run ledger) are stored by JetStream, and a publish
counts only once the stream answers. One :class:`Publisher` per connection holds one
wildcard reply subscription; each publish gets a reply subject with a counter token, and
the answer is matched by that subject. ``JetStreamContext.publish`` would add an event-loop
turn (``wait_for``), a random token and a dataclass decode per publish; a result publish is
on every message's critical path, and the log sink sends hundreds back to back.

Every answer is read one way (:func:`answer_error`), and every failure is classed one way
(:func:`is_permanent`): a refusal no retry can change (a 4xx from the stream, an entry
larger than ``max_payload`` headers included, a subject or header the client will not send)
against weather (no responders while a stream elects a leader, a 5xx, no answer in time, a
connection away), which callers retry with a capped :class:`Backoff`.

No acked publish is handed to a client that is disconnected (``ConnectionReconnectingError``,
weather): nats-py would keep it and send it after the reconnect, however late, while its
caller, the answer timed out, has tried again or moved on. A late copy of a result could
be stored after the stream's de-duplication window, a late ledger write land on top of
its retry, a late log line be stored twice. A confirmation (:meth:`Publisher.confirm`) is
still handed over: a JetStream ack that arrives late still saves a redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import orjson
from nats.errors import (
    BadHeaderError,
    BadSubjectError,
    ConnectionReconnectingError,
    MaxPayloadError,
)
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServerError,
    ServiceUnavailableError,
)

from .. import protocol
from .connection import DriverClient

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

#: How long a publish waits for its PubAck before it counts as weather.
DEFAULT_TIMEOUT = 5.0
#: How often the sweeper forgets answered publishes (see :meth:`Publisher._sweep`).
_SWEEP_EVERY = 0.5
#: ``NATS/1.0\r\n`` before the headers and ``\r\n`` after them, as the client writes them.
_HEADER_FRAME = len(b"NATS/1.0\r\n") + len(b"\r\n")
#: A PubAck as nats-server writes it; an error answer starts with ``{"error"``.
_PUBACK_START = b'{"stream"'
_API_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError,
    404: NotFoundError,
    500: ServerError,
    503: ServiceUnavailableError,
}
#: Errors raised before anything is sent, for an entry the client can never send.
_UNSENDABLE = (MaxPayloadError, BadSubjectError, BadHeaderError)


@attrs.frozen
class Backoff:
    """Capped exponential delays between tries: weather usually passes in seconds."""

    first: float = 0.1
    cap: float = 5.0

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay
            delay = min(delay * 2, self.cap)


#: Results wait out an election: tried again and again, at most this far apart.
DEFAULT_BACKOFF = Backoff(first=0.1, cap=5.0)


def answer_error(data: bytes, headers: dict[str, str] | None = None) -> NatsError | None:
    """None when an answer is a PubAck; otherwise the error it reports, not raised.

    A PubAck is recognised by its first bytes, without a JSON decode: nats-server writes the
    error first when there is one. Anything else is decoded: a JetStream error becomes the
    client library's :class:`~nats.js.errors.APIError` subclass for its code, an empty
    answer with status 503 is :class:`~nats.js.errors.NoStreamResponseError` (no stream
    takes the subject, or none has a leader yet), and an answer that cannot be read is an
    ``APIError`` without a code (weather: it is tried again).
    """
    if data.startswith(_PUBACK_START):
        return None
    if not data:
        if headers and headers.get(protocol.STATUS_HEADER) == protocol.STATUS_NO_RESPONDERS:
            return NoStreamResponseError()
        return APIError(description="an empty answer")
    try:
        answer: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return APIError(description=f"an unreadable answer: {data[:200]!r}")
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        kind = _API_ERRORS.get(code, APIError) if isinstance(code, int) else APIError
        return kind(
            code=code if isinstance(code, int) else None,
            err_code=error.get("err_code"),
            description=error.get("description"),
        )
    if isinstance(answer, dict) and "stream" in answer and "seq" in answer:
        return None
    return APIError(description=f"an unreadable answer: {data[:200]!r}")


def is_permanent(error: BaseException) -> bool:
    """Whether no retry can change ``error``: the entry is refused for good, not delayed.

    4xx answers (a message above the stream's ``max_msg_size``, a failed expectation) and
    entries the client cannot send are permanent. No responders, 5xx, timeouts, unreadable
    answers and connection trouble are weather.
    """
    if isinstance(error, _UNSENDABLE):
        return True
    if isinstance(error, APIError):
        code = error.code
        return isinstance(code, int) and 400 <= code < 500
    return False


def describe(error: BaseException) -> str:
    """``error`` in a few words for a log line: a stream's code and description, or its text."""
    if isinstance(error, APIError) and error.code is not None:
        return f"{error.code} {error.description or ''}".strip()
    return str(error) or type(error).__name__


def headers_size(headers: dict[str, str] | None) -> int:
    """The bytes the client writes for ``headers``: NATS counts them in ``max_payload``."""
    if not headers:
        return 0
    size = _HEADER_FRAME
    for key, value in headers.items():
        key, value = key.strip(), value.strip()
        # ": " and "\r\n"; a character is a byte unless the text is not ASCII.
        size += 4 + (len(key) if key.isascii() else len(key.encode()))
        size += len(value) if value.isascii() else len(value.encode())
    return size


class Publisher:
    """Acked JetStream publishes on one connection, for every part of the driver.

    The reply subscription is made on first use (or by :meth:`start`) and lives as long as
    the connection; draining the connection ends it. Answers that come after their publish
    gave up are ignored.
    """

    def __init__(self, nc: Client, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.nc = nc
        #: Applies to publishes made after it is changed.
        self.timeout = timeout
        self._prefix = ""
        self._sent = 0
        self._sub: Subscription | None = None
        self._waiting: dict[str, asyncio.Future[bytes] | AckBatch | _Unconfirmed] = {}
        #: (deadline, reply) in the order sent, one queue per wait (so each stays in
        #: deadline order): one sweeper task times them all out, where a timer per
        #: publish would cost more than the rest of the publish.
        self._deadlines: dict[float, deque[tuple[float, str]]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    #: The one judgement of failures, on the object that sinks are handed (``logs`` sits
    #: below ``runtime`` and imports nothing from it).
    is_permanent = staticmethod(is_permanent)
    describe = staticmethod(describe)

    @property
    def max_payload(self) -> int:
        """The largest message the connected server takes, headers included."""
        return self.nc.max_payload

    def room(self, headers: dict[str, str] | None) -> int:
        """The largest body that fits in one message with ``headers``."""
        return self.nc.max_payload - headers_size(headers)

    async def start(self) -> None:
        """Subscribe to the replies, once; a publish does it when nobody did before.

        The client writes the subscription before its first suspension, so a publish that
        finds the prefix set already goes out behind it.
        """
        if self._prefix:
            return
        self._prefix = self.nc.new_inbox() + "."
        try:
            self._sub = await self.nc.subscribe(self._prefix + "*", cb=self._on_answer)
        except BaseException:
            self._prefix = ""
            raise
        if isinstance(self.nc, DriverClient):
            self.nc.read_directly(self._sub._id, self._on_plain_answer)

    async def close(self) -> None:
        """Stop listening; publishes still waiting time out."""
        sub, self._sub = self._sub, None
        self._prefix = ""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
        if sub is not None:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    def check_size(self, body: bytes, headers: dict[str, str] | None) -> None:
        """Raise ``MaxPayloadError`` for a message the server would refuse, headers counted.

        The client library checks the body alone; the server counts headers and body
        together and closes the connection of a client that sends more.
        """
        limit = self.nc.max_payload
        if len(body) > limit or (headers and len(body) + headers_size(headers) > limit):
            raise MaxPayloadError

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        """Publish, and return once the stream has stored it; raise what stops it.

        Raises the error of :func:`answer_error`, ``MaxPayloadError`` (before sending), the
        client's own errors, or ``nats.errors.TimeoutError`` when no answer came in time.
        """
        await self._request(subject, body, headers)

    async def store(self, subject: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        """:meth:`publish`, returning the stream sequence the message got (a key-value
        entry's revision), for writes that build on it."""
        answer = await self._request(subject, body, headers)
        return int(orjson.loads(answer)["seq"])

    async def _request(self, subject: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        """The PubAck's body; its error raised."""
        self._check_connected()
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        reply = await self._reply()
        await self._send(subject, body, headers, reply, answer, self.timeout)
        try:
            return await answer
        finally:
            self._waiting.pop(reply, None)

    async def publish_until_stored(
        self,
        subject: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        backoff: Backoff = DEFAULT_BACKOFF,
        on_weather: Callable[[int, Exception], object] | None = None,
        still_wanted: Callable[[], Awaitable[bool]] | None = None,
    ) -> int | None:
        """Publish until the stream has it, however long weather lasts; return the tries.

        ``on_weather`` hears each failed try (its number and error) before the pause.
        ``still_wanted`` is asked before every try after the first: False ends the wait
        with nothing more sent, and None is returned. A permanent refusal
        (:func:`is_permanent`) is raised; cancelling ends the wait.
        """
        delays = backoff.delays()
        tries = 0
        while True:
            tries += 1
            if tries > 1 and still_wanted is not None and not await still_wanted():
                return None
            try:
                await self.publish(subject, body, headers)
            except (NatsError, TimeoutError) as exc:
                if is_permanent(exc):
                    raise
                if on_weather is not None:
                    on_weather(tries, exc)
            else:
                return tries
            await asyncio.sleep(next(delays))

    def batch(self) -> AckBatch:
        """Publishes to send back to back and await together (see :class:`AckBatch`)."""
        return AckBatch(self)

    def _check_connected(self) -> None:
        """Raise ``ConnectionReconnectingError`` rather than hand an acked publish to a
        disconnected client (see the module)."""
        if not self.nc.is_connected:
            raise ConnectionReconnectingError

    async def _reply(self) -> str:
        """A reply subject of its own for the next publish (subscribing first if need be)."""
        if not self._prefix:
            await self.start()
        self._sent += 1
        return f"{self._prefix}{self._sent}"

    async def _send(
        self,
        subject: str,
        body: bytes,
        headers: dict[str, str] | None,
        reply: str,
        waiter: asyncio.Future[bytes] | AckBatch | _Unconfirmed,
        within: float | None,
    ) -> None:
        """Publish with ``reply``, ``waiter`` registered for the answer (and timed out by
        the sweeper after ``within`` seconds, unless None). A publish that cannot be sent
        leaves nothing registered."""
        self.check_size(body, headers)
        self._waiting[reply] = waiter
        if within is not None:
            self._expect(asyncio.get_running_loop(), reply, within)
        try:
            await self.nc.publish(subject, body, reply=reply, headers=headers)
        except BaseException:
            self._waiting.pop(reply, None)
            raise

    async def confirm(
        self, subject: str, body: bytes, within: float, on_missing: Callable[[], object]
    ) -> None:
        """Send ``body`` asking for an answer, and call ``on_missing`` if none comes ``within``
        seconds, or if the server answers that nobody took it (no responders); nothing is
        awaited beyond the send.

        For a message whose arrival matters but must not hold its sender up: a JetStream
        ack sent this way is answered once the consumer has applied it (replicated, on a
        cluster), so a lost ack is noticed instead of showing up as a redelivery.
        """
        await self._send(subject, body, None, await self._reply(), _Unconfirmed(on_missing), within)

    def _expect(self, loop: asyncio.AbstractEventLoop, reply: str, within: float) -> None:
        """Have the sweeper time out ``reply`` after ``within`` seconds."""
        queue = self._deadlines.get(within)
        if queue is None:
            queue = self._deadlines[within] = deque()
        queue.append((loop.time() + within, reply))
        if self._sweeper is None or self._sweeper.get_loop() is not loop:
            self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Fail the publishes whose answer is overdue; ends when none is waiting.

        Wakes at least every :data:`_SWEEP_EVERY` seconds to forget the answered ones, so
        the queue holds about that long's publishes, not ``timeout``'s.
        """
        loop = asyncio.get_running_loop()
        queues, waiting = self._deadlines, self._waiting
        try:
            while any(queues.values()):
                now = loop.time()
                wake = now + _SWEEP_EVERY
                for queue in queues.values():
                    while queue:
                        deadline, reply = queue[0]
                        waiter = waiting.get(reply)
                        if isinstance(waiter, AckBatch) or (
                            isinstance(waiter, asyncio.Future) and waiter.done()
                        ):
                            waiter = None
                        if waiter is not None and deadline > now:
                            wake = min(wake, deadline)
                            break
                        queue.popleft()
                        if waiter is None:
                            continue
                        del waiting[reply]
                        if isinstance(waiter, _Unconfirmed):
                            waiter.on_missing()
                        else:
                            waiter.set_exception(NatsTimeoutError())
                await asyncio.sleep(wake - now)
        finally:
            if self._sweeper is asyncio.current_task():
                self._sweeper = None

    async def _on_answer(self, msg: Msg) -> None:
        self._answered(msg.subject, msg.data, msg.headers)

    def _on_plain_answer(self, subject: bytes, reply: bytes, data: bytes) -> None:
        """An answer without headers, as the client reads it (:class:`DriverClient`)."""
        self._answered(subject.decode(), data, None)

    def _answered(self, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        waiter = self._waiting.pop(reply, None)
        if waiter is None:
            return
        if isinstance(waiter, _Unconfirmed):
            # An answer with a status came from the server, not from whoever should have
            # applied the message (503: nobody listens, as while a consumer elects its
            # leader): the message was not applied.
            if headers and headers.get(protocol.STATUS_HEADER):
                waiter.on_missing()
            return
        error = answer_error(data, headers)
        if isinstance(waiter, AckBatch):
            waiter._answered(reply, error)
        elif waiter.done():
            return
        elif error is None:
            waiter.set_result(data)
        else:
            waiter.set_exception(error)


class _Unconfirmed:
    """A :meth:`Publisher.confirm` still waiting for its answer (one per run: no attrs)."""

    __slots__ = ("on_missing",)

    def __init__(self, on_missing: Callable[[], object]) -> None:
        self.on_missing = on_missing


class AckBatch:
    """Acked publishes pipelined: send them all, then await every answer at once.

    Per publish, one dictionary entry and one small callback; no future or task. The
    answers come back in the order of the sends that succeeded.
    """

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._pending: dict[str, int] = {}
        self._answers: list[NatsError | None] = []
        self._all: asyncio.Future[None] | None = None

    async def send(self, subject: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Send one publish of the batch; raise what stops it from being sent.

        Errors for which :func:`is_permanent` holds concern this entry alone; any other
        (the connection) concerns the entries after it too.
        """
        publisher = self._publisher
        publisher._check_connected()
        reply = await publisher._reply()
        # Mapped before the send: the answer may be read while the send still waits.
        self._pending[reply] = len(self._answers)
        self._answers.append(None)
        try:
            await publisher._send(subject, body, headers, reply, self, None)
        except BaseException:
            del self._pending[reply]
            self._answers.pop()
            raise

    async def wait(self, timeout: float | None = None) -> list[NatsError | None]:
        """Every answer (None for a PubAck), waiting at most ``timeout`` for the last ones.

        A publish unanswered by then reads as ``nats.errors.TimeoutError`` (weather).
        """
        if self._pending:
            self._all = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._publisher.timeout if timeout is None else timeout):
                    await self._all
            waiting = self._publisher._waiting
            for reply, index in self._pending.items():
                waiting.pop(reply, None)
                self._answers[index] = NatsTimeoutError()
            self._pending.clear()
        return self._answers

    def _answered(self, reply: str, error: NatsError | None) -> None:
        index = self._pending.pop(reply)
        self._answers[index] = error
        if not self._pending and self._all is not None and not self._all.done():
            self._all.set_result(None)
