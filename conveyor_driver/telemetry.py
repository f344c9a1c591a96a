"""OpenTelemetry traces and metrics for every run, written against the API only.

The library never configures the SDK by itself: with no SDK (or one the application set up)
every call here goes to whatever providers are installed, which are no-ops by default.
``conveyor-driver run`` installs the SDK from the standard ``OTEL_*`` variables when they
are set (see :func:`configure_from_env`), which needs ``conveyor-driver[otel]``.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import metrics, trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind

from . import exposition
from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

INSTRUMENTATION = "conveyor_driver"

_VERSION = __version__


#: A build takes from milliseconds (a no-op step) to an hour.
_RUN_BUCKETS = [0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
_HTTP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]


class _Running:
    """How many handlers one driver runs now: a plain count, changed on its event loop only.

    An SDK up-down counter costs a measurement per change, two per run; this count is read
    by ``conveyor.driver.inflight`` at collection instead. One driver's runs all start and
    end on its event loop, so no lock is needed.
    """

    __slots__ = ("__weakref__", "value")

    def __init__(self) -> None:
        self.value = 0

    def add(self, amount: int) -> None:
        self.value += amount


class _InflightGauge:
    """The callback of ``conveyor.driver.inflight``: the sum over the drivers alive now.

    The one piece of process-wide state here, because the instrument it feeds is
    process-wide: OpenTelemetry keeps one instrument per name and drops the callbacks of
    later registrations. A callback reading one driver's count would report the first
    driver of the process for ever (its count stuck at 0 once it stopped) and never the
    others; this one sums every driver's, whichever registered first. Counts are held
    weakly, so a driver that has gone stops being summed. The lock covers drivers started
    in several threads and the collector's own thread.
    """

    def __init__(self) -> None:
        self._counts: weakref.WeakSet[_Running] = weakref.WeakSet()
        self._lock = threading.Lock()

    def count(self) -> _Running:
        """A new driver's count, summed from now on."""
        running = _Running()
        with self._lock:
            self._counts.add(running)
        return running

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            total = sum(running.value for running in self._counts)
        return (Observation(total),)


_INFLIGHT = _InflightGauge()


#: The run tallies the SDK observes, per meter provider.
_SDK_TALLIES: weakref.WeakKeyDictionary[object, list[exposition.Tally]] = (
    weakref.WeakKeyDictionary()
)


#: The run durations waiting for the SDK's histogram, per meter provider (see _Durations).
_SDK_DURATIONS: weakref.WeakKeyDictionary[object, list[_Durations]] = weakref.WeakKeyDictionary()

#: How many run durations wait, at most, before they are handed to the SDK's histogram.
_DURATION_BATCH = 256


class _Durations:
    """``messaging.process.duration``'s measurements, recorded in batches.

    A run appends its duration and attributes here; every :data:`_DURATION_BATCH` runs, and
    at every collection of the SDK's metrics (before the histogram is read), they are
    recorded on the histogram one by one, as each run would have. What is exported is the
    same (count, sum, buckets, min, max per attribute set); the SDK's per-record work,
    about a sixth of a sampled-out run's telemetry when scattered between runs, costs
    less done in one loop. Only a measurement's own time is later (an exemplar's, were
    exemplars taken without a sampled span, which the default filter never does here).
    The event loop appends and may record; the SDK's collector thread records: a deque's
    ``append`` and ``popleft`` are atomic, so each duration is recorded once.
    """

    __slots__ = ("_histogram", "_pending")

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram
        self._pending: collections.deque[tuple[float, dict[str, str]]] = collections.deque()

    def add(self, seconds: float, labels: dict[str, str]) -> None:
        pending = self._pending
        pending.append((seconds, labels))
        if len(pending) >= _DURATION_BATCH:
            self.flush()

    def flush(self) -> None:
        pending, record = self._pending, self._histogram.record
        while True:
            try:
                seconds, labels = pending.popleft()
            except IndexError:
                return
            record(seconds, labels)


class _Adds(Protocol):
    """A counter: the SDK's, or a tally of :data:`exposition.RUNS` without it."""

    def add(self, amount: int, attributes: dict[str, str]) -> None: ...


