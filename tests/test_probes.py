"""``/healthz``, ``/readyz`` and ``/metrics`` of a driver serving against a real nats-server.

Health means *consuming*: ``/healthz`` must fail when the pull loop stops iterating, even
though the process, the event loop and the NATS connection are all fine. Readiness follows
start-up, the NATS connection and shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from _helpers import TIMEOUT, driver_message, raw_results, resource_json, wait_until
from apps.harness import app, clean_env, driver_process
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from conveyor_driver import Context, Driver, Result
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.runtime import consumer as consumer_module
from conveyor_driver.runtime import server as server_module
from conveyor_driver.runtime.consumer import Consumer
from conveyor_driver.runtime.probes import DriverState
from conveyor_driver.settings import Settings
from conveyor_driver.testing.fixtures import running

READY = (200, {"status": "ready"})
CONSUMING = (200, {"status": "consuming"})


class Probes:
    """GETs against one driver's probe port."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.port = port

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(f"http://127.0.0.1:{self.port}{path}") as response:
            return response.status, await response.json()

    async def answers(self, path: str, status: int) -> bool:
        return (await self.get(path))[0] == status

    async def wait_for(self, path: str, expected: tuple[int, Any]) -> None:
        async def answered() -> bool:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                return await self.get(path) == expected
            return False

        await wait_until(answered, what=f"{path} answering {expected}")


