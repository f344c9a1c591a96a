"""Run log lines reach Conveyor over NATS as Log entries (docs/protocol.md#logs): stored on
JetStream ``logs.<run_id>`` and relayed live on core ``live.logs.<run_id>.<driver>``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import re
import signal
import tempfile
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import nats.errors
import orjson
import pytest
from _helpers import TIMEOUT, driver_message, publish, raw_results, resource_json, wait_until
from apps.harness import CLI, DriverProcess, app, clean_env
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import trace
from structlog.typing import FilteringBoundLogger

from conveyor_driver import Context, Driver, Resource, Result
from conveyor_driver import protocol as p
from conveyor_driver.embedded import EmbeddedNats, find_nats_server, free_port
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.logs.nats import NatsLogSink
from conveyor_driver.runtime.publisher import Publisher
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
    return await _read_stored(nc, p.log_subject(run_id))


async def _read_stored(nc: Client, subject: str) -> list[dict[str, Any]]:
    js = nc.jetstream()
    expected = (await js.stream_info(p.LOGS_STREAM)).state.messages
    sub = await js.pull_subscribe(subject, stream=p.LOGS_STREAM)
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


# -- lines too big, refusals, shutdown ------------------------------------------------------

#: A span current while a line is logged: its entry carries it as ``traceparent``.
TRACE = trace.NonRecordingSpan(
    trace.SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
)


def marker(size: int) -> str:
    return f" …[truncated: the line was {size} bytes]"


async def all_stored(nc: Client) -> list[dict[str, Any]]:
    """Every entry in the ``logs-engine`` stream, whatever the run (one consumer, deleted)."""
    return await _read_stored(nc, "logs.>")


def messages_of(entries: list[dict[str, Any]], run_id: str) -> list[str]:
    return [entry["message"] for entry in entries if entry["runid"] == run_id]


class DirectSink:
    """A NATS sink on its own connection, with its warnings and its chain's output kept."""

    def __init__(self, nc: Client, driver: str = "direct") -> None:
        self.console = io.StringIO()
        self.sink = NatsLogSink(driver, console=build_logger(stream=self.console, fmt="json"))
        self.out = io.StringIO()
        self.log = build_logger(sinks=[self.sink], stream=self.out, fmt="json").bind(driver=driver)
        self.sink.start(Publisher(nc))

    def warnings(self) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self.console.getvalue().splitlines()]
        return [record for record in records if record["level"] == "warning"]


@contextlib.asynccontextmanager
async def nats_server_with_max_payload(max_payload: int) -> AsyncIterator[str]:
    """A nats-server with JetStream and the Conveyor streams, whose ``max_payload`` is not
    the default 1 MB: what the sink reads must come from the server."""
    with tempfile.TemporaryDirectory(prefix="conveyor-nats-") as tmp:
        port = free_port()
        config = Path(tmp) / "nats.conf"
        config.write_text(
            f'listen: "127.0.0.1:{port}"\nmax_payload: {max_payload}\n'
            f"jetstream {{ store_dir: {json.dumps(tmp)} }}\n"
        )
        log = (Path(tmp) / "nats.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            find_nats_server(), "-c", str(config), stdout=log, stderr=log, start_new_session=True
        )
        url = f"nats://127.0.0.1:{port}"
        try:

            async def connectable() -> bool:
                try:
                    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
                except Exception:
                    return False
                js = nc.jetstream()
                for stream in p.server_streams():
                    await js.add_stream(stream)
                await nc.close()
                return True

            await wait_until(connectable, what="nats-server listening")
            yield url
        finally:
            proc.terminate()
            await proc.wait()
            log.close()


async def test_a_line_over_max_payload_is_truncated_and_the_runs_after_it_still_log(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("big")

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        if ctx.resource.name == "huge":
            ctx.log.info("x" * 2_000_000)
        ctx.log.info("after", name=ctx.resource.name)

    huge_id, huge = driver_message(resource_json("huge"))
    next_id, following = driver_message(resource_json("next"))
    async with (
        raw_results(nats_client) as results,
        live_lines(nats_client, huge_id, "big") as huge_live,
        live_lines(nats_client, next_id, "big") as next_live,
    ):
        async with running(driver, nats_server.url):
            await publish(nats_client, "resources.pipeline", huge)
            await results.wait(huge_id)
            await publish(nats_client, "resources.pipeline", following)
            await results.wait(next_id)
            await wait_until(lambda: len(next_live) == 2, what="live lines of the next run")
        stored = await all_stored(nats_client)

    assert messages_of(stored, next_id) == ["after name=next", "run succeeded result="]
    big, *rest = messages_of(stored, huge_id)
    assert rest == ["after name=huge", "run succeeded result="]
    assert big.startswith("xxxx") and big.endswith(marker(2_000_000))
    [entry] = [e for e in stored if e["message"] == big]
    # As large as the server takes, and no larger.
    assert nats_client.max_payload - 200 < len(orjson.dumps(entry)) <= nats_client.max_payload
    assert [line["message"] for line in huge_live] == messages_of(stored, huge_id)


@pytest.mark.nats
async def test_the_limit_comes_from_the_server_and_counts_the_trace_headers() -> None:
    limit = 64 * 1024
    async with nats_server_with_max_payload(limit) as url:
        nc = await nats.connect(url)
        try:
            seen: list[Msg] = []

            async def on_line(msg: Msg) -> None:
                seen.append(msg)

            await nc.subscribe("live.logs.run-1.direct", cb=on_line)
            direct = DirectSink(nc)
            log = direct.log.bind(run_id="run-1")
            with trace.use_span(TRACE):
                log.info("y" * 100_000)
                log.info("after")
            await direct.sink.close()
            stored = await all_stored(nc)
            await wait_until(lambda: len(seen) == 2, what="2 live lines")
            reconnects = nc.stats["reconnects"]
        finally:
            await nc.close()

    assert [entry["message"] for entry in stored][1:] == ["after"]
    assert stored[0]["message"].endswith(marker(100_000))
    assert (direct.sink.sent, direct.sink.dropped) == (2, 0)
    # The server closes the connection of a client that sends more than max_payload,
    # headers included: it never had to.
    assert reconnects == 0
    assert seen[0].headers == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    }
    assert limit - 200 < len(seen[0].data) < limit
    assert direct.warnings() == []


