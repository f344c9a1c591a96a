"""The backlog on ``/metrics``, for autoscalers, with and without the OpenTelemetry SDK.

The gauges must follow the consumer as the server sees it (``num_pending``,
``num_ack_pending``) while messages pile up and drain; ``/metrics`` must show them and the
run counts under the same names whether or not the ``[otel]`` extra is there; and
``conveyor-driver lag`` must serve them without ever running a handler. Drivers run as
real ``conveyor-driver`` processes against a real nats-server: the SDK's providers can be
set once per process, and "without the SDK" is a process whose imports of it fail.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from _helpers import consumer_info, driver_message, resource_json, wait_until
from apps.harness import CLI, DriverProcess, app, clean_env, cli_process, driver_process, run_cli
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from conveyor_driver import Context, Driver, protocol
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.exposition import BACKLOGS
from conveyor_driver.runtime.backlog import BacklogWatch
from conveyor_driver.runtime.consumer import ensure_consumer

GATED = app("gated_app.py:driver")
CONSUMER = (("consumer", "gated"), ("stream", protocol.MESSAGES_STREAM))
#: What the backlog families are, with and without the SDK: one name scheme.
FAMILIES = {
    "conveyor_driver_consumer_pending": "gauge",
    "conveyor_driver_consumer_ack_pending": "gauge",
    "conveyor_driver_backlog": "gauge",
}
#: ``python -c`` as the ``conveyor-driver`` command, in a process where the SDK and its
#: exporters cannot be imported: what a install without the ``[otel]`` extra sees.
WITHOUT_SDK = (
    sys.executable,
    "-c",
    "import sys\n"
    "for name in ('opentelemetry.sdk', 'opentelemetry.exporter'):\n"
    "    sys.modules[name] = None\n"
    "from conveyor_driver.cli import main\n"
    "sys.argv[0] = 'conveyor-driver'\n"
    "main()\n",
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Metrics:
    """Scrapes of one process's ``/metrics``."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.port = port
        self.families: dict[str, str] = {}
        #: Which samples came through the SDK (it labels them with its scope).
        self.via_sdk: set[str] = set()

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(f"http://127.0.0.1:{self.port}{path}") as response:
            return response.status, await response.json()

    async def scrape(self) -> Samples:
        async with self.session.get(f"http://127.0.0.1:{self.port}/metrics") as response:
            assert response.status == 200, await response.text()
            text = await response.text()
        samples: Samples = {}
        self.families = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for sample in family.samples:
                # The SDK adds its scope as labels; the names and our labels are the scheme.
                labels = {k: v for k, v in sample.labels.items() if not k.startswith("otel_")}
                if "otel_scope_name" in sample.labels:
                    self.via_sdk.add(sample.name)
                key = (sample.name, tuple(sorted(labels.items())))
                assert key not in samples, f"{key} exported twice:\n{text}"
                samples[key] = sample.value
        return samples

    async def backlog(self) -> tuple[float | None, ...]:
        samples = await self.scrape()
        return tuple(samples.get((name, CONSUMER)) for name in FAMILIES)


async def server_backlog(nc: Client) -> tuple[int, int]:
    info = await consumer_info(nc, "gated")
    return info.num_pending or 0, info.num_ack_pending or 0


async def until_backlog(nc: Client, metrics: Metrics, pending: int, ack_pending: int) -> None:
    """The server's consumer and the gauges both say (pending, ack_pending)."""
    expected = (pending, ack_pending)
    seen: list[object] = []

    async def matches() -> bool:
        on_server = await server_backlog(nc)
        exported = await metrics.backlog()
        seen[:] = [on_server, exported]
        return on_server == expected and exported == (pending, ack_pending, pending + ack_pending)

    try:
        await wait_until(matches, what=f"backlog {expected}")
    except TimeoutError:
        raise AssertionError(f"wanted {expected}; server, /metrics: {seen}") from None