class Telemetry:
    """The tracer and the instruments of one driver, built once and handed to its parts.

    The runtime builds one per :func:`~conveyor_driver.runtime.server.serve` and hands it
    to the dispatcher, the API client and the log sinks, so that whether telemetry is on
    is decided once and every part records on the same instruments. Instruments come from
    whatever providers are installed when it is built; recording on the API's no-op
    instruments costs next to nothing.
    """

    def __init__(self) -> None:
        self.tracer = trace.get_tracer(INSTRUMENTATION, _VERSION)
        self._enabled = _tracer_provider_installed() or _meter_provider_installed()
        self._routes: dict[tuple[str, str, str, str | None], RunRoute] = {}
        self._meter = metrics.get_meter(INSTRUMENTATION, _VERSION)
        self.process_duration = self._meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Time a handler took to process one message",
            explicit_bucket_boundaries_advisory=_RUN_BUCKETS,
        )
        #: Whether the SDK records the metrics; /metrics renders the essentials without it.
        self.sdk_metrics = _meter_provider_installed()
        # Counted in a plain tally either way, and handed to the SDK at collection time:
        # a counter's add() would be the costliest thing a run does besides its span.
        tally = exposition.RUNS.tally()
        self.runs: _Adds = tally
        #: The run durations, handed to the histogram in batches when the SDK collects.
        self._durations: _Durations | None = None
        if self.sdk_metrics:
            self._durations = _Durations(self.process_duration)
            self._observe_runs(tally, self._durations)
            self._backlog_gauges()
        self.inflight = _INFLIGHT.count()
        self._meter.create_observable_up_down_counter(
            "conveyor.driver.inflight",
            callbacks=[_INFLIGHT.observe],
            unit="{run}",
            description="Handlers running now",
        )
        self.log_lines = self._meter.create_counter(
            "conveyor.driver.log_lines",
            unit="{line}",
            description="Log lines handled by the sinks, by sink and status (sent, dropped)",
        )
        self.api_duration = self._meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of Conveyor API requests",
            explicit_bucket_boundaries_advisory=_HTTP_BUCKETS,
        )
        self.loop_blocked = self._meter.create_histogram(
            "conveyor.driver.loop_blocked",
            unit="s",
            description="How long the event loop stood still, once per block past the threshold",
            explicit_bucket_boundaries_advisory=_RUN_BUCKETS,
        )
        self.abandoned_threads = self._meter.create_counter(
            "conveyor.driver.abandoned_threads",
            unit="{thread}",
            description="Sync handlers left running past their deadline",
        )

    def _observe_runs(self, tally: exposition.Tally, durations: _Durations) -> None:
        """Hand ``tally`` to the SDK's run counter, made once per meter provider.

        The provider's first driver registers the instrument (later registrations' callbacks
        are dropped); its callback sums the tallies of every driver started under that
        provider, and of no other. It also hands the SDK the durations still pending: the
        SDK runs the callbacks of a collection before it reads the histogram.
        """
        provider = metrics.get_meter_provider()
        tallies = _SDK_TALLIES.get(provider)
        if tallies is None:
            tallies = _SDK_TALLIES[provider] = []
            pending = _SDK_DURATIONS[provider] = []

            def observe(_options: CallbackOptions) -> Iterable[Observation]:
                for durations in pending:
                    durations.flush()
                return [
                    Observation(count, {"outcome": outcome})
                    for outcome, count in exposition.sum_tallies(tallies).items()
                ]

            self._meter.create_observable_counter(
                exposition.RUNS_NAME,
                callbacks=[observe],
                unit="{run}",
                description=exposition.RUNS_DESCRIPTION,
            )
        tallies.append(tally)
        _SDK_DURATIONS[provider].append(durations)
        exposition.RUNS.via_otel = True

    def _backlog_gauges(self) -> None:
        """The consumers' backlogs, on the SDK: OTLP carries them, /metrics renders them."""
        for name, description, which in exposition.BACKLOG_GAUGES:
            # Process-wide like _INFLIGHT: the first driver's callbacks read every driver's.
            def observe(_options: CallbackOptions, which: int = which) -> Iterable[Observation]:
                return [
                    Observation(values[which], labels)
                    for labels, values in exposition.BACKLOGS.readings()
                ]

            self._meter.create_observable_gauge(
                name, callbacks=[observe], unit="{message}", description=description
            )
        exposition.BACKLOGS.via_otel = True

    def count_run(self, outcome: str) -> None:
        self.runs.add(1, {"outcome": outcome})

    def route(self, driver: str, subject: str, resource_type: str, event: str | None) -> RunRoute:
        """What every run of one (subject, resource type, event) shares, built once."""
        key = (driver, subject, resource_type, event)
        route = self._routes.get(key)
        if route is None:
            route = RunRoute(driver, subject, resource_type, event)
            if len(self._routes) < _MAX_ROUTES:  # subjects and types come off the wire
                self._routes[key] = route
        return route

    def start_run(
        self,
        route: RunRoute,
        context: OtelContext | None,
        attempt: int,
        run: tuple[str, str, str] | None,
    ) -> Span:
        """The run's CONSUMER span, child of ``context`` (the message's trace context).

        ``run`` is the message's id, run id and resource name, the attributes that change
        from one message to the next; the rest is the route's, built once. The tracer's own
        ``start_span`` does the rest: its private parts are not worth depending on for the
        few microseconds a hand-made span would save (bench/README.md).
        """
        attributes = route.run_attributes(attempt, run)
        return self.tracer.start_span(
            route.span_name, context=context, kind=SpanKind.CONSUMER, attributes=attributes
        )

    def record_run(self, route: RunRoute, seconds: float, kind: str, outcome: str) -> None:
        """One run's duration (by resource type and outcome kind) and its count (by outcome)."""
        labels = route.duration_labels.get(kind)
        if labels is None:
            labels = route.duration_labels[kind] = {
                "conveyor.resource.type": route.resource_type,
                "conveyor.outcome": kind,
            }
        if self._durations is not None:
            self._durations.add(seconds, labels)
        else:
            self.process_duration.record(seconds, labels)
        self.runs.add(1, {"outcome": outcome})

    def line_counter(self, sink: str) -> Callable[[str, int], None]:
        """What a log sink calls, once per batch, with how many lines were sent or dropped."""

        def count(status: str, lines: int) -> None:
            self.log_lines.add(lines, {"sink": sink, "status": status})

        return count

    def enabled(self) -> bool:
        """Whether providers (the SDK's, or a tracer provider of the application's own)
        were installed when the driver started.

        Without one, a run skips span and metric bookkeeping. Providers are set up before a
        driver starts (the CLI does it first), so the answer is taken once, not per message.
        """
        return self._enabled


