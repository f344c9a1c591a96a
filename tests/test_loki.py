"""The Loki sink against a receiver as strict as Loki, directly and through the runtime."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, TypedDict

import pytest
import pytest_asyncio
from _helpers import NatsLogs, wait_until
from _loki_receiver import TIMEOUT, Entry, LokiReceiver
from nats.aio.client import Client
from structlog.typing import FilteringBoundLogger

from conveyor_driver import Context, Driver, Resource, Result
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.logs.loki import LokiConfig, LokiSink, LokiStats
from conveyor_driver.testing.fixtures import running

RUN_KEYS = {
    "driver": "builder",
    "run_id": "run-1",
    "message_id": "msg-1",
    "event_name": "create",
    "resource_type": "pipeline",
    "resource_name": "app",
}
RUN_METADATA = {"run_id": "run-1", "message_id": "msg-1", "event": "create", "resource_name": "app"}


# Small backoffs: retries must happen, but a test must not wait Promtail-sized delays.
class _Fast(TypedDict):
    min_backoff: float
    max_backoff: float
    batch_wait: float


FAST: _Fast = {"min_backoff": 0.01, "max_backoff": 0.05, "batch_wait": 0.02}


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[LokiReceiver]:
    async with LokiReceiver() as server:
        yield server


class Shipping:
    """A sink with its chain: ``log`` writes to ``out``; the sink's own warnings to ``console``."""

    def __init__(self, url: str, **config: Any) -> None:
        self.out = io.StringIO()
        self.console = io.StringIO()
        self.sink = LokiSink(
            LokiConfig(url=url, **{**FAST, **config}),
            service_name="builder",
            console=build_logger(stream=self.console, fmt="json"),
        )
        self.log: FilteringBoundLogger = build_logger(
            sinks=[self.sink], stream=self.out, fmt="json"
        ).bind(driver="builder")

    def run_log(self) -> FilteringBoundLogger:
        return self.log.bind(**RUN_KEYS)

    def console_events(self, event: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.console.getvalue().splitlines()]
        return [line for line in lines if line["event"] == event]


def shape(entries: list[Entry]) -> list[tuple[dict[str, str], str, dict[str, str] | None]]:
    """Entries without their timestamps, ordered by line (streams of one push have no order)."""
    return sorted(((e.labels, e.line, e.metadata) for e in entries), key=lambda t: t[1])


async def test_labels_are_bounded_and_run_values_are_structured_metadata(
    receiver: LokiReceiver,
) -> None:
    shipping = Shipping(receiver.url, labels={"env": "prod", "team": "ci"})
    shipping.sink.start()
    shipping.run_log().info("building", step=1)
    shipping.run_log().warning("slow disk", free="1 GB")
    shipping.log.info("driver started", concurrency=2)
    await shipping.sink.close()

    run_labels = {
        "service_name": "builder",
        "resource_type": "pipeline",
        "env": "prod",
        "team": "ci",
    }
    assert shape(receiver.entries) == [
        (
            {"service_name": "builder", "level": "info", "env": "prod", "team": "ci"},
            'msg="driver started" concurrency=2',
            None,
        ),
        ({**run_labels, "level": "warning"}, 'msg="slow disk" free="1 GB"', RUN_METADATA),
        ({**run_labels, "level": "info"}, "msg=building step=1", RUN_METADATA),
    ]
    assert receiver.invalid == []
    assert shipping.sink.stats == LokiStats(shipped=3, retried=0, dropped=0)
    # The sink copies what it ships: the console line further down the chain keeps its keys.
    console_line = json.loads(shipping.out.getvalue().splitlines()[0])
    assert console_line["run_id"] == "run-1" and console_line["resource_name"] == "app"


