"""The garbage collector set for serving: in a process the driver owns, never in another's."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from _helpers import raw_results, wait_until
from apps.harness import app, driver_process
from apps.heap_app import driver as heap_driver
from nats.aio.client import Client

from conveyor_driver import Context, Driver
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event
from conveyor_driver.models import Resource
from conveyor_driver.runtime.consumer import ensure_consumer
from conveyor_driver.runtime.heap import YOUNG_THRESHOLD
from conveyor_driver.testing.fixtures import running

HEAP = app("heap_app.py:driver")


@pytest.mark.process
async def test_conveyor_driver_run_freezes_the_start_up_heap_and_collects_less_often(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    await ensure_consumer(nats_client, heap_driver)
    async with raw_results(nats_client) as results:
        run_id = (await emit_event(nats_client, Resource("job-0", "job"))).run_id
        async with driver_process(HEAP, "--nats-url", nats_server.url, "--max-runs", "1") as proc:
            assert await proc.wait() == 0, proc.output
        await results.wait(run_id)
    [body] = results.for_run(run_id)
    heap = body["driverresult"]["data"]
    assert heap["young"] == YOUNG_THRESHOLD
    assert heap["frozen"] > 10_000  # modules, clients, settings: what start-up built


@pytest.mark.nats
async def test_serve_in_an_applications_loop_leaves_its_collector_alone(
    nats_server: EmbeddedNats,
) -> None:
    driver = Driver("guest")
    seen: list[Any] = []

    @driver.on("job")
    async def job(ctx: Context) -> None:
        seen.append((gc.get_threshold(), gc.get_freeze_count()))

    before = (gc.get_threshold(), gc.get_freeze_count())
    async with running(driver, nats_server.url) as _:
        import nats

        nc = await nats.connect(nats_server.url)
        try:
            await emit_event(nc, Resource("job-0", "job"))
            await wait_until(lambda: seen, what="the run")
        finally:
            await nc.close()
    assert seen == [before]
