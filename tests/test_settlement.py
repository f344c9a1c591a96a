"""Settlement against a real nats-server: what happens to a result the stream will not take."""

from __future__ import annotations

import dataclasses

from _helpers import consumer_info, resource_json, send, settled, stream_messages, wait_until
from nats.aio.client import Client

from conveyor_driver import Context, Driver, Result
from conveyor_driver import protocol as p
from conveyor_driver.runtime.consumer import Consumer
from conveyor_driver.runtime.dispatcher import Services
from conveyor_driver.telemetry import Telemetry
from conveyor_driver.testing import FakeConveyorClient
from conveyor_driver.testing.fake import LogRecorder


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
    log = recorder.logger()
    consumer = Consumer(
        nats_client,
        driver,
        Services(log=log, api=FakeConveyorClient(), telemetry=Telemetry()),
        concurrency=1,
        log=log,
    )
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