async def test_without_structured_metadata_run_values_go_into_the_line(
    receiver: LokiReceiver,
) -> None:
    shipping = Shipping(receiver.url, structured_metadata=False)
    shipping.sink.start()
    shipping.run_log().info("building", step=1)
    await shipping.sink.close()

    assert shape(receiver.entries) == [
        (
            {"service_name": "builder", "level": "info", "resource_type": "pipeline"},
            "msg=building run_id=run-1 message_id=msg-1 event_name=create resource_name=app step=1",
            None,  # the value had two elements: Loki 2.x refuses a third
        )
    ]


async def test_json_line_format(receiver: LokiReceiver) -> None:
    shipping = Shipping(receiver.url, line_format="json")
    shipping.sink.start()
    shipping.run_log().info("building", step=1, tags=["a", "b"], note='say "hi"')
    await shipping.sink.close()

    [entry] = receiver.entries
    assert json.loads(entry.line) == {
        "msg": "building",
        "step": 1,
        "tags": ["a", "b"],
        "note": 'say "hi"',
    }
    assert entry.metadata == RUN_METADATA


async def test_the_entry_own_timestamp_is_sent_not_the_send_time(receiver: LokiReceiver) -> None:
    shipping = Shipping(receiver.url, batch_wait=0.3)
    shipping.sink.start()
    before = time.time_ns()
    shipping.run_log().info("first")
    between = time.time_ns()
    shipping.run_log().info("second")
    after = time.time_ns()
    await shipping.sink.close()

    first, second = receiver.entries
    assert (first.line, second.line) == ("msg=first", "msg=second")
    # The push happens after `after` was read (no await in between), so a send-time stamp
    # would exceed it.
    assert before <= int(first.timestamp) <= between <= int(second.timestamp) <= after


async def test_no_tenant_or_auth_headers_unless_configured(receiver: LokiReceiver) -> None:
    shipping = Shipping(receiver.url)
    shipping.sink.start()
    shipping.log.info("hello")
    await shipping.sink.close()

    assert receiver.headers == [
        {"Content-Encoding": "gzip", "Content-Type": "application/json"},
    ]


async def test_tenant_header_and_basic_auth(receiver: LokiReceiver) -> None:
    shipping = Shipping(receiver.url, tenant="team-a", username="loki", password="s3cret:x")
    shipping.sink.start()
    shipping.log.info("hello")
    await shipping.sink.close()

    [headers] = receiver.headers
    assert headers["X-Scope-OrgID"] == "team-a"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"loki:s3cret:x").decode()
    assert receiver.lines() == ["msg=hello"]


async def test_bearer_token(receiver: LokiReceiver) -> None:
    shipping = Shipping(receiver.url, token="tok-123")
    shipping.sink.start()
    shipping.log.info("hello")
    await shipping.sink.close()

    [headers] = receiver.headers
    assert headers["Authorization"] == "Bearer tok-123"
    assert "X-Scope-OrgID" not in headers


@pytest.mark.parametrize(("status", "failures"), [(429, 1), (500, 2), (503, 1)])
async def test_429_and_5xx_are_retried_and_nothing_is_lost(
    receiver: LokiReceiver, status: int, failures: int
) -> None:
    receiver.answer_next(status, failures)
    shipping = Shipping(receiver.url)
    shipping.sink.start()
    for i in range(5):
        shipping.run_log().info("line", i=i)
    await shipping.sink.close()

    assert receiver.attempts == failures + 1
    assert receiver.accepted == 1
    assert receiver.lines() == [f"msg=line i={i}" for i in range(5)]
    assert shipping.sink.stats == LokiStats(shipped=5, retried=5 * failures, dropped=0)
    [report] = shipping.console_events("loki shipping finished")
    assert (report["shipped"], report["retried"], report["dropped"]) == (5, 5 * failures, 0)


