"""Run log lines reach Conveyor over NATS as PROTOCOL.md section 4 Log entries: stored on
JetStream ``logs.<run_id>`` and relayed live on core ``live.logs.<run_id>.<driver>``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import nats.errors
from _helpers import TIMEOUT, driver_message, publish, raw_results, resource_json, wait_until
from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.typing import FilteringBoundLogger

from conveyor_driver import Context, Driver, Result
from conveyor_driver import protocol as p
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.testing.fixtures import running

LOG_KEYS = {"runid", "driver", "pipeline", "timestamp", "message"}
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


@contextlib.asynccontextmanager
async def live_lines(nc: Client, run_id: str, driver: str) -> AsyncIterator[list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []

    async def on_line(msg: Msg) -> None:
        lines.append(json.loads(msg.data))

    sub = await nc.subscribe(f"live.logs.{run_id}.{driver}", cb=on_line)
    await nc.flush()
    try:
        yield lines
    finally:
        await sub.unsubscribe()


async def stored_lines(nc: Client, run_id: str) -> list[dict[str, Any]]:
    """Every entry stored under ``logs.<run_id>``, in order, read once the driver stopped.

    The stream is a work queue, where consumers may not overlap: one ephemeral consumer,
    deleted afterwards (in tests no server consumer competes for the lines).
    """
    js = nc.jetstream()
    expected = (await js.stream_info(p.LOGS_STREAM)).state.messages
    sub = await js.pull_subscribe(p.log_subject(run_id), stream=p.LOGS_STREAM)
    entries: list[dict[str, Any]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while len(entries) < expected and loop.time() < deadline:
            with contextlib.suppress(nats.errors.TimeoutError):
                for msg in await sub.fetch(expected - len(entries), timeout=2):
                    entries.append(json.loads(msg.data))
                    await msg.ack()
        name = (await sub.consumer_info()).name
    finally:
        await sub.unsubscribe()
    await js.delete_consumer(p.LOGS_STREAM, name)
    return entries


def assert_log_shape(entry: dict[str, Any], *, run_id: str, driver: str, pipeline: str) -> None:
    assert set(entry) == LOG_KEYS
    assert (entry["runid"], entry["driver"], entry["pipeline"]) == (run_id, driver, pipeline)
    assert RFC3339.match(entry["timestamp"]), entry["timestamp"]
    assert datetime.fromisoformat(entry["timestamp"]).tzinfo is not None


async def test_run_lines_are_stored_and_relayed_with_the_server_shape(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("logger")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        ctx.log.info("cloning", repo=ctx.resource.spec["repo"], depth=1)
        ctx.log.warning("slow mirror", seconds=2.5)
        return Result.ok("built")

    resource = resource_json("app", pipeline="ci", spec={"repo": "https://example.com/a.git"})
    run_id, body = driver_message(resource)
    async with (
        raw_results(nats_client) as results,
        live_lines(nats_client, run_id, "logger") as live,
    ):
        async with running(driver, nats_server.url):
            await publish(nats_client, "resources.pipeline", body)
            await results.wait(run_id)
        stored = await stored_lines(nats_client, run_id)
        await wait_until(lambda: len(live) == len(stored), what="live lines")

    assert [entry["message"] for entry in stored] == [
        "cloning repo=https://example.com/a.git depth=1",
        "slow mirror level=warning seconds=2.5",
        "run succeeded result=built",
    ]
    for entry in stored:
        assert_log_shape(entry, run_id=run_id, driver="logger", pipeline="ci")
    timestamps = [datetime.fromisoformat(entry["timestamp"]) for entry in stored]
    assert timestamps == sorted(timestamps)
    assert live == stored


async def test_lines_of_a_sync_handler_arrive_too(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("threaded")
    threads: list[str] = []

    @driver.on("pipeline")
    def build(ctx: Context) -> None:
        threads.append(threading.current_thread().name)
        for step in (1, 2):
            ctx.log.info("compiling", step=step)

    run_id, body = driver_message(resource_json("app"))  # no pipeline: an empty one
    async with (
        raw_results(nats_client) as results,
        live_lines(nats_client, run_id, "threaded") as live,
    ):
        async with running(driver, nats_server.url):
            await publish(nats_client, "resources.pipeline", body)
            await results.wait(run_id)
        stored = await stored_lines(nats_client, run_id)
        await wait_until(lambda: len(live) == len(stored), what="live lines")

    assert threads != [threading.main_thread().name] and len(threads) == 1
    assert [entry["message"] for entry in stored] == [
        "compiling step=1",
        "compiling step=2",
        "run succeeded result=",
    ]
    for entry in stored:
        assert_log_shape(entry, run_id=run_id, driver="threaded", pipeline="")
    assert live == stored


async def test_shutdown_right_after_a_chatty_run_loses_no_line(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("chatty")
    logged = asyncio.Event()

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        for n in range(500):
            ctx.log.info("line", n=n)
        logged.set()

    run_id, body = driver_message(resource_json("app", pipeline="ci"))
    async with raw_results(nats_client) as results:
        async with running(driver, nats_server.url):
            await publish(nats_client, "resources.pipeline", body)
            # Stop while the lines are still queued: only the flush on close can save them.
            await asyncio.wait_for(logged.wait(), TIMEOUT)
        await results.wait(run_id)
        stored = await stored_lines(nats_client, run_id)

    messages = [entry["message"] for entry in stored]
    assert messages[:500] == [f"line n={n}" for n in range(500)]
    assert messages[500:] == ["run succeeded result="]
    assert {entry["runid"] for entry in stored} == {run_id}


async def test_lines_still_queued_at_shutdown_are_flushed(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("late")
    run_logs: list[FilteringBoundLogger] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        run_logs.append(ctx.log)

    # A sync hook never yields to the loop, and the sink is closed right after the hooks:
    # these 500 lines are all still queued when close() begins.
    @driver.on_shutdown
    def log_late() -> None:
        for n in range(500):
            run_logs[0].info("late", n=n)

    run_id, body = driver_message(resource_json("app"))
    async with raw_results(nats_client) as results:
        async with running(driver, nats_server.url):
            await publish(nats_client, "resources.pipeline", body)
            await results.wait(run_id)
        stored = await stored_lines(nats_client, run_id)

    messages = [entry["message"] for entry in stored]
    assert messages == ["run succeeded result="] + [f"late n={n}" for n in range(500)]
