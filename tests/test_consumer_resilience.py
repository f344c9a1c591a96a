"""The consumer when JetStream says no, against a real nats-server: a consumer the server
will not create, its consumer deleted under it, a refused pull, a consumer that cannot be
created again, and result publishes that find no stream, no answer or a size limit. The
driver says what happened and carries on (or, at start-up, stops with one line)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import orjson
import pytest
from _helpers import raw_results, resource_json, send, settled, stream_messages, wait_until
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, ConsumerInfo
from nats.js.errors import NotFoundError

from conveyor_driver import Context, Driver, Result, Settings
from conveyor_driver import protocol as p
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.errors import ConsumerSetupError
from conveyor_driver.testing import running


class Logged:
    """The driver's JSON log records, as ``running`` writes them to the captured stderr."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self._records: list[dict[str, Any]] = []

    def records(self, event: str) -> list[dict[str, Any]]:
        for line in self._capsys.readouterr().err.splitlines():
            if line.startswith("{"):
                self._records.append(orjson.loads(line))
        return [record for record in self._records if record["event"] == event]

    async def wait(self, event: str, count: int = 1) -> list[dict[str, Any]]:
        await wait_until(lambda: len(self.records(event)) >= count, what=f"log {event!r}")
        return self.records(event)


@pytest.fixture
def logged(capsys: pytest.CaptureFixture[str]) -> Logged:
    return Logged(capsys)


def builder(name: str) -> tuple[Driver, list[str]]:
    """A driver whose handler records each run it is given."""
    driver = Driver(name)
    calls: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        calls.append(ctx.run_id)
        return Result.ok("built")

    return driver, calls


async def _has_consumer(nc: Client, name: str) -> bool:
    try:
        await nc.jetstream().consumer_info(p.MESSAGES_STREAM, name)
    except NotFoundError:
        return False
    return True


# --- the driver's consumer ---------------------------------------------------------------


async def test_a_consumer_deleted_under_the_driver_is_created_again_and_work_goes_on(
    nats_server: EmbeddedNats, nats_client: Client, logged: Logged
) -> None:
    driver, calls = builder("phoenix")
    async with raw_results(nats_client) as results, running(driver, nats_server.url) as task:
        await nats_client.jetstream().delete_consumer(p.MESSAGES_STREAM, "phoenix")
        # JetStream answers the open pull request: that is how the driver learns of it.
        [refused] = await logged.wait("pull request refused")
        await logged.wait("consumer was deleted; recreated it")
        await wait_until(lambda: _has_consumer(nats_client, "phoenix"), what="the consumer back")
        run_id = await send(nats_client, resource_json())
        await results.wait(run_id)
        await wait_until(lambda: settled(nats_client, "phoenix"), what="acked")
        assert not task.done()

    assert (refused["status"], refused["description"]) == ("409", "Consumer Deleted")
    assert calls == [run_id]
    assert results.for_run(run_id)[0]["driverresult"]["success"] is True


async def test_a_consumer_that_cannot_be_created_again_is_an_error_and_the_driver_keeps_asking(
    nats_server: EmbeddedNats, nats_client: Client, logged: Logged
) -> None:
    """The messages stream deleted (its consumers go with it): creating the consumer again
    fails, the driver says so once, and its pulls (refused, nobody answers them) go on
    slowly instead of the driver stopping or spinning."""
    driver, _calls = builder("orphan")
    async with running(driver, nats_server.url) as task:
        await nats_client.jetstream().delete_stream(p.MESSAGES_STREAM)
        [failed] = await logged.wait(
            "consumer was deleted and could not be recreated; trying again"
        )
        refused = await logged.wait("pull request refused", count=3)
        assert not task.done()

    assert "stream not found" in failed["error"]
    # "Consumer Deleted" to a pull open at the time; then no responders: no consumer.
    assert {r["status"] for r in refused} <= {"409", "503"}
    assert refused[-1]["status"] == "503"
    assert len(logged.records("consumer was deleted and could not be recreated; trying again")) == 1


async def test_a_driver_whose_stream_comes_back_consumes_again(
    nats_server: EmbeddedNats, nats_client: Client, logged: Logged
) -> None:
    driver, calls = builder("returning")
    js = nats_client.jetstream()
    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        await js.delete_stream(p.MESSAGES_STREAM)
        await logged.wait("consumer was deleted and could not be recreated; trying again")
        await js.add_stream(p.server_streams()[0])
        await wait_until(
            lambda: _has_consumer(nats_client, "returning"), timeout=30, what="the consumer back"
        )
        run_id = await send(nats_client, resource_json())
        await results.wait(run_id)
    assert calls == [run_id]


async def _serve_against_a_push_consumer(url: str, nc: Client) -> tuple[str, float]:
    """Serve a driver whose durable name a push consumer already holds: the one-line
    start-up error, and how long it took to come."""
    driver, calls = builder("clash")
    await nc.jetstream().add_consumer(
        p.MESSAGES_STREAM, ConsumerConfig(durable_name="clash", deliver_subject="elsewhere")
    )
    started = time.monotonic()
    with pytest.raises(ConsumerSetupError) as refused:
        await driver.serve(Settings(nats_urls=url, startup_timeout=2))
    assert calls == []
    return str(refused.value), time.monotonic() - started


