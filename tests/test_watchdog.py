"""The blocked-event-loop watchdog, in a real driver process: one warning naming the run,
the handler and the code holding the loop, and ``/healthz`` answering 503 while blocked."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from apps.harness import app, driver_process
from nats.aio.client import Client

from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.models import Resource
from conveyor_driver.runtime.watchdog import LoopWatchdog

BLOCKER = app("blocking_app.py:driver")  # ack_wait 6 s: unhealthy after 3 s blocked


async def _healthz(session: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
        return response.status, (await response.json())["status"]


@pytest.mark.process
async def test_a_blocked_loop_is_named_and_healthz_fails_while_it_lasts(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    port = free_port()
    args = ("--nats-url", nats_server.url, "--http-port", str(port), "--block-threshold", "0.5")
    seen: list[tuple[int, str]] = []
    async with (
        watch_results(nats_client) as watch,
        driver_process(BLOCKER, *args) as proc,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        await proc.started()
        assert await _healthz(session, port) == (200, "consuming")
        message = await emit_event(nats_client, Resource("slow", "job", spec={"block": 5}))
        warning = await proc.wait_for_log(
            "event loop blocked: a handler is holding it (use await, or a sync handler)"
        )
        deadline = time.monotonic() + 10
        while (time.monotonic() < deadline and not seen) or seen[-1][0] != 503:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                seen.append(await _healthz(session, port))
            await asyncio.sleep(0.2)
        result = await watch.wait(message.run_id, timeout=30)
        after = await _healthz(session, port)

    assert warning["run_id"] == message.run_id
    assert warning["handler"] == "block"
    assert "time.sleep" in warning["stack"]
    assert warning["level"] == "warning"
    # The probe answered from its own thread while the loop was blocked.
    assert seen[-1][0] == 503 and seen[-1][1].startswith("event loop blocked for ")
    assert result.driverresult.success
    assert after == (200, "consuming")
    blocked_warnings = [r for r in proc.records if r.get("event", "").startswith("event loop")]
    assert len(blocked_warnings) == 1  # one warning per block, not one per check


async def test_the_watchdog_measures_each_block_once() -> None:
    durations: list[float] = []
    watchdog = LoopWatchdog(
        asyncio.get_running_loop(),
        build_logger(level="error"),
        threshold=0.2,
        on_block=durations.append,
    )
    watchdog.start()
    try:
        await asyncio.sleep(0.3)
        assert watchdog.blocked_for() == 0.0
        time.sleep(0.8)  # noqa: ASYNC251 - the block under test
        assert watchdog.blocked_for() > 0.5
        await asyncio.sleep(0.5)
    finally:
        watchdog.stop()
    assert watchdog.blocks == 1
    assert len(durations) == 1 and 0.6 < durations[0] < 2.0
