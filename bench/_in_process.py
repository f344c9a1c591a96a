"""The framework served in the benchmark's own process: for cProfile, and ``bench_telemetry.py``.

Here the process measured is also the one that watches for the end of the run, so its
CPU count includes that polling; ``bench_dispatch.py`` runs its contenders apart instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import io
import pstats
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from _events import ACK_WAIT, RESOURCE_TYPE, consumer_state, create_consumer, preload, reset
from nats.aio.client import Client

from conveyor_driver import Context, Driver
from conveyor_driver.testing import running

RUN_TIMEOUT = 600.0
#: Completion is polled from the event loop being measured: seldom while the run goes on.
POLL_START = 0.002
POLL_RUNNING = 0.010


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
