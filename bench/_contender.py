"""One contender of ``bench_dispatch.py``, in a process of its own, on the event loop asked for.

``python bench/_contender.py KIND LOOP URL``; KIND is one of :data:`KINDS`, LOOP ``asyncio``
or ``uvloop``. Why a process each: the CPU a contender spends is then its own (the
benchmark reads it from the contender, the nats-server's from ``/proc``), the collector
that watches for the end runs elsewhere, and every contender gets the loop it asked for.

The parent drives it with one line per command on stdin; replies are lines on the
process's original stdout (the library's own output goes to stderr):

- ``start NAME K``: consume the durable consumer NAME (already there, events already
  loaded) with K handler slots. At the first delivery the contender's code sees, it
  replies ``first MONOTONIC CPU`` (``time.monotonic()``, comparable across processes on
  Linux, and ``time.process_time()``): the run's start, without the set-up before it.
- ``stop``: replies ``stopped CPU`` with the CPU time taken on arrival, then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import sys
import time
from collections.abc import Awaitable, Callable

import nats
import orjson
from _events import ACK_WAIT, RESOURCE_TYPE
from nats.aio.client import Client
from nats.aio.msg import Msg

from conveyor_driver import Context, Driver, loops, protocol
from conveyor_driver.runtime.heap import owned_by_driver
from conveyor_driver.settings import Settings

#: What each contender is; the framework's are its ledger switch and its log level.
KINDS = {
    "hand-written": "the strongest nats-py loop we could write",
    "framework": "ledger off, log level warning",
    "framework-logged": "ledger off, log level info, one ctx.log.info per run",
    "framework-ledger": "ledger on, log level warning",
    "framework-unwatched": "ledger off, log level warning, no loop watchdog",
}
#: A pull request outlives any run; one that expires anyway is answered 408 and renewed.
PULL_EXPIRES_NS = 60 * 1_000_000_000


class HandWritten:
    """What a careful author would write directly against nats-py, nothing around it.

    The same protocol work as the framework: decode the DriverMessage and its payload
    string, publish the PipelineEvent with its de-duplication id, wait for its PubAck, then
    ack; never more than K messages un-acked. Done with as little as nats-py allows:

    - pulls only for free slots: K at first, then one per ack (no batch barrier);
    - the ack and the next pull are published together, so they leave in one write;
    - every PubAck arrives on one wildcard subscription, matched by its last token, and
      the ack is sent from that callback: no task, future or timer per message;
    - orjson, and no client-side subject validation;
    - the garbage collector set as the framework sets it for serving: the start-up heap
      frozen, the youngest generation collected every 10,000 allocations, not 700.
    """

    def __init__(self, nc: Client, name: str, slots: int, on_first: Callable[[], None]) -> None:
        self._nc = nc
        self._name = name
        self._slots = slots
        self._on_first: Callable[[], None] | None = on_first
        self._pull_subject = protocol.pull_request_subject(protocol.MESSAGES_STREAM, name)
        self._deliveries = nc.new_inbox()
        self._pubacks = nc.new_inbox()
        self._tokens = itertools.count()
        self._acks: dict[str, str] = {}
        self.failures: list[str] = []

    async def start(self) -> None:
        self._subs = [
            await self._nc.subscribe(self._deliveries, cb=self._on_delivery),
            await self._nc.subscribe(self._pubacks + ".*", cb=self._on_puback),
        ]
        await self._pull(self._slots)

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def _pull(self, count: int) -> None:
        body = orjson.dumps({"batch": count, "expires": PULL_EXPIRES_NS})
        await self._nc.publish(self._pull_subject, body, reply=self._deliveries)

    async def _on_delivery(self, msg: Msg) -> None:
        if not msg.reply:  # a status: a pull request that ended with slots unfilled
            pending = (msg.headers or {}).get(protocol.PENDING_MESSAGES_HEADER)
            if pending:
                await self._pull(int(pending))
            return
        if self._on_first is not None:
            self._on_first()
            self._on_first = None
        _, stream_sequence = protocol.parse_ack_subject(msg.reply)
        body = orjson.loads(msg.data)
        payload = body["payload"]
        resource = orjson.loads(payload) if isinstance(payload, str) else payload
        result = orjson.dumps(
            {
                "event": protocol.RESULT_EVENT,
                "run_id": body["run_id"],
                "resource": resource,
                "driverresult": {
                    "success": True,
                    "message": "",
                    "data": None,
                    "driver": self._name,
                },
            }
        )
        token = str(next(self._tokens))
        self._acks[token] = msg.reply
        if len(self._acks) > self._slots:  # the comparison would not be fair: say so
            self.failures.append(f"{len(self._acks)} un-acked messages, more than {self._slots}")
        await self._nc.publish(
            protocol.RESULT_SUBJECT,
            result,
            reply=f"{self._pubacks}.{token}",
            headers={
                protocol.MSG_ID_HEADER: protocol.result_message_id(self._name, stream_sequence)
            },
        )

    async def _on_puback(self, msg: Msg) -> None:
        ack = orjson.loads(msg.data)
        if "error" in ack:
            self.failures.append(str(ack["error"]))
            return
        reply = self._acks.pop(msg.subject.rpartition(".")[2])
        await self._nc.publish(reply, b"+ACK")
        await self._pull(1)


class Contender:
    """One KIND, serving one run at a time."""

    def __init__(self, kind: str, url: str, reply: Callable[[str], None]) -> None:
        self._kind = kind
        self._url = url
        self._reply = reply
        self._stop: Callable[[], Awaitable[None]] | None = None

    def _first(self) -> None:
        self._reply(f"first {time.monotonic():.6f} {time.process_time():.6f}")

    async def start(self, name: str, slots: int) -> None:
        if self._kind == "hand-written":
            nc = await nats.connect(self._url, skip_subject_validation=True)
            loop = HandWritten(nc, name, slots, self._first)
            gc.collect()
            gc.freeze()
            gc.set_threshold(10_000, *gc.get_threshold()[1:])
            await loop.start()

            async def stop_loop() -> None:
                await loop.stop()
                await nc.close()
                if loop.failures:
                    raise RuntimeError(
                        f"{len(loop.failures)} failures, the first: {loop.failures[0]}"
                    )

            self._stop = stop_loop
            return
        if self._kind == "framework-unwatched":  # what the watchdog costs (issue 10: <= 2%)
            from conveyor_driver.runtime import watchdog

            watchdog.LoopWatchdog.start = lambda self: None  # type: ignore[method-assign]
        driver = Driver(name, concurrency=slots, ack_wait=ACK_WAIT)
        logged = self._kind == "framework-logged"
        first: list[Callable[[], None]] = [self._first]

        @driver.on(RESOURCE_TYPE)
        async def noop(ctx: Context) -> None:
            if first:
                first.pop()()
            if logged:
                ctx.log.info("noop")

        settings = Settings(
            nats_urls=self._url,
            log_level="info" if logged else "warning",
            log_format="json",
            ledger=self._kind == "framework-ledger",
        )
        # As `conveyor-driver run` serves it: the process is the driver's.
        with owned_by_driver():
            task = asyncio.create_task(driver.serve(settings))

        async def stop_driver() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self._stop = stop_driver

    async def stop(self) -> None:
        assert self._stop is not None
        stop, self._stop = self._stop, None
        await stop()


async def main(kind: str, url: str) -> None:
    # Replies on the original stdout; anything else printed (the driver's console log at
    # info, say) goes where stderr goes.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(line: str) -> None:
        out.write(line + "\n")

    contender = Contender(kind, url, reply)
    reply("ready")
    while line := await asyncio.to_thread(sys.stdin.readline):
        command, *args = line.split()
        if command == "start":
            await contender.start(args[0], int(args[1]))
            reply("started")
        elif command == "stop":
            cpu = time.process_time()
            await contender.stop()
            reply(f"stopped {cpu:.6f}")
        else:
            raise ValueError(f"unknown command {line!r}")


if __name__ == "__main__":
    kind, loop, url = sys.argv[1:4]
    if kind not in KINDS:
        raise SystemExit(f"KIND is one of {', '.join(KINDS)}, not {kind!r}")
    loops.run(main(kind, url), loop)