async def publish_jobs(nc: Client, count: int, **spec: str) -> None:
    for index in range(count):
        _, body = driver_message(resource_json(f"job-{index}", "job", spec=dict(spec)))
        await nc.jetstream().publish("resources.job", body)


def child(*argv: str) -> contextlib.AbstractAsyncContextManager[DriverProcess]:
    """A ``conveyor-driver`` process (any command) for the length of the block, without the
    ``OTEL_*`` variables of the test's own environment."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
    return cli_process(*argv, env=env)


@contextlib.asynccontextmanager
async def scraping(port: int) -> AsyncIterator[Metrics]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield Metrics(session, port)


@pytest.mark.process
@pytest.mark.parametrize("sdk", [True, False], ids=["sdk", "no-sdk"])
async def test_the_backlog_gauges_match_the_consumer_while_messages_pile_up_and_drain(
    sdk: bool, nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    port = free_port()
    command = (*CLI, "run") if sdk else (*WITHOUT_SDK, "run")
    gate = tmp_path / "gate"
    args = ("--nats-url", nats_server.url, "--http-port", str(port), "--lag-interval", "0.5")
    async with (
        child(*command, GATED, *args, "--log-format", "json") as proc,
        scraping(port) as metrics,
    ):
        await proc.started()
        # Concurrency 1 and a handler waiting at its gate: one runs, the rest wait.
        await publish_jobs(nats_client, 3, gate=str(gate))
        await until_backlog(nats_client, metrics, 2, 1)
        await publish_jobs(nats_client, 3, gate=str(gate))
        await until_backlog(nats_client, metrics, 5, 1)

        gate.touch()
        await until_backlog(nats_client, metrics, 0, 0)

        async def counted() -> bool:
            samples = await metrics.scrape()
            return samples.get(("conveyor_driver_runs_total", (("outcome", "success"),))) == 6

        await wait_until(counted, what="six successful runs counted on /metrics")

    for name, kind in {**FAMILIES, "conveyor_driver_runs": "counter"}.items():
        assert metrics.families.get(name) == kind, (name, metrics.families)
    # The SDK reports its resource as target_info: the process without it really had none.
    assert ("target_info" in metrics.families) is sdk
    # With the SDK, the SDK exports them (so OTLP carries them too), and nothing else does.
    expected = {"conveyor_driver_backlog", "conveyor_driver_runs_total"} if sdk else set()
    assert expected == metrics.via_sdk & {"conveyor_driver_backlog", "conveyor_driver_runs_total"}


@pytest.mark.process
async def test_lag_mode_runs_no_handler_and_serves_the_backlog(
    nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    port = free_port()
    marks = [tmp_path / f"mark-{index}" for index in range(3)]
    args = ("--nats-url", nats_server.url, "--http-port", str(port), "--lag-interval", "0.5")
    # No instance has ever run: the consumer does not exist, and nothing would be kept.
    async with (
        child(*CLI, "lag", GATED, *args, "--log-format", "json") as proc,
        scraping(port) as metrics,
    ):
        await proc.wait_for_log("backlog exporter started")
        assert await metrics.get("/readyz") == (200, {"status": "ready"})
        assert await metrics.get("/healthz") == (200, {"status": "watching the backlog"})
        await proc.wait_for_log("consumer was missing: created it, so that events are kept")
        for mark in marks:
            _, body = driver_message(resource_json(mark.name, "job", spec={"mark": str(mark)}))
            await nats_client.jetstream().publish("resources.job", body)

        await until_backlog(nats_client, metrics, 3, 0)
        samples = await metrics.scrape()
        assert not any(name.startswith("conveyor_driver_runs") for name, _ in samples)
        info = await consumer_info(nats_client, "gated")
        assert (
            info.delivered is not None and info.delivered.consumer_seq == 0
        )  # never pulled: not one delivery
        assert info.num_waiting == 0
        assert not any(mark.exists() for mark in marks)

        proc.send(signal.SIGTERM)
        assert await proc.wait() == 0
        await proc.wait_for_log("backlog exporter stopped")

    # The events were kept for the driver, whose handler does leave its marks.
    env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
    async with driver_process(GATED, "--nats-url", nats_server.url, env=env) as driver:
        await driver.started()
        await wait_until(lambda: all(mark.exists() for mark in marks), what="the three marks")


@pytest.mark.process
async def test_lag_mode_leaves_an_existing_consumer_alone_and_puts_back_a_deleted_one(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    # The consumer of another version of the app: lag must not rewrite it.
    other = Driver("gated", ack_wait=99.0)

    @other.on("job")
    async def work(ctx: Context) -> None: ...

    await ensure_consumer(nats_client, other)
    port = free_port()
    args = ("--nats-url", nats_server.url, "--http-port", str(port), "--lag-interval", "0.5")
    created = "consumer was missing: created it, so that events are kept"
    async with (
        child(*CLI, "lag", GATED, *args, "--log-format", "json") as proc,
        scraping(port) as metrics,
    ):
        await proc.wait_for_log("backlog exporter started")
        await publish_jobs(nats_client, 2)
        await until_backlog(nats_client, metrics, 2, 0)
        assert (await consumer_info(nats_client, "gated")).config.ack_wait == 99.0
        assert not any(record.get("event") == created for record in proc.records)

        await nats_client.jetstream().delete_consumer(protocol.MESSAGES_STREAM, "gated")
        await proc.wait_for_log(created)
        # Put back as the driver would create it, and reported again from zero.
        assert (await consumer_info(nats_client, "gated")).config.ack_wait == 30.0
        await publish_jobs(nats_client, 1)
        await until_backlog(nats_client, metrics, 1, 0)
    warned = [r for r in proc.records if r.get("event", "").startswith("backlog unknown")]
    assert [r["consumer"] for r in warned] == ["gated"], proc.output


@pytest.mark.process
async def test_lag_mode_needs_the_http_port(nats_server: EmbeddedNats) -> None:
    done = await run_cli("lag", GATED, "--nats-url", nats_server.url)
    assert done.returncode == 1
    assert done.stderr_lines == [
        "Error: conveyor-driver lag serves the backlog on /metrics: give it --http-port "
        "(or CONVEYOR_HTTP_PORT)"
    ], done.stderr


async def test_a_failed_reading_leaves_the_backlog_out_until_one_succeeds(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("weathered")

    @driver.on("job")
    async def work(ctx: Context) -> None: ...

    await ensure_consumer(nats_client, driver)
    for index in range(2):
        _, body = driver_message(resource_json(f"w-{index}", "job"))
        await nats_client.jetstream().publish("resources.job", body)

    def exported() -> tuple[int, int, int] | None:
        for labels, values in BACKLOGS.readings():
            if labels["consumer"] == "weathered":
                return values
        return None

    with structlog.testing.capture_logs() as logs:
        watch = BacklogWatch(nats_client, "weathered", 0.2, structlog.get_logger())
        await watch.read()
        assert exported() == (2, 0, 2)

        await nats_server.stop()
        await watch.read()
        await watch.read()
        assert exported() is None  # left out, not frozen at (2, 0, 2)

        await nats_server.start()

        async def read_again() -> bool:
            await watch.read()
            return exported() == (2, 0, 2)

        await wait_until(read_again, what="the backlog read again")
    events = [entry["event"] for entry in logs]
    unknown = "backlog unknown: the backlog series are left out until a reading succeeds"
    assert events == [unknown, "backlog readable again"], logs


def test_two_readings_of_one_consumer_export_once_the_latest() -> None:
    older = BACKLOGS.track("messages", "twice")
    newer = BACKLOGS.track("messages", "twice")
    older.set(7, 1)
    newer.set(3, 2)

    def twice() -> list[tuple[int, int, int]]:
        return [values for labels, values in BACKLOGS.readings() if labels["consumer"] == "twice"]

    assert twice() == [(3, 2, 5)]
    newer.clear()
    assert twice() == [(7, 1, 8)]
    older.clear()
    assert twice() == []