@pytest_asyncio.fixture
async def probes() -> AsyncIterator[Probes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield Probes(session, free_port())


def idle_driver(name: str) -> Driver:
    driver = Driver(name)

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        return Result.ok("built")

    return driver


async def test_healthz_turns_503_when_the_consume_loop_wedges(
    monkeypatch: pytest.MonkeyPatch, nats_server: EmbeddedNats, probes: Probes
) -> None:
    stall_after = 2.0
    # The loop iterates every 0.2 s even when idle, so 2 s of silence is a real stall.
    monkeypatch.setattr(consumer_module, "PULL_HEARTBEAT", 0.2)
    monkeypatch.setattr(
        server_module, "DriverState", functools.partial(DriverState, stall_after=stall_after)
    )
    wedge = asyncio.Event()
    pull_forever = Consumer._pull_forever

    async def wedgeable(self: Consumer) -> None:
        loop = asyncio.ensure_future(pull_forever(self))
        try:
            await wedge.wait()
            loop.cancel()
            await asyncio.Event().wait()  # alive, never iterating again: a wedged loop
        finally:
            loop.cancel()

    monkeypatch.setattr(Consumer, "_pull_forever", wedgeable)

    async with running(idle_driver("wedgy"), nats_server.url, http_port=probes.port):
        await probes.wait_for("/readyz", READY)
        # Idle for longer than the stall threshold: a loop that iterates while idle stays
        # healthy. There is no event to wait for here; the observation is the point.
        for _ in range(int(stall_after * 2.5 / 0.25)):
            assert await probes.get("/healthz") == CONSUMING
            await asyncio.sleep(0.25)

        wedge.set()
        await wait_until(lambda: probes.answers("/healthz", 503), what="/healthz answering 503")
        status, body = await probes.get("/healthz")
        assert status == 503
        assert re.fullmatch(r"consume loop has not iterated for \d+s", body["status"]), body
        # Readiness is about the connection and the consumer, which are both fine.
        assert await probes.get("/readyz") == READY


async def test_readyz_is_503_during_start_up_and_200_once_consuming(
    nats_server: EmbeddedNats, probes: Probes
) -> None:
    driver = idle_driver("slow-start")
    entered = asyncio.Event()
    release = asyncio.Event()

    @driver.on_startup
    async def warm_up() -> None:
        entered.set()
        await release.wait()

    async with running(driver, nats_server.url, http_port=probes.port):
        await asyncio.wait_for(entered.wait(), TIMEOUT)
        assert await probes.get("/readyz") == (503, {"status": "starting"})
        assert await probes.get("/healthz") == (200, {"status": "starting"})
        release.set()
        await probes.wait_for("/readyz", READY)
        assert await probes.get("/healthz") == CONSUMING


async def test_readyz_is_503_while_nats_is_down_and_200_after_it_returns(
    nats_server: EmbeddedNats, nats_client: Client, probes: Probes
) -> None:
    driver = idle_driver("weather")
    async with running(driver, nats_server.url, http_port=probes.port):
        await probes.wait_for("/readyz", READY)

        await nats_server.stop()
        await probes.wait_for("/readyz", (503, {"status": "NATS connection lost; reconnecting"}))
        # Restarting the driver would not bring NATS back: it stays healthy meanwhile.
        assert await probes.get("/healthz") == CONSUMING

        await nats_server.start()
        await probes.wait_for("/readyz", READY)
        # Ready again means consuming again.
        await wait_until(lambda: nats_client.is_connected, what="test client reconnected")
        async with raw_results(nats_client) as results:
            run_id, body = driver_message(resource_json("after-outage"))
            await nats_client.jetstream().publish("resources.pipeline", body)
            await results.wait(run_id)
        assert results.for_run(run_id)[0]["driverresult"]["message"] == "built"


async def test_readyz_is_503_while_shutting_down_and_the_probes_close_after(
    nats_server: EmbeddedNats, nats_client: Client, probes: Probes
) -> None:
    driver = Driver("draining")
    started = asyncio.Event()
    release = asyncio.Event()

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        started.set()
        await release.wait()
        return Result.ok("finished during shutdown")

    async with (
        running(driver, nats_server.url, http_port=probes.port) as task,
        raw_results(nats_client) as results,
    ):
        await probes.wait_for("/readyz", READY)
        run_id, body = driver_message(resource_json("app"))
        await nats_client.jetstream().publish("resources.pipeline", body)
        await asyncio.wait_for(started.wait(), TIMEOUT)

        task.cancel()  # a stop: the running handler gets its grace period
        try:
            await probes.wait_for("/readyz", (503, {"status": "shutting down"}))
        finally:
            release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await results.wait(run_id)

    with pytest.raises(aiohttp.ClientConnectionError):
        await probes.get("/readyz")


async def test_probes_listen_on_the_http_host_only(
    nats_server: EmbeddedNats, probes: Probes
) -> None:
    # 127.0.0.2 is loopback too on Linux: listening there, the probes do not answer on .1.
    async with running(
        idle_driver("hosted"), nats_server.url, http_port=probes.port, http_host="127.0.0.2"
    ):
        async with probes.session.get(f"http://127.0.0.2:{probes.port}/healthz") as response:
            assert response.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            await probes.get("/healthz")


def test_http_port_is_read_from_the_environment() -> None:
    assert Settings.from_env({"CONVEYOR_HTTP_PORT": "9464"}).http_port == 9464
    assert Settings.from_env({}).http_port is None


@pytest.mark.process
async def test_metrics_are_served_as_prometheus_text_by_the_cli(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    # A process of its own: --http-port makes the CLI install the SDK with a Prometheus
    # reader, which this pytest process cannot do twice.
    port = free_port()
    env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
    args = ("--nats-url", nats_server.url, "--http-port", str(port), "--log-format", "json")
    async with (
        driver_process(app("worker_app.py:driver"), *args, env=env) as proc,
        raw_results(nats_client) as results,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        await proc.started()
        run_id, body = driver_message(resource_json("a", "job"))
        await nats_client.jetstream().publish("resources.job", body)
        await results.wait(run_id)

        async def scrape() -> tuple[str, str]:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                return response.headers["Content-Type"], await response.text()

        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        families: dict[str, str] = {}

        async def lines_shipped() -> bool:
            # The sink publishes in the background; the worker logs "handler started",
            # "handler finished", then the runtime "run succeeded": three lines once acked.
            content_type, text = await scrape()
            assert content_type.startswith("text/plain; version=")
            samples.clear()
            for family in text_string_to_metric_families(text):
                families[family.name] = family.type
                for sample in family.samples:
                    labels = {k: v for k, v in sample.labels.items() if not k.startswith("otel_")}
                    samples[(sample.name, tuple(sorted(labels.items())))] = sample.value
            key = ("conveyor_driver_log_lines_total", (("sink", "nats"), ("status", "sent")))
            return samples.get(key) == 3

        await wait_until(lines_shipped, what="the run's three log lines counted as sent")

    assert families["conveyor_driver_runs"] == "counter"
    assert families["messaging_process_duration_seconds"] == "histogram"
    assert families["conveyor_driver_inflight"] == "gauge"
    assert families["conveyor_driver_log_lines"] == "counter"

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("conveyor_driver_runs_total", outcome="success") == 1
    duration = {"conveyor_resource_type": "job", "conveyor_outcome": "success"}
    assert value("messaging_process_duration_seconds_count", **duration) == 1
    assert value("conveyor_driver_inflight") == 0
    # Both series exist from the start, so a dashboard can alert on "dropped" before any.
    assert value("conveyor_driver_log_lines_total", sink="nats", status="dropped") == 0
