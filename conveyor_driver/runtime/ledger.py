"""The run ledger: what happened to each delivery, kept where every instance can read it.

JetStream counts *deliveries*, and a delivery is not an attempt: a graceful shutdown hands
unfinished runs back, and each hand-back comes back as one more delivery. Counted as
attempts, three rolling restarts would make a build "give up" without having run. So the
driver keeps its own record, in a JetStream key-value bucket shared by its instances and
keyed by the message's stream sequence (the one identity a message keeps across
redeliveries):

- ``handbacks``: deliveries returned unrun or cut short by a stopping process; the real
  attempt of a delivery is its delivery count less these;
- ``errors``: what each failed attempt raised, so a final failure names every attempt.

A message that is delivered for the first time has no record, and the happy path never
reads or writes one: the ledger costs nothing until something goes wrong. Records expire
with the bucket's TTL, long after JetStream has given up on their message. The bucket, its
keys and its values are described in ``docs/protocol.md#the-run-ledger``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import attrs
import orjson
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from structlog.typing import FilteringBoundLogger

from .. import protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

#: Records outlive any redelivery JetStream would still make.
DEFAULT_TTL = 7 * 24 * 3600.0
#: A ledger write is retried this long; the run goes on without it after that.
_WRITE_PATIENCE = 10.0
_STOPPED_MID_RUN = "the driver stopped mid-run (no outcome recorded)"


@attrs.frozen
class RunRecord:
    """The ledger's knowledge of one message; ``run_id`` guards against a reused sequence."""

    run_id: str = ""
    handbacks: int = 0
    errors: dict[int, str] = attrs.field(factory=dict)

    def attempt(self, delivered: int) -> int:
        """The real attempt a delivery is: hand-backs were deliveries, not attempts."""
        return max(delivered - self.handbacks, 1)

    def earlier(self, attempt: int) -> tuple[str, ...]:
        """One description per attempt before ``attempt``; a gap is a run cut off unrecorded."""
        return tuple(self.errors.get(n, _STOPPED_MID_RUN) for n in range(1, attempt))

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "run_id": self.run_id,
                "handbacks": self.handbacks,
                "errors": {str(n): text for n, text in self.errors.items()},
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> RunRecord:
        body = orjson.loads(data)
        errors = {int(n): str(text) for n, text in dict(body.get("errors") or {}).items()}
        return cls(str(body.get("run_id", "")), int(body.get("handbacks", 0)), errors)


class RunLedger:
    """The driver's bucket; every method is weather-proof or says plainly that it failed."""

    def __init__(self, kv: KeyValue, log: FilteringBoundLogger) -> None:
        self._kv = kv
        self._log = log

    @classmethod
    async def open(
        cls, js: JetStreamContext, driver: str, log: FilteringBoundLogger, ttl: float = DEFAULT_TTL
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
        return cls(await js.create_key_value(config), log)

    async def read(self, sequence: int, run_id: str) -> RunRecord:
        """The record of a redelivered message; retried until it answers (weather).

        A handler must not start on an unknown count, so this waits for the bucket rather
        than guess; the caller keeps the message alive meanwhile.
        """
        delay = 0.1
        while True:
            try:
                return (await self._get(sequence, run_id))[0]
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

    async def _get(self, sequence: int, run_id: str) -> tuple[RunRecord, int]:
        try:
            entry = await self._kv.get(str(sequence))
        except KeyNotFoundError:
            return RunRecord(run_id), 0
        record = RunRecord.decode(entry.value or b"{}")
        if record.run_id != run_id:  # the stream was recreated and the sequence reused
            return RunRecord(run_id), entry.revision or 0
        return record, entry.revision or 0

    async def _change(
        self, sequence: int, run_id: str, change: Callable[[RunRecord], RunRecord]
    ) -> None:
        """Compare-and-set, retried on conflicts and weather for a bounded time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _WRITE_PATIENCE
        delay = 0.05
        while True:
            try:
                record, revision = await self._get(sequence, run_id)
                value = change(record).encode()
                if revision:
                    await self._kv.update(str(sequence), value, last=revision)
                else:
                    await self._kv.create(str(sequence), value)
            except KeyWrongLastSequenceError as exc:
                conflict: Exception = exc  # another instance wrote first: read again
            except (NatsError, TimeoutError) as exc:
                conflict = exc
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
