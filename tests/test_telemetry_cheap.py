"""The run span's cheap path: what it saves must not change what is recorded or propagated.

The runtime starts its run spans on the SDK's tracer without the SDK's ``start_span``
(:class:`conveyor_driver.telemetry._SdkSpans`), writes ``traceparent`` itself with the
default propagators, and records the duration with per-route attributes. These tests hold
it to the SDK's own answers: the same span for the same ids, no span for a dropped trace
with the flags the SDK would give, the same headers the propagators would write.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from _helpers import driver_message, resource_json, settled, wait_until
from _otel import install
from nats.aio.client import Client
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context as OtelContext
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
from test_telemetry import Parent, captured, points

from conveyor_driver import Context, Driver, Fail, protocol
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.telemetry import _DURATION_BATCH, RunRoute, _Durations, _SdkSpans, inject
from conveyor_driver.testing.fixtures import running

RUN = ("message-1", "run-1", "app")


class Counting(IdGenerator):
    """Ids from a counter, so that two providers hand out the same ones."""

    def __init__(self) -> None:
        self._random = random.Random(11)

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64) | 1

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128) | 1

    def is_trace_id_random(self) -> bool:
        return True


class Adding(Sampler):
    """Samples everything and adds an attribute, as a sampler may."""

    def should_sample(
        self,
        parent_context: OtelContext | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        added = {**(attributes or {}), "sampled.by": "adding"}
        return SamplingResult(Decision.RECORD_AND_SAMPLE, added, TraceState([("k", "v")]))

    def get_description(self) -> str:
        return "Adding"


def _provider(
    sampler: Sampler, limits: SpanLimits | None = None
) -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        sampler=sampler, id_generator=Counting(), span_limits=limits, shutdown_on_exit=False
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("conveyor_driver", "1"), exporter


def _parent(sampled: bool) -> OtelContext:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(trace.NonRecordingSpan(remote))


def _exported(span: ReadableSpan) -> tuple[Any, ...]:
    return (
        span.name,
        span.kind,
        span.context,
        span.parent,
        dict(span.attributes or {}),
        span.resource,
        span.instrumentation_scope,
        span.status.status_code,
    )


SAMPLERS = {
    "always on": ALWAYS_ON,
    "always off": ALWAYS_OFF,
    "ratio 1/2": TraceIdRatioBased(0.5),
    "parent-based ratio": ParentBased(TraceIdRatioBased(0.5)),
    "adding": Adding(),
}


@pytest.mark.parametrize("sampler", SAMPLERS.values(), ids=SAMPLERS.keys())
@pytest.mark.parametrize("parent", [None, True, False], ids=["root", "sampled", "unsampled"])
@pytest.mark.parametrize("limits", [None, SpanLimits(max_span_attribute_length=3)])
def test_the_cheap_start_makes_the_span_the_sdk_makes(
    sampler: Sampler, parent: bool | None, limits: SpanLimits | None
) -> None:
    ours, our_spans = _provider(sampler, limits)
    sdks, sdk_spans = _provider(sampler, limits)
    cheap = _SdkSpans.of(ours)
    assert cheap is not None
    route = RunRoute("builder", "resources.pipeline", "pipeline", "create")
    for attempt in (1, 2, 3):
        context = None if parent is None else _parent(parent)
        attributes = route.run_attributes(attempt, RUN)
        mine = cheap.start(route.span_name, context, attributes)
        theirs = sdks.start_span(
            route.span_name, context=context, kind=SpanKind.CONSUMER, attributes=dict(attributes)
        )
        assert mine.get_span_context() == theirs.get_span_context()
        assert mine.is_recording() == theirs.is_recording()
        for span in (mine, theirs):
            span.set_attribute("conveyor.outcome", "success")
            span.end()
    assert [_exported(s) for s in our_spans.get_finished_spans()] == [
        _exported(s) for s in sdk_spans.get_finished_spans()
    ]


def test_other_tracers_get_the_sdk_start_span() -> None:
    assert _SdkSpans.of(trace.NoOpTracer()) is None
    sdk_tracer, _ = _provider(ALWAYS_ON)

    class Wrapped(type(sdk_tracer)):  # type: ignore[misc]  # a subclass may start spans its way
        pass

    wrapped = Wrapped.__new__(Wrapped)
    wrapped.__dict__.update(sdk_tracer.__dict__)
    assert _SdkSpans.of(wrapped) is None


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
    # The log entries name the run's span too (their flags say sampled whatever the
    # sampler said: they are rebuilt from the ids alone, see telemetry.span_context_from_ids).
    assert [_traceparent(m.headers)[:2] for m in logs] == [(trace_id, span_id)] * 2


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
