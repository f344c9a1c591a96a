"""Settlement against a real nats-server: a result the stream will not take, and every
delivery settled once however the client reads it."""

from __future__ import annotations

import dataclasses

from _helpers import (
    consumer_info,
    driver_message,
    resource_json,
    send,
    settled,
    stream_messages,
    wait_until,
)
from nats.aio.client import Client

from conveyor_driver import Context, Driver, Result
from conveyor_driver import protocol as p
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.runtime.connection import DriverClient
from conveyor_driver.runtime.consumer import Consumer
from conveyor_driver.runtime.dispatcher import Services
from conveyor_driver.telemetry import Telemetry
from conveyor_driver.testing import FakeConveyorClient
from conveyor_driver.testing.fake import LogRecorder


def _consumer(nc: Client, driver: Driver, recorder: LogRecorder, concurrency: int) -> Consumer:
    """The runtime's consumer of ``driver`` on ``nc``, logging to ``recorder``."""
    log = recorder.logger()
    services = Services(log=log, api=FakeConveyorClient(), telemetry=Telemetry())
    return Consumer(nc, driver, services, concurrency=concurrency, log=log)


async def test_a_result_refused_for_good_is_logged_once_and_the_run_is_settled(
    nats_client: Client,
) -> None:
    """A 4xx from the stream (here its ``max_msg_size``) never changes on a retry: the run
    is acked without its result, rather than kept alive and retried for ever."""
    js = nats_client.jetstream()
    config = (await js.stream_info(p.PIPELINE_STREAM)).config
    await js.update_stream(dataclasses.replace(config, max_msg_size=64))
    driver = Driver("refused")
    calls: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        calls.append(ctx.run_id)
        return Result.ok("built")

    recorder = LogRecorder()
    consumer = _consumer(nats_client, driver, recorder, concurrency=1)
    await consumer.ensure()
    await consumer.start()
    try:
        run_id = await send(nats_client, resource_json())
        await wait_until(lambda: calls == [run_id], what="handler ran")
        await wait_until(lambda: settled(nats_client, "refused"), what="acked")
        info = await consumer_info(nats_client, "refused")
    finally:
        await consumer.stop(0)

    assert info.num_redelivered == 0
    assert await stream_messages(nats_client, p.PIPELINE_STREAM) == 0
    [refusal] = [e for e in recorder.entries if e["event"].startswith("result refused")]
    assert refusal["level"] == "error" and refusal["run_id"] == run_id
    assert refusal["error"] == "400 message size exceeds maximum allowed"
    assert not [e for e in recorder.entries if e["event"].startswith("result not stored")]


async def test_plain_deliveries_skip_nats_py_s_queue_and_every_run_settles_once(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """On the driver's client, a delivery without headers is handed to the consumer as it
    is read; one with headers (a trace context, here) takes nats-py's way. Both run once
    and are settled."""
    driver = Driver("direct")
    calls: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        calls.append(ctx.run_id)

    nc = DriverClient()
    await nc.connect(nats_server.url)
    consumer = _consumer(nc, driver, LogRecorder(), concurrency=4)
    direct: list[str] = []
    plain = consumer._on_plain_delivery

    def counting(subject: bytes, reply: bytes, data: bytes) -> None:
        direct.append(subject.decode())
        plain(subject, reply, data)

    consumer._on_plain_delivery = counting  # type: ignore[method-assign]
    await consumer.ensure()
    await consumer.start()
    try:
        plain_runs = [await send(nats_client, resource_json(f"app-{n}")) for n in range(3)]
        run_id, body = driver_message(resource_json("traced"))
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        await nats_client.jetstream().publish(
            p.resource_subject("pipeline"), body, headers={"traceparent": traceparent}
        )
        await wait_until(lambda: len(calls) == 4, what="four runs")
        await wait_until(lambda: settled(nats_client, "direct"), what="all acked")
        info = await consumer_info(nats_client, "direct")
    finally:
        await consumer.stop(0)
        await nc.close()

    assert sorted(calls) == sorted([*plain_runs, run_id])
    assert len(direct) == 3  # the traced one came through the subscription's callback
    assert info.num_redelivered == 0
    assert await stream_messages(nats_client, p.PIPELINE_STREAM) == 4
