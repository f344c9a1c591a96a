"""The run ledger: what happened to each delivery, kept where every instance can read it.

JetStream counts *deliveries*, and a delivery is not an attempt: a graceful shutdown hands
unfinished runs back, and each hand-back comes back as one more delivery. Counted as
attempts, three rolling restarts would make a build "give up" without having run. So the
driver keeps its own record, in a JetStream key-value bucket shared by its instances and
keyed by the message's stream sequence (the one identity a message keeps across
redeliveries):

- ``handbacks``: deliveries returned unrun or cut short by a stopping process; the real
  attempt of a delivery is its delivery count less these;
- ``errors``: what each failed attempt raised, so a final failure names every attempt;
- ``state``: ``running`` (a long run keeps its lease fresh), ``decided`` (the result is
  recorded, maybe not yet stored by the server; a run whose ack was confirmed stays so,
  as JetStream will not deliver it again) or ``reported`` (stored, and its ack was lost
  or it was replayed), with the result itself while decided.

Every write is a compare-and-set on the record's revision, which makes the revision a
fencing token: an instance that was paused past ``ack_wait`` while JetStream handed its
delivery to another learns, when it tries to record its result, that someone else
decided first (:class:`Fenced`), and publishes nothing. A redelivery of a decided run
re-publishes the recorded result (same ``Nats-Msg-Id``) instead of running the handler;
one of a reported run is acked at once. Records expire with the bucket's TTL, long after
JetStream has given up on their message. The bucket, its keys and its values are
described in ``docs/protocol.md#the-run-ledger``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import attrs
import orjson
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from structlog.typing import FilteringBoundLogger

from .. import protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

    from .publisher import Publisher

#: Records outlive any redelivery JetStream would still make.
DEFAULT_TTL = 7 * 24 * 3600.0
#: Bytes a record adds around the result it keeps (ids, counts, a few errors).
RECORD_OVERHEAD = 2048
#: A ledger write is retried this long; the run goes on without it after that.
_WRITE_PATIENCE = 10.0
_STOPPED_MID_RUN = "the driver stopped mid-run (no outcome recorded)"


RUNNING = "running"
DECIDED = "decided"
REPORTED = "reported"


class Fenced(Exception):
    """Another instance decided this delivery first: this one must publish nothing."""

    def __init__(self, record: RunRecord) -> None:
        super().__init__(
            f"run already decided by instance {record.instance or '?'} at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(record.at))}"
        )
        self.record = record


@attrs.frozen
class RunRecord:
    """The ledger's knowledge of one message; ``run_id`` guards against a reused sequence.

    ``revision`` is the bucket's revision of the record as read (0: no record), the token
    every compare-and-set write is made against; it is not stored in the record.
    """

    run_id: str = ""
    handbacks: int = 0
    errors: dict[int, str] = attrs.field(factory=dict)
    state: str = ""
    #: The result event as published (JSON), kept while decided; a reported record drops
    #: it, since its redelivery is acked without publishing anything.
    result: bytes = b""
    #: Who changed the state last, and when (Unix time).
    instance: str = ""
    at: float = 0.0
    #: Redeliveries acked without running, and late finishers that published nothing.
    duplicates: int = 0
    fenced: int = 0
    revision: int = attrs.field(default=0, eq=False)

    @property
    def finished(self) -> bool:
        return self.state in (DECIDED, REPORTED)

    def attempt(self, delivered: int) -> int:
        """The real attempt a delivery is: hand-backs were deliveries, not attempts."""
        return max(delivered - self.handbacks, 1)

    def earlier(self, attempt: int) -> tuple[str, ...]:
        """One description per attempt before ``attempt``; a gap is a run cut off unrecorded."""
        return tuple(self.errors.get(n, _STOPPED_MID_RUN) for n in range(1, attempt))

    def moved(self, state: str, result: bytes, instance: str) -> RunRecord:
        """This record in ``state``, changed now (built directly: on every message's way)."""
        return RunRecord(
            self.run_id,
            self.handbacks,
            self.errors,
            state,
            result,
            instance,
            time.time(),
            self.duplicates,
            self.fenced,
            self.revision,
        )

    def at_revision(self, revision: int) -> RunRecord:
        """This record as stored at ``revision``."""
        return RunRecord(
            self.run_id,
            self.handbacks,
            self.errors,
            self.state,
            self.result,
            self.instance,
            self.at,
            self.duplicates,
            self.fenced,
            revision,
        )

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "run_id": self.run_id,
                "handbacks": self.handbacks,
                "errors": {str(n): text for n, text in self.errors.items()},
                "state": self.state,
                # As JSON, not as an escaped string: a result that fits a NATS message
                # then fits the record too, with room for the record's few other fields.
                "result": orjson.Fragment(self.result) if self.result else None,
                "instance": self.instance,
                "at": self.at,
                "duplicates": self.duplicates,
                "fenced": self.fenced,
            }
        )

    @classmethod
    def decode(cls, data: bytes, revision: int = 0) -> RunRecord:
        body = orjson.loads(data)
        errors = {int(n): str(text) for n, text in dict(body.get("errors") or {}).items()}
        return cls(
            run_id=str(body.get("run_id", "")),
            handbacks=int(body.get("handbacks", 0)),
            errors=errors,
            state=str(body.get("state", "")),
            result=orjson.dumps(body["result"]) if body.get("result") else b"",
            instance=str(body.get("instance", "")),
            at=float(body.get("at", 0.0)),
            duplicates=int(body.get("duplicates", 0)),
            fenced=int(body.get("fenced", 0)),
            revision=revision,
        )