async def test_an_entry_the_stream_refuses_is_dropped_once_and_warned_the_rest_goes_on(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    # A stream that takes at most 4 KiB a message: a refusal no retry can change.
    js = nats_client.jetstream()
    config = (await js.stream_info(p.LOGS_STREAM)).config
    await js.update_stream(dataclasses.replace(config, max_msg_size=4096))
    direct = DirectSink(nats_client)
    log = direct.log.bind(run_id="run-1")
    log.info("z" * 10_000)
    log.info("kept", n=1)
    await wait_until(lambda: direct.sink.sent + direct.sink.dropped == 2, what="first batch")
    log.info("z" * 20_000)
    log.info("kept", n=2)
    started = asyncio.get_running_loop().time()
    await direct.sink.close()
    closing = asyncio.get_running_loop().time() - started

    stored = await all_stored(nats_client)
    assert [entry["message"] for entry in stored] == ["kept n=1", "kept n=2"]
    assert (direct.sink.sent, direct.sink.dropped) == (2, 2)
    [warning] = direct.warnings()
    assert warning["event"] == "nats refused log lines; dropping such lines (warned once)"
    assert warning["lines"] == 1
    assert "message size exceeds maximum allowed" in warning["reason"]
    assert warning["sink"] == "nats"
    # The sink's own trouble stays off the chain it ships.
    assert "refused" not in direct.out.getvalue()
    assert closing < 5


async def test_a_line_that_is_not_utf8_is_published_with_replacement_characters(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    direct = DirectSink(nats_client)
    # Text decoded with surrogateescape: not UTF-8, so no JSON encoder takes it as it is.
    direct.sink(None, "info", {"run_id": "run-1", "event": "bad \udc80 bytes"})
    direct.log.bind(run_id="run-1").info("good")
    await direct.sink.close()

    stored = await all_stored(nats_client)
    assert [entry["message"] for entry in stored] == ["bad ? bytes", "good"]
    assert (direct.sink.sent, direct.sink.dropped) == (2, 0)


async def test_close_past_its_deadline_counts_what_is_left_and_a_second_close_is_quiet(
    nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        direct = DirectSink(nc)
        await nats_server.stop()  # NATS away: nothing can be stored
        log = direct.log.bind(run_id="run-1")
        for n in range(5):
            log.info("line", n=n)
        await direct.sink.close(timeout=0.5)
        await direct.sink.close()  # a second close returns at once
    finally:
        # The client's own close, server away (uvloop says RuntimeError).
        with contextlib.suppress(ConnectionError, RuntimeError):
            await nc.close()
    assert (direct.sink.sent, direct.sink.dropped) == (0, 5)


@pytest.mark.process
async def test_a_driver_process_logging_a_2mb_line_keeps_shipping_and_stops_cleanly(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    live: list[dict[str, Any]] = []

    async def on_line(msg: Msg) -> None:
        live.append(json.loads(msg.data))

    await nats_client.subscribe("live.logs.*.big-line", cb=on_line)
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "run",
        app("big_line_app.py:driver"),
        "--nats-url",
        nats_server.url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        start_new_session=True,
        limit=8 * 1024 * 1024,  # the console prints the 2 MB line whole, as one line
    )
    process = DriverProcess(proc)
    try:
        async with watch_results(nats_client) as watch:
            await process.started()
            spec = {"chars": 2_000_000, "lines": 1}
            huge = await emit_event(nats_client, Resource("huge", "job", spec=spec))
            await watch.wait(huge.run_id, timeout=TIMEOUT)
            runs = [
                await emit_event(nats_client, Resource(f"next-{n}", "job", spec={"lines": 2}))
                for n in range(2)
            ]
            for run in runs:
                await watch.wait(run.run_id, timeout=TIMEOUT)
            await wait_until(
                lambda: all(len(messages_of(live, run.run_id)) == 3 for run in runs),
                what="live lines of the runs after the big line",
            )
        loop = asyncio.get_running_loop()
        stopping = loop.time()
        process.send(signal.SIGTERM)
        code = await process.wait()
        stopped_in = loop.time() - stopping
    finally:
        await process.close()

    assert code == 0, process.output[-3000:]
    assert stopped_in < 8, f"stopped in {stopped_in:.1f}s"
    errors = "\n".join(line for line in process.stderr_lines if len(line) < 100_000)
    assert "Traceback" not in errors and "CancelledError" not in errors, errors
    stored = await all_stored(nats_client)
    for run in runs:
        assert messages_of(stored, run.run_id)[:2] == ["line n=0", "line n=1"]
        assert messages_of(stored, run.run_id) == messages_of(live, run.run_id)
    big, *rest = messages_of(stored, huge.run_id)
    assert big.endswith(marker(2_000_000))
    assert rest[0] == "line n=0" and rest[1].startswith("run succeeded")
    assert messages_of(live, huge.run_id) == messages_of(stored, huge.run_id)
