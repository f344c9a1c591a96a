"""The OpenTelemetry SDK, recording in memory, for the telemetry tests.

OpenTelemetry lets a process set its global tracer and meter providers only once, and the
whole suite shares one pytest process: :func:`install` sets them on first use and hands the
same recorder to every later caller. Tracing is switched on only while a test holds
:meth:`Recorder.tracing`: a recording tracer gives every run a trace id, which would show in
the log lines and headers other test modules compare exactly, in whatever order they run.
Switched off, spans come from the API's no-op tracer, so the runs of other modules (which
send no trace context) log and publish exactly what they would with no SDK. Metrics always
record; nothing outside the reader sees them.

Counters and histograms are read as deltas, so each :meth:`Recorder.metrics` call returns
what was recorded since the previous one, whichever test recorded before; the in-flight
up-down counter stays cumulative, because its point is the current level.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import attrs
from aiohttp import web
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler

from conveyor_driver.embedded import free_port

_NO_OP = trace.NoOpTracer()


class _SwitchedTracerProvider(trace.TracerProvider):
    """The SDK provider while ``on``; the API's no-op tracer otherwise.

    A tracer asked for while ``on`` is the SDK's own, from the provider of the block's
    sampler (see :meth:`Recorder.tracing`), as a production driver gets it; one asked for
    while off switches per span.
    """

    def __init__(self, sdk: TracerProvider) -> None:
        self.sdk = sdk
        self.current = sdk
        self.on = False

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        if self.on:
            return self.current.get_tracer(*args, **kwargs)
        return _SwitchedTracer(self, self.sdk.get_tracer(*args, **kwargs))


class _SwitchedTracer(trace.Tracer):
    # Callers keep their tracer for the life of a driver, so the switch is read per span.
    def __init__(self, provider: _SwitchedTracerProvider, tracer: trace.Tracer) -> None:
        self._provider = provider
        self._tracer = tracer

    def _current(self) -> trace.Tracer:
        return self._tracer if self._provider.on else _NO_OP

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._current().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._current().start_as_current_span(*args, **kwargs)


@attrs.frozen
class Point:
    """One data point of a metric: its attributes, its value (a histogram's sum) and count."""

    attributes: Mapping[str, Any]
    value: float
    count: int | None = None


@attrs.define
class Recorder:
    """The in-memory exporter and reader behind the process's global providers."""

    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    provider: _SwitchedTracerProvider

    @contextlib.contextmanager
    def tracing(self, sampler: Sampler | None = None) -> Iterator[Recorder]:
        """Record spans for the block, starting from no spans and no metric deltas.

        ``sampler``: the one the block's tracers sample with (the SDK's default,
        parent-based always-on, otherwise), through a provider of its own that exports to
        the same place.
        """
        self.exporter.clear()
        self.reader.get_metrics_data()
        if sampler is not None:
            sampled = TracerProvider(sampler=sampler, shutdown_on_exit=False)
            sampled.add_span_processor(SimpleSpanProcessor(self.exporter))
            self.provider.current = sampled
        self.provider.on = True
        try:
            yield self
        finally:
            self.provider.on = False
            self.provider.current = self.provider.sdk

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [
            span for span in self.exporter.get_finished_spans() if name is None or span.name == name
        ]

    def metrics(self) -> dict[str, list[Point]]:
        """Data points by metric name: counters and histograms since the previous call."""
        data = self.reader.get_metrics_data()
        found: dict[str, list[Point]] = {}
        if data is None:
            return found
        for metric in _metrics(data.resource_metrics):
            points = found.setdefault(metric.name, [])
            for point in metric.data.data_points:
                attributes = dict(point.attributes or {})
                if isinstance(point, HistogramDataPoint):
                    points.append(Point(attributes, point.sum, point.count))
                else:
                    assert isinstance(point, NumberDataPoint), point  # no exponential histograms
                    points.append(Point(attributes, point.value))
        return found


def _metrics(resource_metrics: Sequence[ResourceMetrics]) -> Iterator[Metric]:
    for resource in resource_metrics:
        for scope in resource.scope_metrics:
            yield from scope.metrics


_recorder: Recorder | None = None


def install() -> Recorder:
    """Set the providers once for the process; the same recorder afterwards."""
    global _recorder
    if _recorder is None:
        exporter = InMemorySpanExporter()
        sdk = TracerProvider()
        sdk.add_span_processor(SimpleSpanProcessor(exporter))
        provider = _SwitchedTracerProvider(sdk)
        trace.set_tracer_provider(provider)
        reader = InMemoryMetricReader(
            preferred_temporality={
                Counter: AggregationTemporality.DELTA,
                ObservableCounter: AggregationTemporality.DELTA,
                Histogram: AggregationTemporality.DELTA,
            }
        )
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        # Providers set earlier by someone else would leave ours silently unused.
        assert trace.get_tracer_provider() is provider, "a tracer provider was set before"
        _recorder = Recorder(exporter, reader, provider)
    return _recorder


# -- an OTLP/HTTP collector, for a child process's exports -----------------------------


@attrs.define
class OtlpReceiver:
    """An OTLP/HTTP collector stand-in: records the protobuf exports it is sent."""

    spans: list[Any] = attrs.field(factory=list)
    resources: list[dict[str, Any]] = attrs.field(factory=list)
    metric_names: list[str] = attrs.field(factory=list)
    runs: dict[str, int] = attrs.field(factory=dict)

    async def traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            self.resources.append(otlp_attributes(resource_spans.resource.attributes))
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)
        return _protobuf(ExportTraceServiceResponse())

    async def metrics(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        )

        export = ExportMetricsServiceRequest.FromString(await request.read())
        for resource_metrics in export.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    self.metric_names.append(metric.name)
                    if metric.name == "conveyor.driver.runs":
                        for point in metric.sum.data_points:
                            outcome = otlp_attributes(point.attributes)["outcome"]
                            self.runs[outcome] = point.as_int
        return _protobuf(ExportMetricsServiceResponse())


def otlp_attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pairs}


def _protobuf(message: Any) -> web.Response:
    return web.Response(body=message.SerializeToString(), content_type="application/x-protobuf")


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver()
    server = web.Application()
    server.router.add_post("/v1/traces", receiver.traces)
    server.router.add_post("/v1/metrics", receiver.metrics)
    runner = web.AppRunner(server, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