class RunLedger:
    """The driver's bucket; every method is weather-proof or says plainly that it failed."""

    def __init__(
        self,
        kv: KeyValue,
        log: FilteringBoundLogger,
        instance: str = "",
        publisher: Publisher | None = None,
        bucket: str = "",
    ) -> None:
        self._kv = kv
        self._log = log
        #: This process, as named in the records it writes (host and pid by default).
        self.instance = instance
        #: Writes go through the driver's own publisher when it has one: the decision is
        #: on every message's way to its ack, and nats-py's KV path costs several times more.
        self.publisher = publisher
        self._bucket = bucket

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        driver: str,
        log: FilteringBoundLogger,
        ttl: float = DEFAULT_TTL,
        instance: str = "",
    ) -> RunLedger:
        """Create (or reuse) the bucket, replicated like the stream whose messages it tracks."""
        info = await js.stream_info(protocol.MESSAGES_STREAM)
        config = KeyValueConfig(
            bucket=protocol.ledger_bucket(driver),
            description=f"conveyor-driver {driver}: attempts and hand-backs per delivery",
            history=1,
            ttl=ttl,
            replicas=info.config.num_replicas or 1,
        )
        kv = await js.create_key_value(config)
        return cls(kv, log, instance, bucket=config.bucket)

    async def read(self, sequence: int, run_id: str) -> RunRecord:
        """The record of a redelivered message; retried until it answers (weather).

        A handler must not start on an unknown count, so this waits for the bucket rather
        than guess; the caller keeps the message alive meanwhile.
        """
        delay = 0.1
        while True:
            try:
                return await self._get(sequence, run_id)
            except (NatsError, TimeoutError) as exc:
                self._log.warning("run ledger unavailable; waiting", error=str(exc) or "timeout")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def count_handback(self, sequence: int, run_id: str) -> None:
        """This delivery goes back unrun (or cut short): it must not count as an attempt."""
        await self._change(sequence, run_id, lambda r: attrs.evolve(r, handbacks=r.handbacks + 1))

    async def record_error(self, sequence: int, run_id: str, attempt: int, error: str) -> None:
        """What ``attempt`` raised, for the failure result of the attempt that gives up."""
        await self._change(
            sequence, run_id, lambda r: attrs.evolve(r, errors={**r.errors, attempt: error})
        )

    async def decide(self, record: RunRecord, sequence: int, result: bytes) -> RunRecord:
        """Record the run's result before it is published; :class:`Fenced` if too late.

        ``record`` is what this instance read when it started the run (``RunRecord(run_id)``
        for a first delivery). Weather is waited out, with capped backoff, for as long as
        it lasts: a result is never dropped, and never published unrecorded. Returns the
        record as written, whose revision :meth:`mark_reported` builds on.
        """
        delay = 0.05
        tried: list[RunRecord] = []
        while True:
            decided = record.moved(DECIDED, result, self.instance)
            tried.append(decided)
            try:
                return decided.at_revision(await self._write(sequence, decided, record.revision))
            except KeyWrongLastSequenceError:
                record = await self.read(sequence, record.run_id)
                if record in tried:  # an earlier try was stored, its answer lost (weather)
                    return record
                if record.finished:
                    await self._change(
                        sequence, record.run_id, lambda r: attrs.evolve(r, fenced=r.fenced + 1)
                    )
                    raise Fenced(record) from None
            except (NatsError, TimeoutError) as exc:
                self._log.warning(
                    "run ledger unavailable; result waits", error=str(exc) or "timeout"
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def is_current(self, record: RunRecord, sequence: int) -> bool:
        """Whether ``record`` is still the ledger's last word on the message.

        Asked before a decided result is published again after weather: if another
        instance wrote meanwhile, it took the redelivery and reported the run, and one more
        copy, later than the result stream's de-duplication window, would be stored as a
        second result. The ledger is waited for, as :meth:`read` does.
        """
        return (await self.read(sequence, record.run_id)).revision == record.revision

    async def renew(self, record: RunRecord, sequence: int) -> RunRecord:
        """Keep a long run's lease fresh (beside its in-progress acks); :class:`Fenced` if
        another instance decided it meanwhile. Weather leaves the lease as it was."""
        running = attrs.evolve(record, state=RUNNING, instance=self.instance, at=time.time())
        try:
            return attrs.evolve(
                running, revision=await self._write(sequence, running, record.revision)
            )
        except KeyWrongLastSequenceError:
            current = await self.read(sequence, record.run_id)
            if current.finished:
                raise Fenced(current) from None
            return current  # hand-backs or errors of others: the lease goes on from here
        except (NatsError, TimeoutError):
            return record

    async def mark_reported(self, record: RunRecord, sequence: int) -> None:
        """The server has the result: a later redelivery is acked without re-publishing.

        Written when a run's ack went unconfirmed and after a replay, the two cases where
        a redelivery may follow, so the write is waited for and retried through weather
        for a while: a run left ``decided`` would have its result published once more,
        stored only once if the result stream's de-duplication still knows it. A record
        that moved on meanwhile (another instance replayed it) is left alone.
        """
        reported = record.moved(REPORTED, b"", record.instance)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _WRITE_PATIENCE
        delay = 0.05
        while True:
            try:
                await self._write(sequence, reported, record.revision)
                return
            except KeyWrongLastSequenceError:
                return
            except (NatsError, TimeoutError) as exc:
                if loop.time() > deadline:
                    self._log.warning(
                        "run ledger not written: a redelivery will re-publish the result",
                        sequence=sequence,
                        error=str(exc) or "timeout",
                    )
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def note_duplicate(self, sequence: int, run_id: str) -> None:
        """A redelivery of a finished run was acked without running (counted for status)."""
        await self._change(sequence, run_id, lambda r: attrs.evolve(r, duplicates=r.duplicates + 1))

    async def summary(self) -> dict[str, int]:
        """Counts over every record, for ``conveyor-driver status``."""
        counts = {"finished": 0, "running": 0, "fenced": 0, "skipped_as_duplicate": 0}
        # Counted to the bucket's size, not to the watcher's "no more" marker: nats-py can
        # send that marker before a record already on its way (it asks the consumer what
        # is pending, and one delivered but not yet read is not).
        expected = (await self._kv.status()).values
        if not expected:
            return counts
        watcher = await self._kv.watchall(ignore_deletes=True)
        seen = 0
        # nats-py leaves the watcher's methods unannotated.
        try:
            while seen < expected:
                entry = await watcher.updates(timeout=5.0)  # type: ignore[no-untyped-call]
                if entry is None:
                    continue
                seen += 1
                record = RunRecord.decode(entry.value or b"{}")
                counts["finished"] += record.finished
                counts["running"] += record.state == RUNNING
                counts["fenced"] += record.fenced
                counts["skipped_as_duplicate"] += record.duplicates
        except (NatsError, TimeoutError):
            pass  # records expired meanwhile: the counts are of those still there
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return counts

    async def _write(self, sequence: int, record: RunRecord, revision: int) -> int:
        """Compare-and-set ``record`` on ``revision`` (0: create); the new revision."""
        if self.publisher is not None and self._bucket:
            headers = {protocol.EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER: str(revision)}
            subject = protocol.ledger_subject(self._bucket, str(sequence))
            try:
                return await self.publisher.store(subject, record.encode(), headers)
            except APIError as exc:
                if exc.err_code in protocol.WRONG_LAST_SEQUENCE:
                    raise KeyWrongLastSequenceError from None
                raise
        if revision:
            return int(await self._kv.update(str(sequence), record.encode(), last=revision))
        return int(await self._kv.create(str(sequence), record.encode()))

    async def _get(self, sequence: int, run_id: str) -> RunRecord:
        try:
            entry = await self._kv.get(str(sequence))
        except KeyNotFoundError:
            return RunRecord(run_id)
        record = RunRecord.decode(entry.value or b"{}", entry.revision or 0)
        if record.run_id != run_id:  # the stream was recreated and the sequence reused
            return RunRecord(run_id, revision=record.revision)
        return record

    async def _change(
        self, sequence: int, run_id: str, change: Callable[[RunRecord], RunRecord]
    ) -> None:
        """Compare-and-set, retried on conflicts and weather for a bounded time.

        A write whose answer was lost may have landed: if the record read next is one of
        those, the change is made, and is not made twice (a hand-back counted twice would
        give the run one attempt more than ``max_attempts``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _WRITE_PATIENCE
        delay = 0.05
        unanswered: list[RunRecord] = []
        while True:
            changed = None
            try:
                record = await self._get(sequence, run_id)
                if record in unanswered:
                    return
                changed = change(record)
                await self._write(sequence, changed, record.revision)
            except KeyWrongLastSequenceError as exc:
                conflict: Exception = exc  # another instance wrote first: read again
            except (NatsError, TimeoutError) as exc:
                conflict = exc
                if changed is not None:
                    unanswered.append(changed)
            else:
                return
            if loop.time() > deadline:
                self._log.warning(
                    "run ledger not written: this delivery may count as an attempt",
                    sequence=sequence,
                    error=str(conflict) or "timeout",
                )
                return
            if not isinstance(conflict, KeyWrongLastSequenceError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
