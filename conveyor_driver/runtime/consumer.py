"""The pull loop: fetch only for free handler slots, keep long runs alive, settle each one.

Flow control is by pulling. An instance asks JetStream for at most as many messages as it
has free slots, so it never holds a message it cannot start: several processes of one
driver share the consumer's work, and no message waits in a local buffer while its
``ack_wait`` runs out. Pull requests carry an expiry and ask for idle heartbeats, so a lost
request (a reconnect, a server restart) is noticed and replaced instead of leaving the
driver silently idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import attrs
import orjson
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError
from structlog.typing import FilteringBoundLogger

from .. import protocol
from ..models import DriverMessage, encode_result
from ..outcomes import Action, Outcome, Result
from ..telemetry import inject
from .dispatcher import Delivery, Processed, Services, process

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.subscription import Subscription

    from ..app import Driver
    from .ledger import RunLedger

#: How long one pull request waits on the server for messages before it expires.
PULL_EXPIRES = 30.0
#: The server sends a heartbeat when a pull request has been idle this long.
PULL_HEARTBEAT = 5.0
#: A pull that heard nothing (no message, no heartbeat) for this long is presumed lost.
PULL_SILENCE = 3 * PULL_HEARTBEAT
_PULL_EXPIRES_NS = int(PULL_EXPIRES * 1e9)
_PULL_HEARTBEAT_NS = int(PULL_HEARTBEAT * 1e9)
_PUBLISH_TIMEOUT = 5.0
#: Result publishes are retried for as long as the run is kept alive, this far apart at most.
_PUBLISH_MAX_DELAY = 5.0
#: How long a stopping consumer waits for handed-back runs to record and nak.
_HANDBACK_TIMEOUT = 15.0
_NO_RESPONDERS = "503"
#: JetStream's "message size exceeds maximum allowed" (a stream's max_msg_size).
_TOO_LARGE = 10054


async def ensure_consumer(nc: Client, driver: Driver) -> None:
    """Create or update the driver's durable consumer; its config is the driver's, not ours.

    Errors are the client library's: :func:`.startup.until_ready` tells weather from a
    configuration mistake.
    """
    config = protocol.consumer_config(driver.name, driver.resource_types, driver.ack_wait)
    await nc.jetstream().add_consumer(protocol.MESSAGES_STREAM, config)


def ensuring_what(driver: Driver) -> str:
    """How start-up errors name the consumer step."""
    return f"create consumer {driver.name!r} on stream {protocol.MESSAGES_STREAM!r}"


class Consumer:
    """Consumes the driver's durable pull consumer until :meth:`stop`."""

    def __init__(
        self,
        nc: Client,
        driver: Driver,
        services: Services,
        *,
        concurrency: int,
        log: FilteringBoundLogger,
        ledger: RunLedger | None = None,
    ) -> None:
        self._nc = nc
        self._ledger = ledger
        self._js = nc.jetstream()
        self._driver = driver
        self._services = services
        self._log = log
        self.concurrency = concurrency
        self._threshold = max(1, concurrency // 2)
        self._running: dict[asyncio.Task[None], Msg] = {}
        self._touched: dict[asyncio.Task[None], float] = {}
        self._requested = 0
        self._stopping = False
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._inbox = ""
        self._acks_sub: Subscription | None = None
        self._acks_prefix = ""
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._acks_sent = 0
        self._pull_subject = protocol.pull_request_subject(protocol.MESSAGES_STREAM, driver.name)
        self._tasks: list[asyncio.Task[None]] = []
        self._bounced: set[asyncio.Task[None]] = set()
        self.last_activity = time.monotonic()
        self.last_loop = time.monotonic()
        self.handled = 0

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def ensure(self) -> None:
        await ensure_consumer(self._nc, self._driver)

    async def start(self) -> None:
        self._acks_prefix = self._nc.new_inbox()
        self._acks_sub = await self._nc.subscribe(f"{self._acks_prefix}.*", cb=self._on_puback)
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        self._tasks = [
            asyncio.create_task(self._pull_forever(), name="pull"),
            asyncio.create_task(self._keep_alive(), name="in-progress"),
        ]
        self._wake.set()

    def describe(self, task: asyncio.Task[object] | None) -> dict[str, object]:
        """Which run ``task`` is, for the loop watchdog (called from its thread: reads only)."""
        msg = self._running.get(task) if task is not None else None  # type: ignore[arg-type]
        if msg is None:
            return {"task": task.get_name()} if task is not None else {}
        found: dict[str, object] = {"subject": msg.subject}
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            body = orjson.loads(msg.data)
            found["run_id"] = body["run_id"]
            payload = body["payload"]
            payload = orjson.loads(payload) if isinstance(payload, str) else payload
            route = self._driver.route_for(str(payload.get("resource")), str(body["event"]))
            if route is not None:
                found["handler"] = route.name
        return found

    def connection_restored(self) -> None:
        """Pull requests do not survive a reconnect: forget them and ask again."""
        self._requested = 0
        self._wake.set()

    async def stop(self, grace_period: float) -> None:
        """Stop pulling; let running handlers finish within ``grace_period``; hand back the rest.

        The pull inbox goes first: JetStream drops the pull requests still open on it, so
        a handed-back run cannot be delivered straight back into this closing process (each
        such bounce would be one more delivery). Hand-backs are recorded in the run ledger,
        so they never count as attempts.
        """
        self._stopping = True
        self._wake.set()
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
                await self._nc.flush(timeout=2)
            self._sub = None
        running = list(self._running)
        if running:
            self._log.info("waiting for running handlers", count=len(running), grace=grace_period)
            _, unfinished = await asyncio.wait(running, timeout=grace_period)
            for task in unfinished:
                task.cancel()
            if unfinished:
                self._log.warning(
                    "grace period over: unfinished runs handed back", count=len(unfinished)
                )
                await asyncio.wait(unfinished, timeout=_HANDBACK_TIMEOUT)
        if self._bounced:
            await asyncio.wait(self._bounced, timeout=_HANDBACK_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._acks_sub is not None:
            with contextlib.suppress(NatsError):
                await self._acks_sub.unsubscribe()
            self._acks_sub = None

    async def _pull_forever(self) -> None:
        """Watch over pulling: ask again after a reconnect, a refusal or a silent request.

        Finished runs ask for more themselves (see :meth:`_pull`); this loop wakes at least
        every heartbeat, which is also what ``/healthz`` watches.
        """
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PULL_HEARTBEAT):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            now = self.last_loop = time.monotonic()
            if self._requested and now - self.last_activity > PULL_SILENCE:
                self._log.warning(
                    "pull request went silent; asking again", requested=self._requested
                )
                self._requested = 0
            if not self._requested:
                self.last_activity = now
            if not await self._pull():
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _pull(self) -> bool:
        """Ask for as many messages as there are free slots not yet asked for.

        Called by a run right after it settled, so the pull request leaves in the same
        socket write as the ack. Small gaps wait until they are worth a request, unless
        nothing at all is asked for. Returns False when the request could not be sent.
        """
        want = self.concurrency - len(self._running) - self._requested
        if self._stopping or want <= 0 or (want < self._threshold and self._requested):
            return True
        self._requested += want
        request = {
            "batch": want,
            "expires": _PULL_EXPIRES_NS,
            "idle_heartbeat": _PULL_HEARTBEAT_NS,
        }
        try:
            await self._nc.publish(self._pull_subject, orjson.dumps(request), reply=self._inbox)
        except NatsError as exc:
            self._requested -= want
            self._log.debug("pull request not sent", error=str(exc))
            return False
        return True

    async def _on_message(self, msg: Msg) -> None:
        self.last_activity = now = time.monotonic()
        headers = msg.headers
        if headers and protocol.STATUS_HEADER in headers and not msg.data:
            await self._on_status(headers)
            return
        self._requested = max(self._requested - 1, 0)
        if self._stopping or len(self._running) >= self.concurrency:
            # Not expected (see stop and _pull), but if it happens it is not an attempt.
            bounce = asyncio.create_task(self._hand_back(msg))
            self._bounced.add(bounce)
            bounce.add_done_callback(self._bounced.discard)
            return
        task = asyncio.create_task(self._handle(msg))
        self._running[task] = msg
        self._touched[task] = now

    async def _on_status(self, headers: dict[str, str]) -> None:
        status = headers.get(protocol.STATUS_HEADER, "")
        if status == protocol.STATUS_IDLE_HEARTBEAT:
            return
        if status in (protocol.STATUS_REQUEST_TIMEOUT, protocol.STATUS_NO_MESSAGES):
            pending = headers.get(protocol.PENDING_MESSAGES_HEADER)
            expired = int(pending) if pending and pending.isdigit() else self._requested
            self._requested = max(self._requested - expired, 0)
            self._wake.set()
            return
        description = headers.get(protocol.DESCRIPTION_HEADER, "")
        self._log.warning("pull request refused", status=status, description=description)
        self._requested = 0
        if "deleted" in description.lower():
            self._tasks.append(asyncio.create_task(self._recreate()))
        else:
            asyncio.get_running_loop().call_later(1.0, self._wake.set)

    async def _recreate(self) -> None:
        """The consumer was deleted under us: put it back rather than idle silently."""
        try:
            await self.ensure()
            self._log.warning("consumer was deleted; recreated it", consumer=self._driver.name)
        except Exception as exc:
            self._log.error("consumer was deleted and could not be recreated", error=str(exc))
        await asyncio.sleep(1.0)
        self._wake.set()

    async def _handle(self, msg: Msg) -> None:
        try:
            delivered, stream_sequence = protocol.parse_ack_subject(msg.reply)
            delivery = Delivery(msg.data, msg.subject, delivered, msg.headers)
            if delivered > 1 and self._ledger is not None:
                delivery = await self._from_ledger(delivery, stream_sequence)
            processed = await process(self._driver, delivery, self._services)
            if processed.error and processed.message is not None and self._ledger is not None:
                await self._ledger.record_error(
                    stream_sequence, processed.message.run_id, delivery.attempt, processed.error
                )
            await self._settle(msg, processed, stream_sequence)
        except asyncio.CancelledError:
            await self._hand_back(msg)
        except Exception:
            self._log.exception("message could not be settled; it will be redelivered")
            await _quietly(msg.nak(delay=1.0))
        finally:
            self.handled += 1
            task = asyncio.current_task()
            self._running.pop(task, None)  # type: ignore[arg-type]
            self._touched.pop(task, None)  # type: ignore[arg-type]
            if not await self._pull():
                self._wake.set()

    async def _from_ledger(self, delivery: Delivery, stream_sequence: int) -> Delivery:
        """A redelivery: its real attempt and the errors of the attempts before it."""
        assert self._ledger is not None
        run_id = _run_id_of(delivery.data)
        if run_id is None:  # undecodable: the dispatcher terminates it, whatever the count
            return delivery
        record = await self._ledger.read(stream_sequence, run_id)
        attempt = record.attempt(delivery.attempt)
        return attrs.evolve(delivery, attempt=attempt, earlier=record.earlier(attempt))

    async def _hand_back(self, msg: Msg) -> None:
        """Give a run back unfinished (shutdown): recorded first, so it is not an attempt."""
        if self._ledger is not None:
            run_id = _run_id_of(msg.data)
            if run_id is not None:
                _, stream_sequence = protocol.parse_ack_subject(msg.reply)
                await self._ledger.count_handback(stream_sequence, run_id)
        await _quietly(msg.nak())
        self._log.info("run handed back for redelivery", subject=msg.subject)

    async def _settle(self, msg: Msg, processed: Processed, stream_sequence: int) -> None:
        """Publish the result (and await its PubAck), and only then ack, nak or term."""
        outcome: Outcome = processed.outcome
        message = processed.message
        result = outcome.result
        if result is not None and message is not None:
            headers = {
                protocol.MSG_ID_HEADER: protocol.result_message_id(
                    self._driver.name, stream_sequence
                )
            }
            inject(headers, processed.span_context)
            body = self._fitting_result(message, result, headers)
            await self._publish_result(body, headers, message.run_id)
        if outcome.action is Action.ACK:
            await msg.ack()
        elif outcome.action is Action.TERM:
            await msg.term()
        else:
            await msg.nak(delay=outcome.delay)

    def _fitting_result(
        self, message: DriverMessage, result: Result, headers: dict[str, str]
    ) -> bytes:
        """The result event, or a failure naming the limit when it exceeds ``max_payload``.

        A result the server cannot take will never fit, however often it is retried or the
        handler re-run: that is a permanent outcome, reported once and acked.
        """
        body = self._encode_result(message, result)
        limit = self._nc.max_payload
        if len(body) + _headers_size(headers) <= limit:
            return body
        data_size = len(orjson.dumps(result.data))
        message_size = len(result.message.encode())
        what, size = ("data", data_size) if data_size >= message_size else ("message", message_size)
        text = (
            f"result {what} is {_megabytes(size)}; "
            f"the NATS server accepts at most {_megabytes(limit)}"
        )
        self._log.error(
            "result too large to publish; reporting a failure", run_id=message.run_id, error=text
        )
        return self._encode_result(message, Result.fail(text))

    def _encode_result(self, message: DriverMessage, result: Result) -> bytes:
        return encode_result(
            message.run_id,
            message.payload,
            result.success,
            result.message,
            result.data,
            self._driver.name,
        )

    async def _publish_result(self, body: bytes, headers: dict[str, str], run_id: str) -> None:
        """Publish until the stream has it, however long an election takes.

        The run stays alive meanwhile (in-progress acks go on), and the de-duplication
        header makes a repeat harmless: a finished build is never re-run only because its
        result could not be stored for a while. A graceful shutdown still ends the wait
        (the run is handed back).
        """
        delay = 0.1
        tries = 0
        while True:
            tries += 1
            try:
                await self._publish_acked(protocol.RESULT_SUBJECT, body, headers)
            except (MaxPayloadError, APIError) as exc:
                if isinstance(exc, MaxPayloadError) or exc.err_code == _TOO_LARGE:
                    self._log.error(
                        "result refused as too large; the run is settled without it",
                        run_id=run_id,
                        size=len(body),
                    )
                    return
                failure: Exception = exc
            except (NatsError, TimeoutError) as exc:
                failure = exc
            else:
                if tries > 1:
                    self._log.info("result published", run_id=run_id, tries=tries)
                return
            if tries == 1 or tries % 10 == 0:
                self._log.warning(
                    "result not stored yet; retrying",
                    run_id=run_id,
                    tries=tries,
                    error=str(failure) or type(failure).__name__,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _PUBLISH_MAX_DELAY)

    async def _publish_acked(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """A JetStream publish: send, then wait for the stream's PubAck or raise.

        What ``JetStreamContext.publish`` does, on this consumer's own reply subscription:
        that one answers through ``wait_for`` (an extra event-loop turn), draws a random
        token per request and decodes the PubAck into a dataclass. At concurrency 1 every
        message waits for that, so it was a good part of the per-message cost.
        """
        self._acks_sent += 1
        reply = f"{self._acks_prefix}.{self._acks_sent}"
        answer: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._acks[reply] = answer
        try:
            await self._nc.publish(subject, body, reply=reply, headers=headers)
            async with asyncio.timeout(_PUBLISH_TIMEOUT):
                msg = await answer
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            self._acks.pop(reply, None)
        if msg.headers and msg.headers.get(protocol.STATUS_HEADER) == _NO_RESPONDERS:
            raise NoStreamResponseError
        response = orjson.loads(msg.data)
        if "error" in response:
            raise APIError.from_error(response["error"])

    async def _on_puback(self, msg: Msg) -> None:
        answer = self._acks.pop(msg.subject, None)
        if answer is not None and not answer.done():
            answer.set_result(msg)

    async def _keep_alive(self) -> None:
        """Tell JetStream that long runs are still alive, well inside ``ack_wait``."""
        period = self._driver.ack_wait / 3
        while True:
            await asyncio.sleep(min(period / 2, 5.0))
            now = time.monotonic()
            for task, touched in list(self._touched.items()):
                msg = self._running.get(task)
                if msg is not None and now - touched >= period and not msg.is_acked:
                    self._touched[task] = now
                    await _quietly(msg.in_progress())


def _run_id_of(data: bytes) -> str | None:
    """The run id of a message body, read without the full decode (ledger paths only)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    run_id = body.get("run_id") if isinstance(body, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def _headers_size(headers: dict[str, str]) -> int:
    """Bytes the headers add to a message; the server counts them against max_payload."""
    return len("NATS/1.0\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items())


def _megabytes(size: int) -> str:
    return f"{size / 1_048_576:.1f} MB"


async def _quietly(action: object) -> None:
    """Settle a message where failing to is harmless (JetStream redelivers after ack_wait)."""
    try:
        await action  # type: ignore[misc]
    except Exception:
        return
