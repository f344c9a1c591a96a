"""Settling a delivery: what the run ledger says of it, its result, then ack, nak or term.

The consumer calls these in a message's order: :meth:`Settlement.admit` (the ledger: which
attempt this really is, or that the run already finished), the dispatcher,
:meth:`~Settlement.record` (the ledger keeps a failed attempt's error),
:meth:`~Settlement.publish_result` (the result recorded in the ledger, which fences off a
late twin, then stored before anything is acked) and :meth:`~Settlement.settle`. A
redelivery of a finished run goes to :meth:`~Settlement.replay` instead of the handler. A
stopping process gives unfinished runs back with :meth:`~Settlement.hand_back`, recorded
so that they never count as attempts.

The ledger's protocol, crash point by crash point, is in docs/protocol.md#the-run-ledger.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import attrs
import orjson
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js.errors import APIError

from .. import protocol
from ..models import DecodeError, DriverMessage, decode_driver_message, encode_result
from ..outcomes import Action, Outcome, Result
from ..trace_context import inject
from .dispatcher import Delivery, Processed
from .ledger import DECIDED, RECORD_OVERHEAD, Fenced, RunRecord
from .publisher import describe, headers_size

if TYPE_CHECKING:
    from collections.abc import Awaitable, Coroutine

    from nats.aio.msg import Msg
    from structlog.typing import FilteringBoundLogger

    from .ledger import RunLedger
    from .publisher import Publisher

#: JetStream's "message size exceeds maximum allowed" (above a stream's ``max_msg_size``).
_TOO_LARGE = 10054


@attrs.frozen
class Admission:
    """A delivery as admitted: what the dispatcher gets, and what the ledger knows of it.

    ``record`` is None without a ledger (or for a body with no run id); ``finished`` says
    the run was decided before, so the handler must not run again.
    """

    delivery: Delivery
    sequence: int
    record: RunRecord | None = None

    @property
    def finished(self) -> bool:
        return self.record is not None and self.record.finished


class Settlement:
    """Everything between a delivery and its ack that is not the handler's own work."""

    def __init__(
        self,
        publisher: Publisher,
        driver: str,
        log: FilteringBoundLogger,
        ledger: RunLedger | None = None,
        ack_wait: float = 30.0,
    ) -> None:
        self._publisher = publisher
        self._driver = driver
        self._log = log
        self._ledger = ledger
        #: How long a recorded run's ack may go unconfirmed before the run is marked
        #: reported and acked again: early enough that the mark lands before JetStream
        #: would redeliver.
        self._confirm_within = ack_wait / 4
        #: A decision that took longer than this (weather, a process that stood still) may
        #: have let JetStream hand the delivery to another instance meanwhile.
        self._late_after = ack_wait / 4
        self._background: set[asyncio.Task[None]] = set()

    async def admit(self, msg: Msg) -> Admission:
        """The delivery as the dispatcher takes it, with what the ledger knows of it.

        A first delivery reads nothing (there is nothing to read). A redelivery's attempt
        comes from the ledger, with the errors of the attempts before it: hand-backs were
        deliveries, not attempts. The ledger is waited for, never guessed: a handler does
        not start on an unknown state.
        """
        delivered, sequence = protocol.parse_ack_subject(msg.reply)
        if self._ledger is None:
            return Admission(Delivery(msg.data, msg.subject, delivered, msg.headers), sequence)
        # Decoded once, here, for its run id; the dispatcher takes the message as it is.
        message = _decoded(msg)
        delivery = Delivery(msg.data, msg.subject, delivered, msg.headers, message=message)
        if message is None:  # not a DriverMessage: the dispatcher terminates it
            return Admission(delivery, sequence)
        run_id = message.run_id
        if delivered == 1:
            return Admission(delivery, sequence, RunRecord(run_id))
        record = await self._ledger.read(sequence, run_id)
        attempt = record.attempt(delivered)
        delivery = attrs.evolve(delivery, attempt=attempt, earlier=record.earlier(attempt))
        return Admission(delivery, sequence, record)

    async def replay(self, msg: Msg, admission: Admission) -> None:
        """A redelivery of a run already decided: its recorded result, never a second run.

        A result decided but perhaps not stored (a crash between the two, a lost ack) is
        published again with the same ``Nats-Msg-Id``, so JetStream keeps one copy.
        """
        record = admission.record
        assert record is not None and self._ledger is not None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.at))
        if record.state == DECIDED:
            headers = {
                protocol.MSG_ID_HEADER: protocol.result_message_id(self._driver, admission.sequence)
            }
            try:
                await self._store(record.result, headers, record.run_id, admission)
            except _Superseded:
                self._log.info(
                    "another instance replayed this run meanwhile; publishing nothing more",
                    run_id=record.run_id,
                )
                return
            await self._ledger.mark_reported(record, admission.sequence)
        self._log.info(
            f"run already finished at {when} by instance {record.instance or '?'}; acked",
            run_id=record.run_id,
            state=record.state,
        )
        await self._ledger.note_duplicate(admission.sequence, record.run_id)
        await msg.ack()

    async def renew(self, admission: Admission) -> Admission:
        """Keep a long run's lease fresh; raises :class:`Fenced` when it was taken over."""
        if self._ledger is None or admission.record is None:
            return admission
        record = await self._ledger.renew(admission.record, admission.sequence)
        return attrs.evolve(admission, record=record)

    async def record(self, admission: Admission, processed: Processed) -> None:
        """Keep what a failed attempt raised, for the failure of the attempt that gives up."""
        if processed.error and processed.message is not None and self._ledger is not None:
            await self._ledger.record_error(
                admission.sequence,
                processed.message.run_id,
                admission.delivery.attempt,
                processed.error,
            )

    async def publish_result(self, admission: Admission, processed: Processed) -> Admission | None:
        """Record the result in the ledger, then store it; None when fenced off, else the
        admission as decided (for :meth:`settle`).

        The ledger's compare-and-set is the fence: an instance that was paused past
        ``ack_wait`` while another took its delivery learns here that the other decided
        first, logs it and publishes nothing (nor acks: the delivery is the other's now).

        Storing waits out weather for as long as it lasts: the run stays alive meanwhile
        (in-progress acks go on), and the de-duplication header makes a repeat harmless, so
        a finished build is never re-run only because its result could not be stored for a
        while. With the ledger, each new try first checks that no other instance took the
        delivery and reported the run meanwhile (an instance cut off from JetStream past
        ``ack_wait``); if one did, nothing more is published. A graceful shutdown still ends
        the wait (the run is handed back). A result larger than the server takes is
        replaced by a failure naming the limit; a refusal for good is logged and the run
        settled without its result.
        """
        stream_sequence = admission.sequence
        message, result = processed.message, processed.outcome.result
        if result is None or message is None:
            return admission
        headers = {
            protocol.MSG_ID_HEADER: protocol.result_message_id(self._driver, stream_sequence)
        }
        inject(headers, processed.span_context)
        body = self._encode(message, result)
        keeping = self._ledger is not None and admission.record is not None
        room = self._publisher.max_payload - headers_size(headers)
        if len(body) > room - (RECORD_OVERHEAD if keeping else 0):
            # Never fits, however often it is retried or the handler re-run: a failure
            # naming the limit is reported once instead.
            text = self._too_large(result)
            self._log.error(
                "result too large to publish; reporting a failure",
                run_id=message.run_id,
                error=text,
            )
            body = self._encode(message, Result.fail(text))
        late = False
        if keeping:
            assert self._ledger is not None and admission.record is not None
            deciding = time.monotonic()
            try:
                decided = await self._ledger.decide(admission.record, stream_sequence, body)
            except Fenced as fenced:
                self._log.warning(
                    "fenced: another instance decided this run first; publishing nothing",
                    run_id=message.run_id,
                    reason=str(fenced),
                )
                return None
            admission = Admission(admission.delivery, stream_sequence, decided)
            late = time.monotonic() - deciding > self._late_after
        try:
            refused = await self._store(body, headers, message.run_id, admission, ask_first=late)
        except _Superseded:
            self._log.warning(
                "another instance reported this run while its result waited; "
                "publishing nothing more",
                run_id=message.run_id,
            )
            return None
        if refused is not None:
            too_large = isinstance(refused, MaxPayloadError) or (
                isinstance(refused, APIError) and refused.err_code == _TOO_LARGE
            )
            self._log.error(
                "result refused as too large; the run is settled without it"
                if too_large
                else "result refused; the run is settled without it",
                run_id=message.run_id,
                size=len(body),
                error=describe(refused),
            )
        return admission

    async def settle(self, msg: Msg, outcome: Outcome, admission: Admission | None = None) -> None:
        """Ack, nak (with the outcome's delay) or term: the outcome's last word.

        The ack of a run whose result the ledger holds asks to be confirmed. Most are, and
        cost nothing more; one that is not (lost with a consumer leader, a dropped frame)
        is marked ``reported`` in the ledger and sent again, so that a redelivery, however
        late, acks without publishing anything.
        """
        if outcome.action is Action.ACK:
            record = admission.record if admission is not None else None
            if self._ledger is not None and record is not None and record.state == DECIDED:
                assert admission is not None

                def unconfirmed() -> None:
                    self._in_background(self._report_unconfirmed(msg, record, admission.sequence))

                await self._publisher.confirm(
                    msg.reply, protocol.ACK, self._confirm_within, unconfirmed
                )
            else:
                await msg.ack()
        elif outcome.action is Action.TERM:
            await msg.term()
        else:
            await msg.nak(delay=outcome.delay)

    async def _report_unconfirmed(self, msg: Msg, record: RunRecord, sequence: int) -> None:
        assert self._ledger is not None
        self._log.warning(
            "ack not confirmed; marking the run reported and acking again", run_id=record.run_id
        )
        await self._ledger.mark_reported(record, sequence)
        await quietly(self._publisher.nc.publish(msg.reply, protocol.ACK))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` beside the runs, holding on to it until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def hand_back(self, msg: Msg) -> None:
        """Give a run back unfinished (shutdown): recorded first, so it is not an attempt."""
        if self._ledger is not None:
            run_id = _run_id_of(msg.data)
            if run_id is not None:
                _, stream_sequence = protocol.parse_ack_subject(msg.reply)
                await self._ledger.count_handback(stream_sequence, run_id)
        await quietly(msg.nak())
        self._log.info("run handed back for redelivery", subject=msg.subject)

    async def _store(
        self,
        body: bytes,
        headers: dict[str, str],
        run_id: str,
        admission: Admission,
        *,
        ask_first: bool = False,
    ) -> NatsError | None:
        """Publish until stored; the error of a refusal for good, else None.

        With the ledger, a try after the first (and the first too, with ``ask_first``) is
        made only while the admission's record is still the ledger's last word
        (:meth:`RunLedger.is_current`); else :class:`_Superseded` is raised.
        """

        def weather(tries: int, error: Exception) -> None:
            if tries == 1 or tries % 10 == 0:
                self._log.warning(
                    "result not stored yet; retrying",
                    run_id=run_id,
                    tries=tries,
                    error=describe(error),
                )

        ledger, record = self._ledger, admission.record
        still_wanted = None
        if ledger is not None and record is not None:

            async def still_wanted() -> bool:
                return await ledger.is_current(record, admission.sequence)

            if ask_first and not await still_wanted():
                raise _Superseded

        try:
            tries = await self._publisher.publish_until_stored(
                protocol.RESULT_SUBJECT,
                body,
                headers,
                on_weather=weather,
                still_wanted=still_wanted,
            )
        except NatsError as exc:  # permanent: no retry changes it
            return exc
        if tries is None:
            raise _Superseded
        if tries > 1:
            self._log.info("result published", run_id=run_id, tries=tries)
        return None

    def _too_large(self, result: Result) -> str:
        """Which part of the result is too large, and the server's limit."""
        limit = self._publisher.max_payload
        data_size = len(orjson.dumps(result.data))
        message_size = len(result.message.encode())
        what, size = ("data", data_size) if data_size >= message_size else ("message", message_size)
        return (
            f"result {what} is {_megabytes(size)}; "
            f"the NATS server accepts at most {_megabytes(limit)}"
        )

    def _encode(self, message: DriverMessage, result: Result) -> bytes:
        return encode_result(
            message.run_id,
            message.payload,
            result.success,
            result.message,
            result.data,
            self._driver,
        )


class _Superseded(Exception):
    """Another instance reported the run while its result waited out weather here."""


async def quietly(action: Awaitable[object]) -> None:
    """Settle a message where failing to is harmless (JetStream redelivers after ack_wait)."""
    try:
        await action
    except Exception:
        return


def _run_id_of(data: bytes) -> str | None:
    """The run id of a message body, read without the full decode (ledger paths only)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    run_id = body.get("run_id") if isinstance(body, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def _decoded(msg: Msg) -> DriverMessage | None:
    """The message, or None when it is not one (the dispatcher says why, once)."""
    try:
        return decode_driver_message(msg.data, msg.subject)
    except DecodeError:
        return None


def _megabytes(size: int) -> str:
    return f"{size / 1_048_576:.1f} MB"