async def test_400_is_not_retried_counted_as_dropped_and_warned_once(
    receiver: LokiReceiver,
) -> None:
    receiver.answer_next(400, 2, text="entry too far behind")
    shipping = Shipping(receiver.url)
    shipping.sink.start()
    for i in range(3):
        shipping.run_log().info("rejected", i=i)
    await receiver.wait_for(lambda r: r.attempts == 1)
    for i in range(2):
        shipping.run_log().info("rejected too", i=i)
    await receiver.wait_for(lambda r: r.attempts == 2)
    shipping.run_log().info("kept")
    await shipping.sink.close()

    assert receiver.attempts == 3  # one push per batch: no retry of a 400
    assert receiver.lines() == ["msg=kept"]
    assert shipping.sink.stats == LokiStats(shipped=1, retried=0, dropped=5)
    warnings = shipping.console_events(
        "loki rejected a batch; dropping rejected batches (warned once)"
    )
    assert len(warnings) == 1
    assert warnings[0]["status"] == 400
    assert warnings[0]["error"] == "entry too far behind"
    assert warnings[0]["lines"] == 3
    assert warnings[0]["level"] == "warning"
    # The sink's own trouble stays on its console: it is never fed back into what it ships.
    assert "rejected a batch" not in shipping.out.getvalue()
    [report] = shipping.console_events("loki shipping finished")
    assert (report["shipped"], report["retried"], report["dropped"]) == (1, 0, 5)


async def test_loki_down_for_the_whole_run_neither_fails_nor_blocks_a_handler() -> None:
    shipping = Shipping(f"http://127.0.0.1:{free_port()}", flush_timeout=2.0)
    shipping.sink.start()

    async def handler(log: FilteringBoundLogger) -> str:
        for i in range(200):
            log.info("step", i=i)
            if i % 50 == 0:
                await asyncio.sleep(0)  # give the shipper its chances to try
        return "built"

    assert await handler(shipping.run_log()) == "built"
    await shipping.sink.close()

    assert shipping.sink.stats.shipped == 0
    assert shipping.sink.stats.dropped == 200
    # Every console line of the handler got through the chain despite Loki being away.
    assert len(shipping.out.getvalue().splitlines()) == 200
    [report] = shipping.console_events("loki shipping finished")
    assert (report["shipped"], report["dropped"]) == (0, 200)


async def test_full_queue_drops_the_oldest_lines_and_counts_them(receiver: LokiReceiver) -> None:
    shipping = Shipping(receiver.url, max_queue=3)
    shipping.sink.start()
    # No await between the calls: the shipper cannot drain the queue meanwhile.
    for i in range(10):
        shipping.run_log().info("line", i=i)
    await shipping.sink.close()

    assert receiver.lines() == ["msg=line i=7", "msg=line i=8", "msg=line i=9"]
    assert shipping.sink.stats == LokiStats(shipped=3, retried=0, dropped=7)


async def test_close_flushes_pending_lines_and_reports_once(receiver: LokiReceiver) -> None:
    shipping = Shipping(receiver.url, batch_wait=600.0)
    shipping.sink.start()
    for i in range(5):
        shipping.run_log().info("pending", i=i)
    await shipping.sink.close()
    await shipping.sink.close()

    assert receiver.lines() == [f"msg=pending i={i}" for i in range(5)]
    assert receiver.attempts == 1
    [report] = shipping.console_events("loki shipping finished")
    assert (report["shipped"], report["retried"], report["dropped"]) == (5, 0, 0)


async def test_batches_are_cut_by_size(receiver: LokiReceiver) -> None:
    shipping = Shipping(receiver.url, batch_bytes=1024, batch_wait=600.0)
    shipping.sink.start()
    for i in range(100):
        shipping.run_log().info("line", i=i)
    await shipping.sink.close()

    assert receiver.lines() == [f"msg=line i={i}" for i in range(100)]
    assert receiver.accepted > 1


