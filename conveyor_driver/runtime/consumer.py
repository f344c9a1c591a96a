"""The pull loop: fetch only for free handler slots, keep long runs alive, settle each one.

A message's journey reads from :meth:`Consumer._handle`, one call per step: the run ledger
(which attempt is this?), the dispatcher, the ledger again (keep a failure), the result
publish, then the ack; the steps around the handler live in :mod:`.settlement`.

Flow control is by pulling. An instance asks JetStream for at most as many messages as it
has free slots, so it never holds a message it cannot start: several processes of one
driver share the consumer's work, and no message waits in a local buffer while its
``ack_wait`` runs out. Pull requests carry an expiry and ask for idle heartbeats, so a lost
request (a reconnect, a server restart) is noticed and replaced instead of leaving the
driver silently idle. With ``max_runs`` the runs left bound the pulls as well (see
docs/protocol.md#one-shot-and-draining-modes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import orjson
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from structlog.typing import FilteringBoundLogger

from .. import protocol
from .connection import DriverClient
from .dispatcher import Services, process
from .ledger import Fenced
from .lifetime import RunBudget
from .publisher import Publisher
from .settlement import Admission, Settlement, quietly

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
#: How long a stopping consumer waits for handed-back runs to record and nak.
_HANDBACK_TIMEOUT = 15.0
#: A gone consumer is created again this often at the slowest.
_RECREATE_MAX_DELAY = 10.0
#: The status of a pull nobody answers: the consumer (or JetStream) is not there.
_NO_RESPONDERS = "503"


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
    """Consumes the driver's durable pull consumer until :meth:`stop`.

    Results go out through ``publisher``, the connection's shared one; without it the
    consumer makes (and closes) one of its own. ``max_runs`` (with ``concurrency`` at most
    that) ends the consumer's work: see :attr:`budget`.
    """

    def __init__(
        self,
        nc: Client,
        driver: Driver,
        services: Services,
        *,
        concurrency: int,
        log: FilteringBoundLogger,
        ledger: RunLedger | None = None,
        publisher: Publisher | None = None,
        max_runs: int | None = None,
    ) -> None:
        self._nc = nc
        self._own_publisher = publisher is None
        self._publisher = publisher or Publisher(nc)
        self._settlement = Settlement(
            self._publisher, driver.name, log, ledger, ack_wait=driver.ack_wait
        )
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
        self._pull_subject = protocol.pull_request_subject(protocol.MESSAGES_STREAM, driver.name)
        self._tasks: list[asyncio.Task[None]] = []
        self._recreating: asyncio.Task[None] | None = None
        #: What the ledger knows of each running delivery (its lease), and the runs another
        #: instance took over, which stop without being handed back.
        self._admissions: dict[asyncio.Task[Any], Admission] = {}
        self._fenced: set[asyncio.Task[Any]] = set()
        self._bounced: set[asyncio.Task[None]] = set()
        self.last_activity = time.monotonic()
        self.last_loop = time.monotonic()
        self.handled = 0
        #: Counts the deliveries the dispatcher decided: what ``max_runs`` limits.
        self.budget = RunBudget(max_runs)
        self._last_busy = time.monotonic()
        #: Set when open pull requests are forgotten: the next one goes to a fresh inbox.
        self._stale_inbox = False

    async def ensure(self) -> None:
        await ensure_consumer(self._nc, self._driver)

    async def start(self) -> None:
        await self._publisher.start()
        self._inbox = self._nc.new_inbox()
        self._sub = await self._subscribe()
        self._last_busy = time.monotonic()
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
        """A reconnect loses pull requests, or the server keeps them: ask again, anew."""
        self._forget_requests()
        self._wake.set()

    def idle_for(self) -> float:
        """Seconds since a message was last delivered or a run last ended; 0 while busy."""
        if self._running or self._bounced:
            return 0.0
        return time.monotonic() - self._last_busy

    def _forget_requests(self) -> None:
        """Count no pull request open, and ask again on a fresh inbox.

        One the server still holds (it outlives a reconnect, and a silence may be the
        network's) must not deliver on top of the new ones: JetStream drops a waiting pull
        whose reply subject nobody listens to, so its messages go to other instances.
        """
        self._requested = 0
        self._stale_inbox = True

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
        if self._own_publisher:
            await self._publisher.close()

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
                self._forget_requests()
                # A pull to a consumer that is gone gets no answer at all: look.
                self._check_consumer()
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
        want = min(want, self.budget.left(len(self._running) + self._requested))
        if self._stopping or want <= 0 or (want < self._threshold and self._requested):
            return True
        self._requested += want
        request = {
            "batch": want,
            "expires": _PULL_EXPIRES_NS,
            "idle_heartbeat": _PULL_HEARTBEAT_NS,
        }
        try:
            if self._stale_inbox:
                await self._new_inbox()
            if not self._stopping:  # a stop may have begun while the inbox was replaced
                await self._nc.publish(self._pull_subject, orjson.dumps(request), reply=self._inbox)
        except NatsError as exc:
            self._requested -= want
            self._log.debug("pull request not sent", error=str(exc))
            return False
        return True

    async def _new_inbox(self) -> None:
        """Current before the first await: a request sent meanwhile goes after its SUB."""
        self._stale_inbox = False
        old, self._inbox = self._sub, self._nc.new_inbox()
        try:
            self._sub = await self._subscribe()
        except NatsError:
            self._stale_inbox = True
            raise
        for closing in (old, self._sub if self._stopping else None):
            if closing is not None:
                with contextlib.suppress(NatsError):
                    await closing.unsubscribe()

    async def _subscribe(self) -> Subscription:
        """The pull inbox; with the driver's client, its plain deliveries skip nats-py's
        queue and task (:class:`~.connection.DriverClient`)."""
        sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        if isinstance(self._nc, DriverClient):
            self._nc.read_directly(sub._id, self._on_plain_delivery)
        return sub

    def _on_plain_delivery(self, subject: bytes, reply: bytes, data: bytes) -> None:
        msg = Msg(self._nc, subject.decode(), reply.decode(), data)
        self.last_activity = time.monotonic()
        self._start(msg)

    async def _on_message(self, msg: Msg) -> None:
        self.last_activity = time.monotonic()
        headers = msg.headers
        if headers and protocol.STATUS_HEADER in headers and not msg.data:
            await self._on_status(headers)
            return
        self._start(msg)

    def _start(self, msg: Msg) -> None:
        """A delivery: its run starts in a task of its own (or it goes back, if no slot)."""
        self._last_busy = now = self.last_activity
        self._requested = max(self._requested - 1, 0)
        over_budget = self.budget.left(len(self._running)) <= 0
        if self._stopping or len(self._running) >= self.concurrency or over_budget:
            # Not expected (see stop and _pull), but if it happens it is not an attempt.
            bounce = asyncio.create_task(self._settlement.hand_back(msg))
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
        # "Consumer Deleted", or no responders: nothing serves pulls for this consumer.
        if "deleted" in description.lower() or status == _NO_RESPONDERS:
            self._check_consumer()
        asyncio.get_running_loop().call_later(1.0, self._wake.set)

    def _check_consumer(self) -> None:
        """Make sure the consumer exists, in the background, once at a time."""
        if self._recreating is None or self._recreating.done():
            self._recreating = asyncio.create_task(self._recreate())
            self._tasks.append(self._recreating)

    async def _recreate(self) -> None:
        """The consumer may be gone (deleted, or its stream with it): put it back, however
        long that takes, rather than idle silently; the failure is said once per outage."""
        with contextlib.suppress(NatsError, TimeoutError):
            await self._nc.jetstream().consumer_info(protocol.MESSAGES_STREAM, self._driver.name)
            return  # still there: the silence was the network's
        delay = 1.0
        told = False
        while not self._stopping:
            try:
                await self.ensure()
            except Exception as exc:
                if not told:
                    told = True
                    self._log.error(
                        "consumer was deleted and could not be recreated; trying again",
                        error=str(exc),
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECREATE_MAX_DELAY)
                continue
            self._log.warning("consumer was deleted; recreated it", consumer=self._driver.name)
            self._wake.set()
            return

    async def _handle(self, msg: Msg) -> None:
        settlement = self._settlement
        task = asyncio.current_task()
        assert task is not None
        decided = False
        try:
            admission = await settlement.admit(msg)
            if admission.finished:
                await settlement.replay(msg, admission)
                return
            self._admissions[task] = admission
            processed = await process(self._driver, admission.delivery, self._services)
            decided = True
            await settlement.record(admission, processed)
            # The handler has returned: from here the decision is the fence, and the lease
            # is no longer renewed (a renewal would find this instance's own decision and
            # take it for another's). The decision builds on the lease's latest revision.
            published = await settlement.publish_result(self._admissions.pop(task), processed)
            if published is not None:
                await settlement.settle(msg, processed.outcome, published)
        except asyncio.CancelledError:
            if task in self._fenced:
                self._log.warning("run fenced: another instance took it over; stopped")
            else:
                await settlement.hand_back(msg)
        except Exception:
            self._log.exception("message could not be settled; it will be redelivered")
            await quietly(msg.nak(delay=1.0))
        finally:
            self.handled += 1
            self._last_busy = time.monotonic()
            self._running.pop(task, None)
            self._touched.pop(task, None)
            self._admissions.pop(task, None)
            self._fenced.discard(task)
            if decided:
                self.budget.count()
            if not await self._pull():
                self._wake.set()

    async def _keep_alive(self) -> None:
        """Tell JetStream that long runs are still alive, well inside ``ack_wait``, and keep
        their leases in the run ledger fresh beside it."""
        period = self._driver.ack_wait / 3
        while True:
            await asyncio.sleep(min(period / 2, 5.0))
            now = time.monotonic()
            for task, touched in list(self._touched.items()):
                msg = self._running.get(task)
                if msg is not None and now - touched >= period and not msg.is_acked:
                    self._touched[task] = now
                    await quietly(msg.in_progress())
                    admission = self._admissions.get(task)
                    if admission is not None:
                        self._tasks.append(asyncio.create_task(self._renew(task, admission)))
            self._tasks = [task for task in self._tasks if not task.done()]

    async def _renew(self, task: asyncio.Task[Any], admission: Admission) -> None:
        """Renew one lease; a run another instance took over is stopped, not handed back."""
        try:
            renewed = await self._settlement.renew(admission)
        except Fenced as fenced:
            if task not in self._admissions:
                return  # sent before the handler returned; its decision is the fence now
            self._log.warning(
                "lease lost: another instance decided this run",
                run_id=fenced.record.run_id,
                reason=str(fenced),
            )
            self._fenced.add(task)
            task.cancel()
            return
        if task in self._admissions:
            self._admissions[task] = renewed
