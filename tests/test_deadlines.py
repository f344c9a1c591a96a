"""Handler deadlines: an attempt past its ``timeout`` fails like any other, the run is
reported, and nothing the attempt started outlives it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from _helpers import raw_results, resource_json, send, settled, wait_until
from nats.aio.client import Client

from conveyor_driver import Context, Driver, Result
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.errors import ConfigurationError
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.outcomes import duration
from conveyor_driver.runtime.dispatcher import Delivery, HandlerThreads, Services, process
from conveyor_driver.telemetry import Telemetry
from conveyor_driver.testing import FakeConveyorClient, dispatch
from conveyor_driver.testing.fixtures import running

RESOURCE = {"name": "app", "resource": "pipeline", "spec": {}}


def test_durations_read_like_go() -> None:
    assert [duration(s) for s in (0.5, 30, 90, 600, 3725)] == [
        "0.5s",
        "30s",
        "1m30s",
        "10m0s",
        "1h2m5s",
    ]


@pytest.mark.parametrize("bad", [0, -1.0])
def test_a_deadline_must_be_positive(bad: float) -> None:
    with pytest.raises(ConfigurationError):
        Driver("d", timeout=bad)
    with pytest.raises(ConfigurationError):
        Driver("d").on("pipeline", timeout=bad)


async def test_an_async_handler_is_cancelled_at_its_deadline_and_the_attempt_fails() -> None:
    driver = Driver("slowpoke", timeout=0.3, max_attempts=2)
    cancelled: list[int] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(ctx.attempt)
            raise

    began = time.monotonic()
    first = await dispatch(driver, RESOURCE)
    assert time.monotonic() - began < 5
    assert (first.action, first.kind, first.result) == ("nak", "retry", None)
    last = await dispatch(driver, RESOURCE, attempt=2)
    assert (last.action, last.kind) == ("term", "gave_up")
    assert last.result == Result.fail("gave up after 2 attempts: timed out after 0.3s")
    assert cancelled == [1, 2]


async def test_a_handlers_own_timeout_error_is_not_its_deadline() -> None:
    driver = Driver("own-timeout", timeout=30, max_attempts=1)

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        raise TimeoutError("registry did not answer")

    report = await dispatch(driver, RESOURCE)
    assert report.result == Result.fail(
        "gave up after 1 attempt: TimeoutError: registry did not answer"
    )


async def test_the_handlers_timeout_wins_over_the_operators_over_the_drivers() -> None:
    driver = Driver("layered", timeout=100)
    seen: dict[str, float | None] = {}

    @driver.on("pipeline", timeout=5)
    async def build(ctx: Context) -> None:
        seen["pipeline"] = ctx.remaining()

    @driver.on("deployment")
    async def deploy(ctx: Context) -> None:
        seen["deployment"] = ctx.remaining()
        assert ctx.deadline is not None and ctx.deadline > time.monotonic()

    @driver.on("cleanup")
    async def cleanup(ctx: Context) -> None:
        seen["cleanup"] = ctx.remaining()

    services = Services(
        log=build_logger(level="error"), api=FakeConveyorClient(), telemetry=Telemetry(), timeout=20
    )
    for kind in ("pipeline", "deployment"):
        body = (
            b'{"event":"create","run_id":"r1","id":"m",'
            b'"payload":{"name":"a","resource":"' + kind.encode() + b'"}}'
        )
        await process(driver, Delivery(body, f"resources.{kind}"), services)
    await dispatch(driver, {"name": "a", "resource": "cleanup"})

    assert 4 < (seen["pipeline"] or 0) <= 5
    assert 19 < (seen["deployment"] or 0) <= 20  # the operator's --timeout
    assert 99 < (seen["cleanup"] or 0) <= 100  # the driver's own default


async def test_a_sync_handler_is_decided_at_its_deadline_and_its_thread_abandoned() -> None:
    driver = Driver("sleepy", timeout=0.3, max_attempts=1)
    release = threading.Event()
    threads: list[str] = []

    @driver.on("pipeline")
    def build(ctx: Context) -> str:
        threads.append(threading.current_thread().name)
        if ctx.resource.name == "stuck":
            release.wait(30)
        return "done"

    pool = HandlerThreads(max_workers=1, thread_name_prefix="sleepy")
    services = Services(
        log=build_logger(level="error"),
        api=FakeConveyorClient(),
        telemetry=Telemetry(),
        executor=pool,
    )

    def body(name: str) -> bytes:
        return (
            b'{"event":"create","run_id":"r-' + name.encode() + b'","id":"m",'
            b'"payload":{"name":"' + name.encode() + b'","resource":"pipeline"}}'
        )

    try:
        began = time.monotonic()
        stuck = await process(driver, Delivery(body("stuck"), "resources.pipeline"), services)
        assert time.monotonic() - began < 5
        assert stuck.outcome.result == Result.fail("gave up after 1 attempt: timed out after 0.3s")
        assert pool.abandoned == 1
        # The abandoned thread still sleeps, yet the next sync run gets a thread.
        fine = await process(driver, Delivery(body("fine"), "resources.pipeline"), services)
        assert fine.outcome.result == Result.ok(data="done")
        assert len(set(threads)) == 2
    finally:
        release.set()
        pool.shutdown(wait=True)


async def test_at_the_deadline_ctx_run_children_are_stopped_and_the_slot_freed(
    nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    driver = Driver("deadlined", timeout=1.0, max_attempts=1, kill_grace=1.0)
    child = tmp_path / "child.pid"

    @driver.on("pipeline")
    async def build(ctx: Context) -> str:
        if ctx.resource.name == "hangs":
            await ctx.run(f"sleep 300 & echo $! > {child}; wait")
        return "quick"

    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        hung = await send(nats_client, resource_json("hangs"))
        await results.wait(hung, timeout=30)
        quick = await send(nats_client, resource_json("quick"))
        await results.wait(quick, timeout=30)
        await wait_until(lambda: settled(nats_client, "deadlined"), what="all settled")

    (failure,) = results.for_run(hung)
    assert failure["driverresult"]["message"] == "gave up after 1 attempt: timed out after 1s"
    assert results.for_run(quick)[0]["driverresult"]["data"] == "quick"
    pid = int(child.read_text())

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    await wait_until(gone, what="the command's child stopped")
