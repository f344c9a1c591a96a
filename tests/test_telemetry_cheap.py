"""Telemetry's cheap paths: what they save must not change what is recorded or propagated.

The runtime builds a run span's attributes once per route, writes ``traceparent`` itself
with the default propagators, and hands the run durations to the SDK's histogram in
batches. These tests hold it to the SDK's own answers: no span for a dropped trace, with
the flags the SDK gives, the headers the propagators would write, and every duration
counted per route and outcome by the time metrics are read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from _helpers import driver_message, resource_json, settled, wait_until
from _otel import install
from nats.aio.client import Client
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace.sampling import (
    ParentBased,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from test_telemetry import Parent, captured, points

from conveyor_driver import Context, Driver, Fail, protocol
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.telemetry import _DURATION_BATCH, _Durations
from conveyor_driver.testing.fixtures import running
from conveyor_driver.trace_context import inject

# --- headers -------------------------------------------------------------------------------

CONTEXTS = {
    "sampled": SpanContext(1 << 100 | 7, 42, False, TraceFlags(TraceFlags.SAMPLED)),
    "not sampled": SpanContext(5, 1 << 60, False, TraceFlags(TraceFlags.DEFAULT)),
    "random, not sampled": SpanContext(5, 6, False, TraceFlags(0x02)),
    "trace state": SpanContext(
        9, 10, False, TraceFlags(1), TraceState([("vendor", "x"), ("other", "y")])
    ),
}


def _propagated(span_context: SpanContext) -> dict[str, str]:
    headers: dict[str, str] = {"Nats-Msg-Id": "m"}
    propagate.inject(
        headers, context=trace.set_span_in_context(trace.NonRecordingSpan(span_context))
    )
    return headers


@pytest.mark.parametrize("span_context", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_inject_writes_what_the_default_propagators_write(span_context: SpanContext) -> None:
    assert inject({"Nats-Msg-Id": "m"}, span_context) == _propagated(span_context)
    assert inject({}, trace.INVALID_SPAN_CONTEXT) == {}
    assert inject({}, None) == {}


@pytest.fixture
def propagators() -> Iterator[None]:
    default = propagate.get_global_textmap()
    yield
    propagate.set_global_textmap(default)


def test_inject_calls_other_propagators_and_carries_baggage(propagators: None) -> None:
    span_context = CONTEXTS["sampled"]
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        headers = inject({"Nats-Msg-Id": "m"}, span_context)
    finally:
        otel_context.detach(token)
    assert headers == {**_propagated(span_context), "baggage": "tenant=acme"}

    class Upper(TraceContextTextMapPropagator):
        def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
            carrier["x-trace"] = "custom"

    propagate.set_global_textmap(CompositePropagator([Upper(), W3CBaggagePropagator()]))
    assert inject({}, span_context) == {"x-trace": "custom"}
    propagate.set_global_textmap(TraceContextTextMapPropagator())
    assert inject({"Nats-Msg-Id": "m"}, span_context) == _propagated(span_context)


# --- through a driver ----------------------------------------------------------------------


def _traceparent(headers: dict[str, str] | None) -> tuple[int, int, int]:
    assert headers is not None
    _, trace_id, span_id, flags = headers["traceparent"].split("-")
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


async def test_a_dropped_trace_gets_no_span_and_its_result_says_not_sampled(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    ratio = TraceIdRatioBased(0.5)
    sampler = ParentBased(ratio)
    driver = Driver("sampler")
    seen: dict[str, tuple[str, str] | None] = {}

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        current = trace.get_current_span().get_span_context()
        seen[ctx.run_id] = (f"{current.trace_id:032x}", f"{current.span_id:016x}")
        ctx.log.info("building")

    roots = [driver_message(resource_json(f"root-{i}")) for i in range(40)]
    dropped_run, dropped_body = driver_message(resource_json("child-of-dropped"))
    unsampled = Parent()
    with install().tracing(sampler) as otel:
        async with (
            captured(nats_client, protocol.RESULT_SUBJECT) as results,
            captured(nats_client, protocol.log_subject(dropped_run)) as logs,
        ):
            async with running(driver, nats_server.url):
                for _, body in roots:
                    await nats_client.jetstream().publish("resources.pipeline", body)
                headers = {"traceparent": unsampled.traceparent[:-2] + "00"}
                await nats_client.jetstream().publish(
                    "resources.pipeline", dropped_body, headers=headers
                )
                await wait_until(lambda: len(results) == len(roots) + 1, what="every result")
            await nats_client.flush()
        spans = {(s.context.trace_id, s.context.span_id): s for s in otel.spans()}

    by_run = {json.loads(m.data)["run_id"]: m.headers for m in results}
    recorded = 0
    for run_id, _ in roots:
        trace_id, span_id, flags = _traceparent(by_run[run_id])
        sampled = trace_id & 0xFFFF_FFFF_FFFF_FFFF < ratio.bound
        assert bool(flags & TraceFlags.SAMPLED) == sampled, run_id
        assert flags & TraceFlags.RANDOM_TRACE_ID  # a root's id is random, as the SDK says
        assert ((trace_id, span_id) in spans) == sampled, run_id
        assert seen[run_id] == (f"{trace_id:032x}", f"{span_id:016x}")  # current in the handler
        recorded += sampled
    assert 0 < recorded < len(roots)  # both kinds were seen
    assert len(spans) == recorded

    # A parent that says "not sampled": no span; its trace goes on, flags still unset.
    trace_id, span_id, flags = _traceparent(by_run[dropped_run])
    assert (trace_id, flags) == (unsampled.trace_id, 0)
    assert span_id != unsampled.span_id
    assert seen[dropped_run] == (f"{trace_id:032x}", f"{span_id:016x}")
    # The log entries carry the run's span as the result does, flags included: a line of a
    # dropped trace must not tell whoever reads it that the trace is sampled.
    assert [_traceparent(m.headers) for m in logs] == [(trace_id, span_id, 0)] * 2


async def test_durations_and_runs_are_counted_per_route_and_outcome(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("routes")

    @driver.on("pipeline")
    @driver.on("deployment")
    async def handle(ctx: Context) -> None:
        if ctx.resource.spec["fail"]:
            raise Fail("no")

    cases = [("pipeline", False)] * 3 + [("pipeline", True)] * 2 + [("deployment", False)] * 4
    cases += [("deployment", True)]
    with install().tracing() as otel:
        async with running(driver, nats_server.url):
            for i, (kind, fail) in enumerate(cases):
                _, body = driver_message(resource_json(f"r{i}", kind, spec={"fail": fail}))
                await nats_client.jetstream().publish(f"resources.{kind}", body)
            await wait_until(lambda: settled(nats_client, "routes"), what="all settled")
            await wait_until(lambda: len(otel.spans()) == len(cases), what="every span")
        found = otel.metrics()
    durations = points(found, "messaging.process.duration")
    assert {key: p.count for key, p in durations.items()} == {
        (("conveyor.outcome", "success"), ("conveyor.resource.type", "pipeline")): 3,
        (("conveyor.outcome", "failure"), ("conveyor.resource.type", "pipeline")): 2,
        (("conveyor.outcome", "success"), ("conveyor.resource.type", "deployment")): 4,
        (("conveyor.outcome", "failure"), ("conveyor.resource.type", "deployment")): 1,
    }
    runs = points(found, "conveyor.driver.runs")
    assert {key: p.value for key, p in runs.items() if p.value} == {
        (("outcome", "success"),): 7,
        (("outcome", "failure"),): 3,
    }
    names = {s.name for s in otel.spans()}
    assert names == {"process pipeline", "process deployment"}
    for span in otel.spans():
        kind = span.name.removeprefix("process ")
        assert span.attributes is not None
        assert span.attributes["conveyor.resource.type"] == kind
        assert span.attributes["messaging.destination.name"] == f"resources.{kind}"


def test_durations_reach_the_histogram_in_batches_and_at_every_collection() -> None:
    recorded: list[tuple[float, dict[str, str]]] = []

    class Histogram:
        def record(self, amount: float, attributes: dict[str, str]) -> None:
            recorded.append((amount, attributes))

    durations = _Durations(Histogram())
    labels = {"conveyor.resource.type": "pipeline", "conveyor.outcome": "success"}
    for i in range(_DURATION_BATCH - 1):
        durations.add(i, labels)
    assert recorded == []
    durations.add(_DURATION_BATCH - 1, labels)
    assert recorded == [(i, labels) for i in range(_DURATION_BATCH)]
    durations.add(0.5, labels)
    durations.flush()  # what a collection does first
    assert recorded[-1] == (0.5, labels)
    durations.flush()
    assert len(recorded) == _DURATION_BATCH + 1