async def test_a_consumer_the_server_will_not_create_is_one_line_naming_its_reason(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    message, _ = await _serve_against_a_push_consumer(nats_server.url, nats_client)
    assert message.startswith("cannot create consumer 'clash' on stream 'messages': ")
    assert "can not update push consumer to pull based" in message


async def test_a_consumer_the_server_will_not_create_is_refused_at_once(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    message, took = await _serve_against_a_push_consumer(nats_server.url, nats_client)
    assert took < 1
    assert "did not answer" not in message


# --- result publishes --------------------------------------------------------------------


async def test_a_result_with_no_stream_to_take_it_is_retried_until_the_stream_is_back(
    nats_server: EmbeddedNats, nats_client: Client, logged: Logged
) -> None:
    """No stream on the result subject: the publish gets no responders (503) at once. The
    run stays in flight, and its result is stored once the Conveyor server's stream is."""
    driver, calls = builder("patient")
    js = nats_client.jetstream()
    await js.delete_stream(p.PIPELINE_STREAM)
    async with running(driver, nats_server.url):
        run_id = await send(nats_client, resource_json())
        [retrying] = await logged.wait("result not stored yet; retrying")
        assert (await _consumer_pending(nats_client, "patient")) == 1  # not acked meanwhile
        await js.add_stream(p.server_streams()[1])
        await wait_until(lambda: stream_messages(nats_client, p.PIPELINE_STREAM), what="stored")
        await wait_until(lambda: settled(nats_client, "patient"), what="acked")
        [published] = await logged.wait("result published")
        stored = await js.get_msg(p.PIPELINE_STREAM, subject=p.RESULT_SUBJECT)

    assert calls == [run_id]
    assert retrying["run_id"] == run_id and retrying["tries"] == 1
    assert "NoStreamResponseError" in retrying["error"] or "no response" in retrying["error"]
    assert published["run_id"] == run_id and published["tries"] >= 2
    assert orjson.loads(stored.data or b"{}")["run_id"] == run_id


async def test_a_result_publish_nobody_acknowledges_times_out_and_is_retried(
    nats_server: EmbeddedNats, nats_client: Client, logged: Logged
) -> None:
    """Something listens on the result subject but is no stream: the publish is delivered
    and never acknowledged. The driver gives up on that try and publishes again."""
    driver, calls = builder("insistent")
    js = nats_client.jetstream()
    await js.delete_stream(p.PIPELINE_STREAM)
    swallowed: list[Msg] = []

    async def swallow(msg: Msg) -> None:
        swallowed.append(msg)

    silent = await nats_client.subscribe(p.RESULT_SUBJECT, cb=swallow)
    async with running(driver, nats_server.url):
        run_id = await send(nats_client, resource_json())
        await wait_until(lambda: swallowed, what="a result publish")
        await js.add_stream(p.server_streams()[1])
        await silent.unsubscribe()
        [retrying] = await logged.wait("result not stored yet; retrying")
        await wait_until(lambda: settled(nats_client, "insistent"), what="acked")
        stored = await js.get_msg(p.PIPELINE_STREAM, subject=p.RESULT_SUBJECT)

    assert calls == [run_id]
    assert retrying["run_id"] == run_id and retrying["error"]
    assert orjson.loads(stored.data or b"{}")["run_id"] == run_id


async def test_a_result_larger_than_the_stream_takes_settles_the_run_without_it(
    nats_server: EmbeddedNats, nats_client: Client, logged: Logged
) -> None:
    """The stream's own size limit (below the server's max_payload) refuses the result:
    that never changes however often it is tried, so the run is acked without one."""
    driver = Driver("oversized")
    calls: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        calls.append(ctx.run_id)
        return Result.ok("built", data={"blob": "x" * 4_000})

    js = nats_client.jetstream()
    await js.update_stream(dataclasses.replace(p.server_streams()[1], max_msg_size=2_000))
    async with running(driver, nats_server.url):
        run_id = await send(nats_client, resource_json())
        [refused] = await logged.wait("result refused as too large; the run is settled without it")
        await wait_until(lambda: settled(nats_client, "oversized"), what="acked")
        info = await _consumer_info(nats_client, "oversized")

    assert calls == [run_id]
    assert refused["run_id"] == run_id and refused["size"] > 4_000
    assert info.num_redelivered == 0
    assert await stream_messages(nats_client, p.PIPELINE_STREAM) == 0
    assert logged.records("result not stored yet; retrying") == []


async def _consumer_info(nc: Client, name: str) -> ConsumerInfo:
    info: ConsumerInfo = await nc.jetstream().consumer_info(p.MESSAGES_STREAM, name)
    return info


async def _consumer_pending(nc: Client, name: str) -> int:
    return (await _consumer_info(nc, name)).num_ack_pending or 0
