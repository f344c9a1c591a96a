"""Traces and metrics of every run, read from the SDK's in-memory exporter and reader, with
a real nats-server carrying the trace context in message headers (W3C ``traceparent``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import attrs
import pytest
from _helpers import TIMEOUT, driver_message, raw_results, resource_json, settled, wait_until
from _loki_receiver import LokiReceiver
from _otel import Point, Recorder, install, otlp_attributes, otlp_receiver
from aiohttp import web
from apps.harness import app, clean_env, driver_process
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import metrics, trace
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util.types import AnyValue

from conveyor_driver import Context, Driver, Fail, Result, Retry, protocol
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.logs.loki import LokiConfig
from conveyor_driver.telemetry import configure_from_env
from conveyor_driver.testing.fixtures import running

WORKER = app("worker_app.py:driver")  # driver "worker", resource type "job"


@pytest.fixture
def otel() -> Iterator[Recorder]:
    with install().tracing() as recorder:
        yield recorder


@attrs.frozen
class Parent:
    """The span context an upstream service (the Conveyor server, say) sends along.

    ``| 1`` because an all-zero id is invalid and would be ignored.
    """

    trace_id: int = attrs.field(factory=lambda: secrets.randbits(128) | 1)
    span_id: int = attrs.field(factory=lambda: secrets.randbits(64) | 1)

    @property
    def traceparent(self) -> str:
        return traceparent(self.trace_id, self.span_id)


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


async def publish_traced(nc: Client, subject: str, body: bytes, parent: Parent) -> None:
    await nc.jetstream().publish(subject, body, headers={"traceparent": parent.traceparent})


@contextlib.asynccontextmanager
async def captured(nc: Client, subject: str) -> AsyncIterator[list[Msg]]:
    """Messages as published on ``subject``, headers included (a core subscription, which
    sees JetStream publishes too without taking anything from the server's consumers)."""
    seen: list[Msg] = []

    async def on_message(msg: Msg) -> None:
        seen.append(msg)

    sub = await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    try:
        yield seen
    finally:
        await sub.unsubscribe()


def messages(msgs: list[Msg]) -> list[str]:
    return [json.loads(msg.data)["message"] for msg in msgs]


def by_attempt(spans: list[ReadableSpan], resource_name: str) -> list[ReadableSpan]:
    """The run spans of one resource, in delivery order."""
    mine = [s for s in spans if attributes(s)["conveyor.resource.name"] == resource_name]
    return sorted(mine, key=attempt)


def attributes(span: ReadableSpan | Event) -> Mapping[str, AnyValue]:
    """A span's (or event's) attributes, which the SDK always sets on a finished span."""
    assert span.attributes is not None, span
    return span.attributes


def attempt(span: ReadableSpan) -> int:
    value = attributes(span)["conveyor.attempt"]
    assert isinstance(value, int), value
    return value


def summary(span: ReadableSpan) -> tuple[Any, ...]:
    """What a span says about its run: attempt, outcome, status and exception events."""
    exceptions = [
        (attributes(event)["exception.type"], attributes(event)["exception.message"])
        for event in span.events
        if event.name == "exception"
    ]
    return (
        attributes(span)["conveyor.attempt"],
        attributes(span)["conveyor.outcome"],
        span.status.status_code,
        span.status.description,
        exceptions,
    )


def points(found: dict[str, list[Point]], name: str) -> dict[tuple[Any, ...], Point]:
    """One metric's data points keyed by their sorted attribute values."""
    return {tuple(sorted(p.attributes.items())): p for p in found.get(name, [])}


async def test_a_traced_message_gets_one_consumer_span_child_of_the_context_it_carries(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("traced")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        return Result.ok("built")

    run_id, body = driver_message(resource_json("app"))
    subject = protocol.driver_resource_subject("traced", "pipeline")
    parent = Parent()
    async with running(driver, nats_server.url), raw_results(nats_client) as results:
        await publish_traced(nats_client, subject, body, parent)
        await results.wait(run_id)

    [span] = otel.spans()
    assert span.name == "process pipeline"
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None
    assert (span.parent.trace_id, span.parent.span_id, span.parent.is_remote) == (
        parent.trace_id,
        parent.span_id,
        True,
    )
    assert span.context.trace_id == parent.trace_id
    assert span.context.span_id != parent.span_id
    assert dict(span.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.destination.name": subject,
        "messaging.consumer.group.name": "traced",
        "messaging.message.id": json.loads(body)["id"],
        "conveyor.driver": "traced",
        "conveyor.run_id": run_id,
        "conveyor.event": "create",
        "conveyor.resource.type": "pipeline",
        "conveyor.resource.name": "app",
        "conveyor.attempt": 1,
        "conveyor.outcome": "success",
    }
    assert span.status.status_code is StatusCode.UNSET
    assert list(span.events) == []


async def test_an_untraced_message_starts_a_new_trace(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("untraced")

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        return None

    run_id, body = driver_message(resource_json("app"))
    async with running(driver, nats_server.url), raw_results(nats_client) as results:
        await nats_client.jetstream().publish("resources.pipeline", body)
        await results.wait(run_id)

    [span] = otel.spans("process pipeline")
    assert span.parent is None
    assert span.context.is_valid
    assert attributes(span)["messaging.destination.name"] == "resources.pipeline"


async def test_the_result_and_every_log_line_of_the_run_carry_its_context(
    otel: Recorder,
    nats_server: EmbeddedNats,
    nats_client: Client,
    capsys: pytest.CaptureFixture[str],
) -> None:
    driver = Driver("deployer")

    @driver.on("deployment")
    def deploy(ctx: Context) -> Result:  # a sync handler: it logs from a worker thread
        ctx.log.info("deploying", target="prod")
        return Result.ok("deployed")

    run_id, body = driver_message(resource_json("web", "deployment", pipeline="release"))
    parent = Parent()
    async with (
        captured(nats_client, protocol.RESULT_SUBJECT) as results,
        captured(nats_client, protocol.log_subject(run_id)) as stored,
        captured(nats_client, protocol.live_log_subject(run_id, "deployer")) as live,
    ):
        async with running(driver, nats_server.url):
            await publish_traced(nats_client, "resources.deployment", body, parent)
            await wait_until(lambda: results, what="the result")
        # Stopping the driver flushed its log sink: every line of the run is out.
        await nats_client.flush()

    [span] = otel.spans()
    assert span.context.trace_id == parent.trace_id
    expected = traceparent(span.context.trace_id, span.context.span_id)

    [result] = results
    assert json.loads(result.data)["run_id"] == run_id
    assert result.headers is not None
    assert result.headers["traceparent"] == expected
    assert protocol.MSG_ID_HEADER in result.headers

    lines = ["deploying target=prod", "run succeeded result=deployed"]
    assert messages(stored) == lines
    assert messages(live) == lines
    assert [msg.headers for msg in stored + live] == [{"traceparent": expected}] * 4
    shipped = points(otel.metrics(), "conveyor.driver.log_lines")
    assert {key: p.value for key, p in shipped.items()} == {
        (("sink", "nats"), ("status", "sent")): 2,
        (("sink", "nats"), ("status", "dropped")): 0,
    }

    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    run_records = [r for r in records if r.get("run_id") == run_id]
    assert [r["event"] for r in run_records] == ["deploying", "run succeeded"]
    ids = (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")
    assert [(r["trace_id"], r["span_id"]) for r in run_records] == [ids, ids]
    driver_records = [r for r in records if "run_id" not in r]
    assert "driver started" in [r["event"] for r in driver_records]
    assert [r for r in driver_records if "trace_id" in r or "span_id" in r] == []


async def test_loki_lines_of_a_run_carry_its_ids_as_structured_metadata(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("loki-traced")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        ctx.log.info("building")
        return Result.ok("built")

    run_id, body = driver_message(resource_json("app"))
    parent = Parent()
    async with LokiReceiver() as receiver:
        config = LokiConfig(url=receiver.url, batch_wait=0.02)
        async with running(driver, nats_server.url, loki=config), raw_results(nats_client) as rr:
            await publish_traced(nats_client, "resources.pipeline", body, parent)
            await rr.wait(run_id)
        entries = [e for e in receiver.entries if e.metadata and e.metadata["run_id"] == run_id]

    [span] = otel.spans()
    ids = {"trace_id": f"{parent.trace_id:032x}", "span_id": f"{span.context.span_id:016x}"}
    assert len(entries) == 2
    for entry in entries:
        assert entry.metadata is not None
        assert {k: entry.metadata[k] for k in ("trace_id", "span_id")} == ids
        # Per-run values are metadata, never labels (Loki's stream count must stay bounded).
        assert "trace_id" not in entry.labels


async def test_outcomes_show_in_span_status_and_in_the_run_counter_and_duration(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("outcomes", max_attempts=2)

    @driver.on("pipeline")
    async def handle(ctx: Context) -> Result:
        action = ctx.resource.spec["do"]
        if action == "fail":
            raise Fail("bad spec")
        if action == "refuse":
            return Result.fail("refused")
        if action == "retry" and ctx.attempt == 1:
            raise Retry("not yet", delay=0.1)
        if action == "raise":
            raise RuntimeError("boom")
        return Result.ok("done")

    actions = ["ok", "fail", "refuse", "retry", "raise"]
    async with running(driver, nats_server.url), raw_results(nats_client) as results:
        run_ids = []
        for action in actions:
            run_id, body = driver_message(resource_json(action, spec={"do": action}))
            await nats_client.jetstream().publish("resources.pipeline", body)
            run_ids.append(run_id)
        for run_id in run_ids:
            await results.wait(run_id)
        await wait_until(lambda: settled(nats_client, "outcomes"), what="all settled")

    spans = otel.spans("process pipeline")
    assert len(spans) == 7  # one per delivery: "retry" and "raise" were delivered twice
    unset, error = StatusCode.UNSET, StatusCode.ERROR
    assert [summary(s) for s in by_attempt(spans, "ok")] == [(1, "success", unset, None, [])]
    assert [summary(s) for s in by_attempt(spans, "fail")] == [
        (1, "failure", error, "Fail: bad spec", [("conveyor_driver.outcomes.Fail", "bad spec")])
    ]
    assert [summary(s) for s in by_attempt(spans, "refuse")] == [
        (1, "failure", error, "refused", [])
    ]
    assert [summary(s) for s in by_attempt(spans, "retry")] == [
        (1, "retry", unset, None, []),
        (2, "success", unset, None, []),
    ]
    assert [summary(s) for s in by_attempt(spans, "raise")] == [
        (1, "retry", error, "RuntimeError: boom", [("RuntimeError", "boom")]),
        (2, "gave_up", error, "RuntimeError: boom", [("RuntimeError", "boom")]),
    ]

    found = otel.metrics()
    runs = points(found, "conveyor.driver.runs")
    assert {key: p.value for key, p in runs.items()} == {
        (("outcome", "success"),): 2,
        (("outcome", "failure"),): 2,
        (("outcome", "retry"),): 2,
        (("outcome", "terminated"),): 1,
    }
    durations = points(found, "messaging.process.duration")
    assert {key: p.count for key, p in durations.items()} == {
        (("conveyor.outcome", kind), ("conveyor.resource.type", "pipeline")): count
        for kind, count in (("success", 2), ("failure", 2), ("retry", 2), ("gave_up", 1))
    }
    assert all(p.value > 0 for p in durations.values())
    assert [(p.attributes, p.value) for p in found["conveyor.driver.inflight"]] == [({}, 0)]


async def test_inflight_counts_the_handlers_running_now(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("inflight", concurrency=2)
    started = asyncio.Event()
    release = asyncio.Event()

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        started.set()
        await release.wait()

    def inflight() -> list[float]:
        return [p.value for p in otel.metrics().get("conveyor.driver.inflight", [])]

    async with running(driver, nats_server.url), raw_results(nats_client) as results:
        run_id, body = driver_message(resource_json("app"))
        await nats_client.jetstream().publish("resources.pipeline", body)
        try:
            await asyncio.wait_for(started.wait(), TIMEOUT)
            assert inflight() == [1]
        finally:
            release.set()  # else a failure waits out the driver's grace period
        await results.wait(run_id)
        assert inflight() == [0]


async def test_undecodable_messages_are_terminated_and_unhandled_broadcasts_skipped(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("picky")

    @driver.on("pipeline", events=["create"])
    async def build(ctx: Context) -> None:
        return None

    run_id, unrouted = driver_message(resource_json("app"), event="delete")
    js = nats_client.jetstream()
    async with running(driver, nats_server.url):
        await js.publish("resources.pipeline", b"not json at all")
        await js.publish("resources.pipeline", unrouted)
        await wait_until(lambda: len(otel.spans()) == 2, what="two spans")
        await wait_until(lambda: settled(nats_client, "picky"), what="both settled")

    undecodable = [s for s in otel.spans() if "conveyor.run_id" not in (s.attributes or {})]
    [garbage] = undecodable
    assert garbage.name == "process pipeline"
    assert attributes(garbage)["conveyor.outcome"] == "undecodable"
    assert garbage.status.status_code is StatusCode.ERROR
    assert "messaging.message.id" not in (garbage.attributes or {})
    [routeless] = [s for s in otel.spans() if s is not garbage]
    assert attributes(routeless)["conveyor.run_id"] == run_id
    assert attributes(routeless)["conveyor.event"] == "delete"
    # A broadcast event no handler takes is skipped (acked), not an error.
    assert attributes(routeless)["conveyor.outcome"] == "skipped"
    runs = points(otel.metrics(), "conveyor.driver.runs")
    # An observed counter reports every outcome seen so far; those of earlier tests add 0.
    assert {key: p.value for key, p in runs.items() if p.value} == {
        (("outcome", "terminated"),): 1,
        (("outcome", "skipped"),): 1,
    }
    assert routeless.status.status_code is not StatusCode.ERROR


async def test_a_command_is_a_child_span_and_its_lines_carry_it(
    otel: Recorder,
    nats_server: EmbeddedNats,
    nats_client: Client,
    capsys: pytest.CaptureFixture[str],
) -> None:
    driver = Driver("runner")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        await ctx.run(["echo", "hello"])
        result = await ctx.run("exit 3")
        return Result.ok(data={"exit": result.exit_code})

    run_id, body = driver_message(resource_json("app"))
    async with running(driver, nats_server.url), raw_results(nats_client) as results:
        await publish_traced(nats_client, "resources.pipeline", body, Parent())
        await results.wait(run_id)

    [run_span] = otel.spans("process pipeline")
    [echo] = otel.spans("run echo")
    [failing] = otel.spans("run exit")
    for child in (echo, failing):
        assert child.parent is not None
        assert (child.parent.trace_id, child.parent.span_id) == (
            run_span.context.trace_id,
            run_span.context.span_id,
        )
    assert dict(echo.attributes or {}) == {
        "process.command_line": "echo hello",
        "process.exit.code": 0,
    }
    assert echo.status.status_code is StatusCode.UNSET
    assert attributes(failing)["process.exit.code"] == 3
    assert failing.status.status_code is StatusCode.ERROR

    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    [hello] = [r for r in records if r.get("run_id") == run_id and r["event"] == "hello"]
    assert (hello["trace_id"], hello["span_id"]) == (
        f"{run_span.context.trace_id:032x}",
        f"{echo.context.span_id:016x}",
    )


async def test_an_api_request_is_a_client_span_whose_context_goes_in_its_headers(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    seen: list[str | None] = []

    async def health(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent"))
        return web.json_response({"status": "healthy", "time": 1})

    api = web.Application()
    api.router.add_get("/health", health)
    runner = web.AppRunner(api, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    driver = Driver("api-caller")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        return Result.ok(data=await ctx.api.health())

    run_id, body = driver_message(resource_json("app"))
    try:
        base = f"http://127.0.0.1:{port}"
        async with running(driver, nats_server.url, api_url=base), raw_results(nats_client) as rr:
            await publish_traced(nats_client, "resources.pipeline", body, Parent())
            await rr.wait(run_id)
    finally:
        await runner.cleanup()

    assert rr.for_run(run_id)[0]["driverresult"]["success"]
    [run_span] = otel.spans("process pipeline")
    clients = [s for s in otel.spans() if s.kind is SpanKind.CLIENT]
    assert len(clients) == 1
    [client] = clients
    assert client.parent is not None
    assert client.parent.span_id == run_span.context.span_id
    assert seen == [traceparent(client.context.trace_id, client.context.span_id)]
    durations = otel.metrics().get("http.client.request.duration", [])
    assert [p.count for p in durations] == [1]


def test_configure_from_env_does_nothing_unless_asked() -> None:
    assert configure_from_env("quiet", environ={}) is None


def test_configure_from_env_keeps_the_providers_an_application_installed() -> None:
    install()
    tracer_provider = trace.get_tracer_provider()
    meter_provider = metrics.get_meter_provider()
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    assert configure_from_env("polite", prometheus=True, environ=environ) is None
    assert trace.get_tracer_provider() is tracer_provider
    assert metrics.get_meter_provider() is meter_provider


_NO_OP_PROVIDERS = """
from opentelemetry import metrics, trace
trace.set_tracer_provider(trace.NoOpTracerProvider())
metrics.set_meter_provider(metrics.NoOpMeterProvider())
from conveyor_driver.telemetry import Telemetry, configure_from_env
shutdown = configure_from_env(
    "quiet", prometheus=True, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
)
print(
    shutdown is None,
    type(trace.get_tracer_provider()).__name__,
    type(metrics.get_meter_provider()).__name__,
    Telemetry().enabled(),
)
"""


@pytest.mark.process
def test_no_op_providers_an_application_chose_mean_telemetry_off_and_are_kept() -> None:
    # A process of its own: this one has SDK providers set for good.
    done = subprocess.run(
        [sys.executable, "-c", _NO_OP_PROVIDERS],
        capture_output=True,
        text=True,
        check=True,
        env=env_without_otel(),
        timeout=TIMEOUT,
    )
    assert done.stdout.split() == ["True", "NoOpTracerProvider", "NoOpMeterProvider", "False"]


def env_without_otel(**extra: str) -> dict[str, str]:
    """The CLI's environment with no OTEL_* a developer may have exported, plus ``extra``."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


@pytest.mark.process
async def test_without_the_sdk_runs_work_and_the_result_passes_the_context_on(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    # A process of its own: this one has SDK providers set for good by the tests above.
    args = ("--nats-url", nats_server.url, "--log-format", "json")
    traced_run, traced = driver_message(resource_json("a", "job"))
    plain_run, plain = driver_message(resource_json("b", "job"))
    parent = Parent()
    async with (
        driver_process(WORKER, *args, env=env_without_otel()) as proc,
        captured(nats_client, protocol.RESULT_SUBJECT) as results,
    ):
        await proc.started()
        await publish_traced(nats_client, "resources.job", traced, parent)
        await nats_client.jetstream().publish("resources.job", plain)
        await wait_until(lambda: len(results) == 2, what="two results")
        for run_id in (traced_run, plain_run):
            await proc.wait_for_log("run succeeded", run_id=run_id)

    by_run = {json.loads(msg.data)["run_id"]: msg for msg in results}
    assert all(json.loads(msg.data)["driverresult"]["success"] for msg in results)
    # No SDK, no span of the run's own: the caller's context goes on with the result as is.
    traced_headers, plain_headers = by_run[traced_run].headers, by_run[plain_run].headers
    assert traced_headers is not None
    assert traced_headers["traceparent"] == parent.traceparent
    assert plain_headers is not None
    assert "traceparent" not in plain_headers

    def events(run_id: str) -> list[tuple[object, ...]]:
        return [
            (r["event"], r.get("trace_id"), r.get("span_id"))
            for r in proc.records
            if r.get("run_id") == run_id
        ]

    # Without an SDK the runtime skips tracing altogether, so no span is current in the
    # handler and its lines carry no ids, traced caller or not.
    untraced = [
        ("handler started", None, None),
        ("handler finished", None, None),
        ("run succeeded", None, None),
    ]
    assert events(traced_run) == untraced
    assert events(plain_run) == untraced


@pytest.mark.process
async def test_run_exports_traces_and_metrics_over_otlp_when_otel_env_asks(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    run_id, body = driver_message(resource_json("a", "job"))
    parent = Parent()
    async with otlp_receiver() as (receiver, endpoint):
        # Default export intervals (5 s spans, 60 s metrics): only the flush at exit can
        # deliver them before the process ends.
        env = env_without_otel(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
        args = ("--nats-url", nats_server.url, "--log-format", "json")
        async with (
            driver_process(WORKER, *args, env=env) as proc,
            captured(nats_client, protocol.RESULT_SUBJECT) as results,
        ):
            await proc.started()
            await publish_traced(nats_client, "resources.job", body, parent)
            await wait_until(lambda: results, what="the result")
            proc.send(signal.SIGTERM)
            assert await proc.wait() == 0, proc.output

    [span] = [s for s in receiver.spans if s.name == "process job"]
    assert span.kind == span.SPAN_KIND_CONSUMER
    assert span.trace_id == parent.trace_id.to_bytes(16, "big")
    assert span.parent_span_id == parent.span_id.to_bytes(8, "big")
    attributes = otlp_attributes(span.attributes)
    assert (attributes["conveyor.run_id"], attributes["conveyor.outcome"]) == (run_id, "success")
    [result] = results
    assert result.headers is not None
    span_id = int.from_bytes(span.span_id, "big")
    assert result.headers["traceparent"] == traceparent(parent.trace_id, span_id)
    assert {r.get("service.name") for r in receiver.resources} == {"worker"}
    assert receiver.runs == {"success": 1}
    assert {"messaging.process.duration", "conveyor.driver.inflight"} <= set(receiver.metric_names)


async def test_inflight_sums_every_driver_in_the_process(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    # OpenTelemetry keeps the callback of the first registration only: whichever driver
    # registered first, the one gauge reports the handlers of all of them.
    release = asyncio.Event()
    started: list[str] = []

    def blocked(name: str) -> Driver:
        driver = Driver(name)

        @driver.on(name)
        async def build(ctx: Context) -> None:
            started.append(name)
            await release.wait()

        return driver

    def inflight() -> list[float]:
        return [p.value for p in otel.metrics().get("conveyor.driver.inflight", [])]

    js = nats_client.jetstream()
    async with (
        running(blocked("first"), nats_server.url),
        running(blocked("second"), nats_server.url),
        raw_results(nats_client) as results,
    ):
        run_ids = []
        for name in ("first", "second"):
            run_id, body = driver_message(resource_json("app", name))
            await js.publish(protocol.resource_subject(name), body)
            run_ids.append(run_id)
        try:
            await wait_until(lambda: len(started) == 2, what="both handlers running")
            assert inflight() == [2]
        finally:
            release.set()
        for run_id in run_ids:
            await results.wait(run_id)
        assert inflight() == [0]


async def test_a_blocked_loop_and_an_abandoned_thread_are_measured(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    import time

    driver = Driver("measured-blocks", timeout=0.3, max_attempts=1)

    @driver.on("pipeline")
    async def blocks(ctx: Context) -> None:
        time.sleep(1.2)  # noqa: ASYNC251 - the block under measure

    @driver.on("deployment")
    def hangs(ctx: Context) -> None:
        time.sleep(1.0)

    async with (
        running(driver, nats_server.url, block_threshold=0.3) as _task,
        raw_results(nats_client) as results,
    ):
        for kind in ("pipeline", "deployment"):
            run_id, body = driver_message(resource_json("app", kind))
            await nats_client.jetstream().publish(f"resources.{kind}", body)
            await results.wait(run_id)
        await asyncio.sleep(0.5)  # the watchdog sees the loop turn again
        found = otel.metrics()

    [blocked] = found["conveyor.driver.loop_blocked"]
    assert blocked.count == 1 and 0.8 < blocked.value < 5
    [abandoned] = found["conveyor.driver.abandoned_threads"]
    assert abandoned.value == 1
