"""Records of the standard ``logging`` module join the driver's chain, with the run's context."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from _loki_receiver import TIMEOUT, LokiReceiver
from nats.aio.client import Client
from nats.aio.msg import Msg

from conveyor_driver import Context, Driver, Resource, Result
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.logs.loki import LokiConfig
from conveyor_driver.logs.stdlib import bridged, run_scope, silence_bridge
from conveyor_driver.testing.fixtures import running

LIB = "tests.some.lib"


@pytest.fixture
def lib() -> Iterator[logging.Logger]:
    """A library's logger with its own level: pytest's root handlers keep the bridge from
    lowering the root level, as any application's own logging set-up would."""
    logger = logging.getLogger(LIB)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.setLevel(previous)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[LokiReceiver]:
    async with LokiReceiver() as server:
        yield server


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# -- the bridge on its own ------------------------------------------------------------------


def test_records_inside_a_run_scope_carry_the_run(lib: logging.Logger) -> None:
    out = io.StringIO()
    driver_log = build_logger(stream=out, fmt="json").bind(driver="d")
    with bridged(driver_log, logging.INFO):
        lib.info("outside %s", 0)
        with run_scope(driver_log.bind(run_id="run-1")):
            lib.warning("x %s", 1)
            try:
                raise ValueError("bad input")
            except ValueError:
                lib.exception("failed")
        lib.debug("below the library's level")
    lib.info("after the bridge is gone")

    lines = json_lines(out)
    assert [(line["event"], line["level"], line.get("run_id")) for line in lines] == [
        ("outside 0", "info", None),
        ("x 1", "warning", "run-1"),
        ("failed", "error", "run-1"),
    ]
    assert all(line["logger"] == LIB and line["driver"] == "d" for line in lines)
    assert lines[2]["exception"].startswith("Traceback")
    assert lines[2]["exception"].endswith("ValueError: bad input")


async def test_threads_started_with_the_context_carry_the_run(lib: logging.Logger) -> None:
    out = io.StringIO()
    driver_log = build_logger(stream=out, fmt="json")
    with bridged(driver_log, logging.INFO), run_scope(driver_log.bind(run_id="run-2")):
        context = contextvars.copy_context()
        await asyncio.get_running_loop().run_in_executor(
            None, context.run, lib.info, "from a thread"
        )
        # A thread started without the run's context is not the run's.
        await asyncio.get_running_loop().run_in_executor(None, lib.info, "bare thread")

    assert [(line["event"], line.get("run_id")) for line in json_lines(out)] == [
        ("from a thread", "run-2"),
        ("bare thread", None),
    ]


async def test_a_silenced_task_logs_nothing_through_the_bridge(lib: logging.Logger) -> None:
    out = io.StringIO()
    driver_log = build_logger(stream=out, fmt="json")

    async def sink_io() -> None:
        silence_bridge()
        lib.warning("from the sink's own task")

    with bridged(driver_log, logging.INFO):
        await asyncio.create_task(sink_io())
        lib.warning("from elsewhere")

    assert [line["event"] for line in json_lines(out)] == ["from elsewhere"]


def test_bridge_lowers_the_root_level_only_when_logging_is_unconfigured() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    driver_log = build_logger(stream=io.StringIO(), fmt="json")
    try:
        root.handlers = []
        root.setLevel(logging.WARNING)
        with bridged(driver_log, logging.DEBUG) as bridge:
            assert root.level == logging.DEBUG
            assert root.handlers == [bridge]
        assert (root.handlers, root.level) == ([], logging.WARNING)

        own = logging.NullHandler()
        root.handlers = [own]
        with bridged(driver_log, logging.DEBUG) as bridge:
            assert root.level == logging.WARNING  # the application's set-up wins
            assert root.handlers == [own, bridge]
        assert (root.handlers, root.level) == ([own], logging.WARNING)
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


# -- through the runtime: NATS and Loki -----------------------------------------------------


async def test_library_records_in_handlers_reach_nats_and_loki_with_the_run_id(
    nats_server: EmbeddedNats,
    nats_client: Client,
    receiver: LokiReceiver,
    lib: logging.Logger,
) -> None:
    driver = Driver("bridge-e2e", concurrency=2)

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        logging.getLogger(LIB).warning("x %s", 1)
        return Result.ok("async")

    @driver.on("task")
    def run_task(ctx: Context) -> Result:
        logging.getLogger(LIB).info("in a thread %s", 2)
        return Result.ok("sync")

    nats_entries: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        nats_entries.append(json.loads(msg.data))

    def nats_messages(run_id: str) -> list[str]:
        return [e["message"] for e in nats_entries if e["runid"] == run_id]

    await nats_client.subscribe("logs.>", cb=collect)
    config = LokiConfig(url=receiver.url, batch_wait=0.02, min_backoff=0.01, max_backoff=0.05)
    async with running(driver, nats_server.url, loki=config), watch_results(nats_client) as watch:
        lib.warning("outside %s", 3)
        pipeline = await emit_event(nats_client, Resource(name="app", type="pipeline"))
        task = await emit_event(nats_client, Resource(name="job", type="task"))
        for message in (pipeline, task):
            assert (await watch.wait(message.run_id, timeout=TIMEOUT)).driverresult.success
        await receiver.wait_for(
            lambda r: sum(1 for e in r.entries if e.line.startswith('msg="run succeeded"')) == 2
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while len(nats_messages(pipeline.run_id)) < 2 or len(nats_messages(task.run_id)) < 2:
            assert loop.time() < deadline, "run lines did not reach NATS"
            await asyncio.sleep(0.02)

    assert nats_messages(pipeline.run_id) == [
        f"x 1 level=warning logger={LIB}",
        "run succeeded result=async",
    ]
    assert nats_messages(task.run_id) == [
        f"in a thread 2 logger={LIB}",
        "run succeeded result=sync",
    ]
    # Outside a run a record is the driver's: console and Loki, never a run's NATS log.
    assert not any("outside" in e["message"] for e in nats_entries)

    def loki_entry(line: str) -> tuple[dict[str, str], dict[str, str] | None]:
        [entry] = [e for e in receiver.entries if e.line == line]
        return entry.labels, entry.metadata

    assert loki_entry(f'msg="x 1" logger={LIB}') == (
        {"service_name": "bridge-e2e", "level": "warning", "resource_type": "pipeline"},
        {
            "run_id": pipeline.run_id,
            "message_id": pipeline.id,
            "event": "create",
            "resource_name": "app",
        },
    )
    assert loki_entry(f'msg="in a thread 2" logger={LIB}') == (
        {"service_name": "bridge-e2e", "level": "info", "resource_type": "task"},
        {"run_id": task.run_id, "message_id": task.id, "event": "create", "resource_name": "job"},
    )
    assert loki_entry(f'msg="outside 3" logger={LIB}') == (
        {"service_name": "bridge-e2e", "level": "warning"},
        None,
    )