#: Routes a driver keeps the attributes of; past that (odd subjects), they are built per run.
_MAX_ROUTES = 1024


class RunRoute:
    """The span name and attributes the runs of one subject, resource type and event share.

    Built once: a run adds only its own values (message id, run id, resource name,
    attempt, outcome) to copies of these.
    """

    __slots__ = (
        "attributes",
        "duration_labels",
        "message_attributes",
        "resource_type",
        "span_name",
    )

    def __init__(self, driver: str, subject: str, resource_type: str, event: str | None) -> None:
        self.resource_type = resource_type
        self.span_name = f"process {resource_type}"
        self.attributes: dict[str, str | int] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": subject,
            "messaging.consumer.group.name": driver,
            "conveyor.driver": driver,
        }
        self.message_attributes: dict[str, str] = (
            {}
            if event is None
            else {"conveyor.event": event, "conveyor.resource.type": resource_type}
        )
        #: ``messaging.process.duration``'s attributes, by outcome kind.
        self.duration_labels: dict[str, dict[str, str]] = {}

    def run_attributes(
        self, attempt: int, run: tuple[str, str, str] | None
    ) -> dict[str, str | int]:
        """A run's span attributes: the route's, with the run's own values (``run``: message
        id, run id, resource name; None for a message that could not be decoded)."""
        if run is None:
            return {**self.attributes, "conveyor.attempt": attempt}
        message_id, run_id, resource_name = run
        return {
            **self.attributes,
            "conveyor.attempt": attempt,
            "messaging.message.id": message_id,
            "conveyor.run_id": run_id,
            **self.message_attributes,
            "conveyor.resource.name": resource_name,
        }


_OTLP_SWITCHES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


def configure_from_env(
    service_name: str, *, prometheus: bool = False, environ: Mapping[str, str] | None = None
) -> Callable[[], None] | None:
    """Install the SDK when ``OTEL_*`` asks for export (or ``prometheus`` for /metrics).

    Returns a function that flushes and shuts the installed providers down, or None when
    nothing was installed: no OTLP endpoint configured and no /metrics wanted, the SDK not
    installed, or the application set up its own providers (which it keeps).
    """
    env = os.environ if environ is None else environ
    otlp = any(env.get(name) for name in _OTLP_SWITCHES)
    if not otlp and not prometheus:
        return None
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return None
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    resource = Resource.create(attributes)
    shutdowns: list[Callable[[], Any]] = []

    if otlp and not _tracer_provider_installed():
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
        _keep_if_taken(tracer_provider, trace.get_tracer_provider(), shutdowns)

    if not _meter_provider_installed():
        readers: list[MetricReader] = []
        if otlp:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        if prometheus:
            try:
                from opentelemetry.exporter.prometheus import PrometheusMetricReader
            except ImportError:
                pass
            else:
                readers.append(PrometheusMetricReader())
        if readers:
            meter_provider = MeterProvider(resource=resource, metric_readers=readers)
            metrics.set_meter_provider(meter_provider)
            _keep_if_taken(meter_provider, metrics.get_meter_provider(), shutdowns)

    if not shutdowns:
        return None

    def shutdown() -> None:
        for close in shutdowns:
            close()

    return shutdown


def _keep_if_taken(
    ours: TracerProvider | MeterProvider, current: object, shutdowns: list[Callable[[], Any]]
) -> None:
    """Keep the provider just offered to the API if it took it; shut it down if not.

    The API refuses a second provider with a warning, and an application's own one that
    the checks above do not recognise (a no-op, a meter provider not built on the SDK)
    looks unset from here: ours must then neither run nor be shut down at exit.
    """
    if current is ours:
        shutdowns.append(ours.shutdown)
    else:
        ours.shutdown()


def _tracer_provider_installed() -> bool:
    """Whether a tracer provider was set: anything but the API's stand-in or its no-op."""
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def _meter_provider_installed() -> bool:
    """Whether the SDK's meter provider (or one built on it) was set.

    The API names no public class for its stand-in meter provider, so the SDK's class is
    what is recognised. It is looked up among the modules already imported: an SDK
    provider cannot exist without its module, and importing it here would cost every
    driver's start-up the SDK.
    """
    sdk = sys.modules.get("opentelemetry.sdk.metrics")
    return sdk is not None and isinstance(metrics.get_meter_provider(), sdk.MeterProvider)
