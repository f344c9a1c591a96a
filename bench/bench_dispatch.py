"""Dispatch throughput: the framework against a hand-written nats-py loop, in one run.

Both sides consume the same pre-loaded events (DriverMessages as the Conveyor server sends
them: payload as a JSON string, on ``resources.<type>``) from a durable pull consumer with
the framework's configuration, publish one PipelineEvent per event to
``pipelines.driver.result``, await its PubAck and only then ack. The handler does nothing,
so what is measured is the cost of the machinery around it.

Environment:
    BENCH_N         events per scenario run (default 5000)
    BENCH_ROUNDS    rounds per scenario; the median is reported (default 5)
    BENCH_PROFILE   ``1``: afterwards, profile one framework run per concurrency (cProfile)

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from conveyor_driver import Context, Driver, protocol
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.models import DriverMessage, Resource, encode_driver_message
from conveyor_driver.testing import running

N = int(os.environ.get("BENCH_N", "5000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")
CONCURRENCIES = (1, 64)
TARGET = 0.8
#: The run ledger's cost targets (issue 10): ledger on / off, by concurrency.
LEDGER_TARGETS = {1: 0.6, 64: 0.75}
RESOURCE_TYPE = "pipeline"
ACK_WAIT = 30.0
WARMUP_N = 300
#: Completion is observed by polling the consumer; a short interval bounds the error at
#: both ends of a run (at most one interval each) while costing the event loop little.
POLL_START = 0.002
POLL_RUNNING = 0.010
RUN_TIMEOUT = 600.0


@dataclass(frozen=True)
class Run:
    """One scenario run: wall time from first delivery to last ack, and this process's CPU."""

    events: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_us(self) -> float:
        """CPU microseconds per event in this process (the nats-server's not included)."""
        return self.cpu_seconds / self.events * 1e6


Runner = Callable[[str, Client, str, int, list[bytes]], Awaitable[Run]]


def make_events(n: int) -> list[bytes]:
    """Encoded DriverMessages shaped like the server's, distinct run ids."""
    bodies = []
    for i in range(n):
        resource = Resource(
            name=f"app-{i}",
            type=RESOURCE_TYPE,
            id=str(uuid.uuid4()),
            metadata={"version": "1"},
            spec={"repo": "https://example.com/app.git", "command": "make build"},
        )
        message = DriverMessage(
            event="create", payload=resource, run_id=str(uuid.uuid4()), id=str(uuid.uuid4())
        )
        bodies.append(encode_driver_message(message))
    return bodies


async def create_consumer(js: JetStreamContext, name: str) -> None:
    config = protocol.consumer_config(name, [RESOURCE_TYPE], ACK_WAIT)
    await js.add_consumer(protocol.MESSAGES_STREAM, config)


async def preload(js: JetStreamContext, bodies: list[bytes]) -> None:
    """Publish every event before consuming starts, so publish speed is not measured.

    The consumer must already exist: ``messages`` has interest retention and would drop
    events nobody is interested in.
    """
    subject = protocol.resource_subject(RESOURCE_TYPE)
    futures = [await js.publish_async(subject, body) for body in bodies]
    await asyncio.gather(*futures)


async def consumer_state(nc: Client, name: str) -> dict[str, object]:
    # A raw request: nats-py's consumer_info builds dataclasses and parses dates, and this
    # runs every few milliseconds on the same event loop as the code being measured.
    reply = await nc.request(
        f"$JS.API.CONSUMER.INFO.{protocol.MESSAGES_STREAM}.{name}", b"", timeout=5
    )
    state: dict[str, object] = orjson.loads(reply.data)
    if "error" in state:
        raise RuntimeError(f"consumer info for {name}: {state['error']}")
    return state