async def test_lines_from_many_threads_reach_loki_in_time_order(receiver: LokiReceiver) -> None:
    shipping = Shipping(receiver.url)
    shipping.sink.start()
    log = shipping.run_log()

    def write(thread: int) -> None:
        for i in range(300):
            log.info("line", thread=thread, i=i)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    await asyncio.gather(*(asyncio.to_thread(t.join) for t in threads))
    await shipping.sink.close()

    # The receiver refuses a push whose stream is out of time order.
    assert receiver.invalid == []
    assert shipping.sink.stats == LokiStats(shipped=1200, retried=0, dropped=0)
    for n in range(4):
        mine = [line for line in receiver.lines() if f"thread={n} " in line]
        assert mine == [f"msg=line thread={n} i={i}" for i in range(300)]


def marker(size: int) -> str:
    return f" …[truncated: the line was {size} bytes]"


async def test_a_line_over_loki_max_line_size_is_truncated_with_its_size(
    receiver: LokiReceiver,
) -> None:
    shipping = Shipping(receiver.url)
    shipping.sink.start()
    shipping.run_log().info("before")
    shipping.run_log().info("x" * 300_000)
    shipping.run_log().info("after")
    await shipping.sink.close()

    assert receiver.invalid == []
    before, big, after = receiver.lines()
    assert (before, after) == ("msg=before", "msg=after")
    # "msg=" and 300,000 x: cut to Loki's default limit, 256,000 bytes, marker included.
    assert big.startswith("msg=xxxx") and big.endswith(marker(300_004))
    assert len(big.encode()) == 256_000
    assert shipping.sink.stats == LokiStats(shipped=3, retried=0, dropped=0)
    # The console keeps the whole line.
    assert any(len(line) > 300_000 for line in shipping.out.getvalue().splitlines())


async def test_max_line_size_is_configurable_and_the_cut_falls_between_characters() -> None:
    async with LokiReceiver(max_line_size=1000) as receiver:
        shipping = Shipping(receiver.url, max_line_size=1000, line_format="json")
        shipping.sink.start()
        shipping.run_log().info("é" * 2000)
        shipping.run_log().info("short")
        await shipping.sink.close()

    assert receiver.invalid == []
    big, short = receiver.lines()
    assert json.loads(short) == {"msg": "short"}
    whole = len('{"msg":""}') + 2 * 2000  # é unescaped, in its two UTF-8 bytes
    assert big.endswith(marker(whole))
    assert 1000 - 2 <= len(big.encode()) <= 1000  # é is two bytes: never half of one
    assert set(big.removesuffix(marker(whole))) <= set('{"msg:é')
    assert shipping.sink.stats == LokiStats(shipped=2, retried=0, dropped=0)


async def test_a_4xx_from_loki_does_not_stall_the_lines_behind_it() -> None:
    # A Loki with a lower limit than the sink was told: it refuses, as Loki does, with 400.
    async with LokiReceiver(max_line_size=1000) as receiver:
        shipping = Shipping(receiver.url, max_line_size=5000)
        shipping.sink.start()
        shipping.run_log().info("x" * 3000)
        shipping.run_log().info("same batch")
        await receiver.wait_for(lambda r: r.attempts == 1)
        for i in range(3):
            shipping.run_log().info("later", i=i)
        await shipping.sink.close()

    [reason] = receiver.invalid
    assert reason.startswith("Max entry size '1000' bytes exceeded for stream '{")
    assert reason.endswith("while adding an entry with length '3004' bytes")
    # Loki keeps the valid lines of a push it answers 400 to; the batches after it ship.
    assert receiver.lines() == ['msg="same batch"', *(f"msg=later i={i}" for i in range(3))]
    assert receiver.attempts == 2
    [warning] = shipping.console_events(
        "loki rejected a batch; dropping rejected batches (warned once)"
    )
    assert warning["status"] == 400 and warning["error"] == reason


async def test_a_line_json_cannot_carry_is_dropped_alone_and_shipping_goes_on(
    receiver: LokiReceiver,
) -> None:
    shipping = Shipping(receiver.url)
    shipping.sink.start()
    # Text decoded with surrogateescape: not UTF-8, so no JSON encoder takes it.
    shipping.sink(None, "info", {"event": "bad \udc80 bytes", "level": "info"})
    shipping.log.info("good")
    await shipping.sink.close()

    assert receiver.lines() == ["msg=good"]
    assert shipping.sink.stats == LokiStats(shipped=1, retried=0, dropped=1)
    [warning] = shipping.console_events(
        "loki cannot encode a log line; dropping such lines (warned once)"
    )
    assert "surrogates" in warning["error"]


