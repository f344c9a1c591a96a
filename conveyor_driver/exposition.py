"""``/metrics`` without the OpenTelemetry SDK, and the backlog readings both ways export.

An autoscaler needs the backlog and an operator the run counts whether or not the
``[otel]`` extra is installed, so ``/metrics`` is rendered by ``prometheus-client`` (a
dependency of its own: small, pure Python, and what the SDK's Prometheus exporter renders
through anyway). Each series has exactly one source in a process, so none appears twice:

- each driver counts its runs in a tally of :data:`RUNS` (a dictionary add: no lock, no
  SDK call per run);
- with the SDK's meter provider installed when a driver starts, :class:`Telemetry`
  registers OpenTelemetry observable instruments reading :data:`RUNS` and
  :data:`BACKLOGS` at collection time (then OTLP carries them too); the SDK's Prometheus
  reader names them ``conveyor_driver_runs_total``, ``conveyor_driver_backlog``...
- otherwise the collector here renders them under exactly those names.

The collector renders a family only while the SDK does not have it.

Process-wide state, like prometheus-client's registry it feeds: drivers started in several
threads of one process share the one ``/metrics``.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Mapping

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: (OpenTelemetry name, description, which reading): the three backlog gauges, in one place.
BACKLOG_GAUGES: tuple[tuple[str, str, int], ...] = (
    (
        "conveyor.driver.consumer.pending",
        "Messages the consumer has not delivered yet (its num_pending)",
        0,
    ),
    (
        "conveyor.driver.consumer.ack_pending",
        "Messages delivered and not yet acknowledged: running (its num_ack_pending)",
        1,
    ),
    (
        "conveyor.driver.backlog",
        "pending + ack_pending: the work waiting or running, for autoscalers",
        2,
    ),
)
RUNS_NAME = "conveyor.driver.runs"
RUNS_DESCRIPTION = "Messages settled, by outcome (success, failure, retry, skipped...)"


def prometheus_name(name: str) -> str:
    """What the SDK's Prometheus exporter calls an instrument (without a counter's _total)."""
    return name.replace(".", "_")


@attrs.define(eq=False)
class Backlog:
    """One consumer's last reading, written by its watch and read at each scrape.

    ``reading`` is None while unknown (not read yet, or the last read failed): its series
    are then left out rather than frozen at a value that may no longer be true.
    """

    stream: str
    consumer: str
    reading: tuple[int, int] | None = None
    updated: float = 0.0

    def set(self, pending: int, ack_pending: int) -> None:
        self.updated = time.monotonic()
        self.reading = (pending, ack_pending)

    def clear(self) -> None:
        self.reading = None


class _Backlogs:
    """Every live :class:`Backlog` of the process, held weakly.

    Two drivers of one name in one process read the same consumer: the latest reading wins,
    so a series is never reported twice.
    """

    def __init__(self) -> None:
        self._all: weakref.WeakSet[Backlog] = weakref.WeakSet()
        self._lock = threading.Lock()
        #: Set once the SDK has the backlog gauges: the collector then leaves them out.
        self.via_otel = False

    def track(self, stream: str, consumer: str) -> Backlog:
        backlog = Backlog(stream, consumer)
        with self._lock:
            self._all.add(backlog)
        return backlog

    def readings(self) -> list[tuple[dict[str, str], tuple[int, int, int]]]:
        """(labels, (pending, ack_pending, backlog)) of each consumer with a known reading."""
        with self._lock:
            backlogs = list(self._all)
        latest: dict[tuple[str, str], Backlog] = {}
        for backlog in backlogs:
            key = (backlog.stream, backlog.consumer)
            if backlog.reading is not None and (
                key not in latest or backlog.updated > latest[key].updated
            ):
                latest[key] = backlog
        found = []
        for (stream, consumer), backlog in sorted(latest.items()):
            reading = backlog.reading
            if reading is not None:  # cleared since it was looked at
                pending, ack_pending = reading
                labels = {"consumer": consumer, "stream": stream}
                found.append((labels, (pending, ack_pending, pending + ack_pending)))
        return found


class Tally:
    """One driver's run counts, shaped like an OpenTelemetry counter (``add``).

    A driver counts on its own event loop, so one thread writes a tally and no lock is
    paid per run; a scrape copies it (one C call under the GIL, never half-written).
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, amount: int, attributes: Mapping[str, str]) -> None:
        outcome = attributes["outcome"]
        self.counts[outcome] = self.counts.get(outcome, 0) + amount


class _RunCounts:
    """``conveyor.driver.runs`` when no SDK counts it: the sum of every driver's tally.

    Tallies are kept after their driver stops, so the counter never goes down.
    """

    def __init__(self) -> None:
        self._tallies: list[Tally] = []
        self._lock = threading.Lock()
        #: Set once the SDK observes the counts: then it renders them, not the collector.
        self.via_otel = False

    def tally(self) -> Tally:
        """A new driver's counts, summed from now on."""
        tally = Tally()
        with self._lock:
            self._tallies.append(tally)
        return tally

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            tallies = list(self._tallies)
        return sum_tallies(tallies)


def sum_tallies(tallies: list[Tally]) -> dict[str, int]:
    """Run counts by outcome over ``tallies`` (safe beside the drivers that count)."""
    total: dict[str, int] = {}
    for tally in list(tallies):
        for outcome, count in tally.counts.copy().items():
            total[outcome] = total.get(outcome, 0) + count
    return total


BACKLOGS = _Backlogs()
RUNS = _RunCounts()


class _Collector:
    """Renders, into prometheus-client's registry, what the SDK does not."""

    def describe(self) -> list[Metric]:
        return []  # the families come and go with the SDK: nothing to reserve

    def collect(self) -> Iterator[Metric]:
        readings = [] if BACKLOGS.via_otel else BACKLOGS.readings()
        for name, description, which in BACKLOG_GAUGES if readings else ():
            gauge = GaugeMetricFamily(
                prometheus_name(name), description, labels=("consumer", "stream")
            )
            for labels, values in readings:
                gauge.add_metric((labels["consumer"], labels["stream"]), values[which])
            yield gauge
        counts = {} if RUNS.via_otel else RUNS.snapshot()
        if counts:
            runs = CounterMetricFamily(
                prometheus_name(RUNS_NAME), RUNS_DESCRIPTION, labels=("outcome",)
            )
            for outcome, count in sorted(counts.items()):
                runs.add_metric((outcome,), count)
            yield runs


_installed = threading.Lock()
_collector: list[_Collector] = []


def install() -> None:
    """Add the collector to prometheus-client's registry, once per process."""
    with _installed:
        if not _collector:
            _collector.append(_Collector())
            REGISTRY.register(_collector[0])


def render() -> tuple[int, str, bytes]:
    """``/metrics``: status, content type and Prometheus text of the whole registry."""
    install()
    try:
        return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
    except Exception:
        return 500, "text/plain; charset=utf-8", b"metrics could not be rendered\n"