async def time_consumption(nc: Client, name: str, n: int, runner: asyncio.Task[None]) -> Run:
    """Time from the first delivery until every event is delivered and acked.

    Start: the last poll that saw nothing delivered; end: the first poll that saw all acked.
    Each end is off by at most one poll interval, the same way for both sides. The consumer
    is asked rather than the results counted, because a subscription on the result subject
    would add a callback per event to the event loop being measured, and because the run
    is over only when the last ack has reached the server.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RUN_TIMEOUT
    started: float | None = None
    before = time.perf_counter()
    cpu_before = time.process_time()
    while loop.time() < deadline:
        if runner.done():
            runner.result()  # a crashed runner should fail the bench, not hang it
        state = await consumer_state(nc, name)
        now = time.perf_counter()
        cpu_now = time.process_time()
        delivered = state["delivered"]
        assert isinstance(delivered, dict)
        if started is None:
            if delivered["consumer_seq"] == 0:
                before, cpu_before = now, cpu_now
                await asyncio.sleep(POLL_START)
                continue
            started = before
        if state["num_pending"] == 0 and state["num_ack_pending"] == 0:
            if delivered["consumer_seq"] != n or state.get("num_redelivered"):
                raise RuntimeError(f"{name}: expected {n} single deliveries, got {state}")
            return Run(n, now - started, cpu_now - cpu_before)
        await asyncio.sleep(POLL_RUNNING)
    raise TimeoutError(f"{name}: not done within {RUN_TIMEOUT}s")


# --- the framework -----------------------------------------------------------------------


async def run_framework(
    url: str, nc: Client, name: str, concurrency: int, bodies: list[bytes], *, ledger: bool = True
) -> Run:
    js = nc.jetstream()
    driver = Driver(name, concurrency=concurrency, ack_wait=ACK_WAIT, ledger=ledger)

    @driver.on(RESOURCE_TYPE)
    async def noop(ctx: Context) -> None:
        return None

    await create_consumer(js, name)
    await preload(js, bodies)
    async with running(driver, url, log_level="warning") as task:
        return await time_consumption(nc, name, len(bodies), task)


async def run_framework_without_ledger(
    url: str, nc: Client, name: str, concurrency: int, bodies: list[bytes]
) -> Run:
    """The framework with ``Driver(ledger=False)``: what the run ledger costs."""
    return await run_framework(url, nc, name, concurrency, bodies, ledger=False)


# --- the hand-written baseline -----------------------------------------------------------


async def baseline_loop(url: str, name: str, concurrency: int, n: int) -> None:
    """The same protocol written directly against nats-py, with nothing around it."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind(durable=name, stream=protocol.MESSAGES_STREAM)

    async def handle(msg: Msg) -> None:
        body = orjson.loads(msg.data)
        payload = body["payload"]
        resource = orjson.loads(payload) if isinstance(payload, str) else payload
        result = orjson.dumps(
            {
                "event": protocol.RESULT_EVENT,
                "run_id": body["run_id"],
                "resource": resource,
                "driverresult": {"success": True, "message": "", "data": None, "driver": name},
            }
        )
        await js.publish(protocol.RESULT_SUBJECT, result)
        await msg.ack()

    handled = 0
    try:
        while handled < n:
            try:
                msgs = await psub.fetch(concurrency, timeout=5)
            except NatsTimeoutError:
                continue
            if len(msgs) == 1:
                await handle(msgs[0])
            else:
                await asyncio.gather(*(handle(msg) for msg in msgs))
            handled += len(msgs)
    finally:
        await nc.close()


async def run_baseline(
    url: str, nc: Client, name: str, concurrency: int, bodies: list[bytes]
) -> Run:
    js = nc.jetstream()
    await create_consumer(js, name)
    await preload(js, bodies)
    task = asyncio.create_task(baseline_loop(url, name, concurrency, len(bodies)))
    try:
        run = await time_consumption(nc, name, len(bodies), task)
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    await task
    return run


# --- orchestration -----------------------------------------------------------------------


async def reset(js: JetStreamContext, name: str, n: int) -> None:
    """Leave the server as the next scenario expects it: no consumer, empty streams.

    The result count doubles as a check that each event produced exactly one result.
    """
    results = (await js.stream_info(protocol.PIPELINE_STREAM)).state.messages
    await js.delete_consumer(protocol.MESSAGES_STREAM, name)
    for stream in (protocol.MESSAGES_STREAM, protocol.PIPELINE_STREAM, protocol.LOGS_STREAM):
        await js.purge_stream(stream)
    if results != n:
        raise RuntimeError(f"{name}: {results} result events for {n} events")


async def measure(
    url: str, nc: Client, runner: Runner, name: str, concurrency: int, bodies: list[bytes]
) -> Run:
    """One run, then a clean server for the next."""
    try:
        run = await runner(url, nc, name, concurrency, bodies)
    except BaseException:
        with contextlib.suppress(Exception):
            await reset(nc.jetstream(), name, len(bodies))
        raise
    await reset(nc.jetstream(), name, len(bodies))
    return run


async def profile_framework(url: str, nc: Client, concurrency: int, bodies: list[bytes]) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run = await measure(url, nc, run_framework, f"profile-c{concurrency}", concurrency, bodies)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    print(f"\n=== cProfile: framework, concurrency {concurrency} ({run.rate:,.0f} msgs/s profiled)")
    print(out.getvalue())