# -- through the runtime --------------------------------------------------------------------


async def test_runtime_ships_run_and_driver_lines_to_loki_and_nats(
    nats_server: EmbeddedNats,
    nats_client: Client,
    receiver: LokiReceiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    driver = Driver("loki-e2e")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        ctx.log.info("building", step=1)
        return Result.ok("built")

    nats_logs = NatsLogs()
    await nats_client.subscribe("logs.>", cb=nats_logs.on_message)
    config = LokiConfig(url=receiver.url, labels={"env": "test"}, **FAST)
    async with running(driver, nats_server.url, loki=config), watch_results(nats_client) as watch:
        message = await emit_event(nats_client, Resource(name="app", type="pipeline"))
        result = await watch.wait(message.run_id, timeout=TIMEOUT)
        await receiver.wait_for(lambda r: 'msg="run succeeded" result=built' in r.lines())
        await wait_until(lambda: len(nats_logs.messages(message.run_id)) == 2, what="2 NATS lines")
    assert result.driverresult.success

    metadata = {
        "run_id": message.run_id,
        "message_id": message.id,
        "event": "create",
        "resource_name": "app",
    }
    labels = {"service_name": "loki-e2e", "level": "info", "resource_type": "pipeline"}
    run_entries = [e for e in receiver.entries if e.metadata == metadata]
    assert [(e.labels, e.line) for e in run_entries] == [
        ({**labels, "env": "test"}, "msg=building step=1"),
        ({**labels, "env": "test"}, 'msg="run succeeded" result=built'),
    ]
    assert nats_logs.messages(message.run_id) == ["building step=1", "run succeeded result=built"]
    assert {e["runid"] for e in nats_logs.entries} == {message.run_id}
    assert all(e["driver"] == "loki-e2e" for e in nats_logs.entries)

    driver_labels = {"service_name": "loki-e2e", "level": "info", "env": "test"}
    driver_lines = [e.line for e in receiver.entries if e.metadata is None]
    assert all(e.labels == driver_labels for e in receiver.entries if e.metadata is None)
    assert any(line.startswith('msg="driver started" subjects=') for line in driver_lines)
    # Logged after the NATS sink closed and before the Loki sink flushed on the way out.
    assert 'msg="driver stopped" handled=1 log_lines_sent=2' in driver_lines
    assert receiver.invalid == []

    console = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    reports = [line for line in console if line["event"] == "loki shipping finished"]
    assert len(reports) == 1
    assert reports[0]["shipped"] == len(receiver.entries)
    assert reports[0]["dropped"] == 0


async def test_runtime_with_loki_down_still_handles_and_logs_to_nats(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("loki-down")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        for i in range(20):
            ctx.log.info("step", i=i)
        return Result.ok("built")

    nats_logs = NatsLogs()
    await nats_client.subscribe("logs.>", cb=nats_logs.on_message)
    config = LokiConfig(url=f"http://127.0.0.1:{free_port()}", flush_timeout=2.0, **FAST)
    async with running(driver, nats_server.url, loki=config), watch_results(nats_client) as watch:
        message = await emit_event(nats_client, Resource(name="app", type="pipeline"))
        result = await watch.wait(message.run_id, timeout=TIMEOUT)
        await wait_until(
            lambda: len(nats_logs.messages(message.run_id)) == 21, what="21 NATS lines"
        )

    assert result.driverresult.success
    assert result.driverresult.message == "built"
    assert nats_logs.messages(message.run_id) == [
        *(f"step i={i}" for i in range(20)),
        "run succeeded result=built",
    ]