async def main() -> int:
    print(f"bench: {N} events per run, {ROUNDS} rounds, concurrency {CONCURRENCIES}")
    bodies = make_events(N)
    sides: dict[str, Runner] = {
        "framework": run_framework,
        "no-ledger": run_framework_without_ledger,
        "baseline": run_baseline,
    }
    runs: dict[tuple[str, int], list[Run]] = {
        (side, c): [] for side in sides for c in CONCURRENCIES
    }
    async with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        try:
            # First runs pay for imports, cattrs' generated functions and the server's
            # first stream writes; neither side should be charged for that.
            for side, runner in sides.items():
                for c in CONCURRENCIES:
                    await measure(
                        server.url, nc, runner, f"warmup-{side}-c{c}", c, bodies[:WARMUP_N]
                    )
            for round_no in range(1, ROUNDS + 1):
                # Alternate who goes first, so drift (a busy neighbour, a warming disk)
                # does not always favour the same side.
                order = list(sides.items())
                if round_no % 2 == 0:
                    order.reverse()
                for c in CONCURRENCIES:
                    for side, runner in order:
                        name = f"{side}-c{c}-r{round_no}"
                        run = await measure(server.url, nc, runner, name, c, bodies)
                        runs[side, c].append(run)
                        print(
                            f"  {name:<20} {run.rate:>9,.0f} msgs/s  {run.cpu_us:>6,.0f} us CPU/msg"
                        )
            report(runs)
            if PROFILE:
                for c in CONCURRENCIES:
                    await profile_framework(server.url, nc, c, bodies)
        finally:
            await nc.close()
    return 0


def report(runs: dict[tuple[str, int], list[Run]]) -> None:
    print()
    print(
        f"{'scenario':<16} {'framework msgs/s':>17} {'baseline msgs/s':>16} {'ratio':>6}"
        f" {'(per round)':>12}  {'CPU us/msg fw/base':>18}"
    )
    missed = []
    # The baseline keeps no run ledger, so the like-for-like comparison is the framework
    # with its ledger off; what the ledger costs is reported below it.
    for c in CONCURRENCIES:
        framework = statistics.median(run.rate for run in runs["no-ledger", c])
        baseline = statistics.median(run.rate for run in runs["baseline", c])
        ratio = framework / baseline
        # Each round runs both sides back to back, so their ratio is less exposed to a
        # neighbour's load than the medians are; its spread shows how noisy the machine was.
        pairs = zip(runs["no-ledger", c], runs["baseline", c], strict=True)
        paired = [f.rate / b.rate for f, b in pairs]
        spread = f"{min(paired):.2f}-{max(paired):.2f}"
        cpu_fw = statistics.median(run.cpu_us for run in runs["no-ledger", c])
        cpu_base = statistics.median(run.cpu_us for run in runs["baseline", c])
        verdict = "ok" if ratio >= TARGET else "BELOW TARGET"
        if ratio < TARGET:
            missed.append(c)
        scenario = f"concurrency {c}"
        print(
            f"{scenario:<16} {framework:>17,.0f} {baseline:>16,.0f} {ratio:>6.2f} {spread:>12}"
            f"  {cpu_fw:>8,.0f} / {cpu_base:<7,.0f}  {verdict}"
        )
    print(
        f"(framework with ledger=False, as the baseline keeps none; medians of {ROUNDS} rounds"
        f" of {N} events; target: ratio >= {TARGET})"
    )
    print()
    print("the run ledger's cost: framework (ledger on) / framework with ledger=False")
    for c in CONCURRENCIES:
        on = statistics.median(run.rate for run in runs["framework", c])
        off = statistics.median(run.rate for run in runs["no-ledger", c])
        pairs = zip(runs["framework", c], runs["no-ledger", c], strict=True)
        paired = [f.rate / b.rate for f, b in pairs]
        cpu_on = statistics.median(run.cpu_us for run in runs["framework", c])
        cpu_off = statistics.median(run.cpu_us for run in runs["no-ledger", c])
        target = LEDGER_TARGETS.get(c)
        verdict = "" if target is None else ("ok" if on / off >= target else "BELOW TARGET")
        print(
            f"  concurrency {c:<4} {on:>9,.0f} / {off:>9,.0f} msgs/s = {on / off:.2f}"
            f" ({min(paired):.2f}-{max(paired):.2f})  CPU {cpu_on:,.0f} / {cpu_off:,.0f} us/msg"
            f"  target >= {target}: {verdict}"
        )
    if missed:
        settings = ", ".join(str(c) for c in missed)
        print(f"below target at concurrency {settings}")
    else:
        print("target met at every concurrency")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
