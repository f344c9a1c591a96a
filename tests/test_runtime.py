"""The runtime, in process, against a real nats-server: the consumer it creates, what it
publishes, how it settles each message, and how it survives outages and shutdowns."""

from __future__ import annotations

import asyncio
import json

import pytest
from _helpers import (
    TIMEOUT,
    advisories,
    consumer_info,
    driver_message,
    publish,
    raw_results,
    resource_json,
    send,
    settled,
    stream_messages,
    terminations,
    wait_until,
)
from nats.aio.client import Client
from nats.js.api import AckPolicy, DeliverPolicy
from nats.js.errors import NoStreamResponseError

from conveyor_driver import Context, Driver, Fail, Resource, Result, Retry, Settings, outcomes
from conveyor_driver import protocol as p
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.errors import NatsUnavailableError, StreamMissingError
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.runtime.consumer import Consumer
from conveyor_driver.runtime.dispatcher import Services
from conveyor_driver.telemetry import Telemetry
from conveyor_driver.testing import FakeConveyorClient
from conveyor_driver.testing.fixtures import running


async def test_consumer_config_follows_the_protocol(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("configured", ack_wait=7.5, concurrency=4)

    @driver.on("pipeline", "deployment")
    async def handle(ctx: Context) -> None:
        return None

    async with running(driver, nats_server.url):
        info = await consumer_info(nats_client, "configured")

    config = info.config
    assert info.name == "configured"
    assert config.durable_name == "configured"
    assert sorted(config.filter_subjects or []) == [
        "drivers.configured.resources.deployment",
        "drivers.configured.resources.pipeline",
        "resources.deployment",
        "resources.pipeline",
    ]
    assert config.ack_policy == AckPolicy.EXPLICIT
    assert config.deliver_policy == DeliverPolicy.ALL
    assert config.ack_wait == 7.5
    # The consumer must outlive the process: `messages` drops what nobody is interested in.
    assert config.inactive_threshold in (None, 0)
    # 1 would serialise every instance of the driver (the Go runtime's choice, refused here).
    assert config.max_ack_pending != 1


async def test_result_has_the_server_shape_and_the_message_is_acked(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("shape")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        return Result.ok("built", data={"image": f"{ctx.resource.name}:1"})

    resource = resource_json("app", pipeline="ci", metadata={"version": "3"})
    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        run_id = await send(nats_client, resource)
        await results.wait(run_id)
        await wait_until(lambda: settled(nats_client, "shape"), what="message acked")
        info = await consumer_info(nats_client, "shape")

    assert results.for_run(run_id) == [
        {
            "event": "driver.result",
            "run_id": run_id,
            "resource": resource,
            "driverresult": {
                "success": True,
                "message": "built",
                "data": {"image": "app:1"},
                "driver": "shape",
            },
        }
    ]
    assert info.num_redelivered == 0
    # Interest retention: once the only interested consumer acked it, the event is gone.
    assert await stream_messages(nats_client, p.MESSAGES_STREAM) == 0
    # Published on JetStream, not only core: the server's work queue holds it.
    assert await stream_messages(nats_client, p.PIPELINE_STREAM) == 1


@pytest.mark.parametrize("payload_as_string", [True, False], ids=["string", "object"])
async def test_payload_as_json_string_or_object(
    nats_server: EmbeddedNats, nats_client: Client, payload_as_string: bool
) -> None:
    driver = Driver("payloads")
    seen: list[Resource] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        seen.append(ctx.resource)

    resource = resource_json("app", spec={"repo": "r", "steps": [1, 2]})
    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        run_id = await send(nats_client, resource, payload_as_string=payload_as_string)
        await results.wait(run_id)

    assert seen == [
        Resource(
            id=resource["id"],
            name="app",
            type="pipeline",
            metadata={"version": "1"},
            spec={"repo": "r", "steps": [1, 2]},
        )
    ]
    [body] = results.for_run(run_id)
    assert body["resource"] == resource
    assert body["driverresult"]["success"] is True


async def test_both_subjects_reach_the_handler_and_other_drivers_do_not(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("router")
    seen: list[tuple[str, str]] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        seen.append((ctx.run_id, ctx.subject))

    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        direct = await send(nats_client, resource_json("a"))
        elsewhere = await send(
            nats_client,
            resource_json("b"),
            subject=p.driver_resource_subject("someone-else", "pipeline"),
        )
        addressed = await send(
            nats_client,
            resource_json("c"),
            subject=p.driver_resource_subject("router", "pipeline"),
        )
        # The consumer delivers in stream order: once the last one is handled, the
        # message for the other driver would have been handled already if it matched.
        await results.wait(direct)
        await results.wait(addressed)

    assert seen == [
        (direct, "resources.pipeline"),
        (addressed, "drivers.router.resources.pipeline"),
    ]
    assert results.for_run(elsewhere) == []


async def test_event_filter_routes_create_and_skips_an_unhandled_broadcast_quietly(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("filtered")
    seen: list[tuple[str, str]] = []

    @driver.on("pipeline", events=["create"])
    async def create(ctx: Context) -> None:
        seen.append((ctx.run_id, ctx.event))

    async with (
        raw_results(nats_client) as results,
        terminations(nats_client, "filtered") as terminated,
        running(driver, nats_server.url),
    ):
        delete_id, delete_body = driver_message(resource_json(), event="delete")
        await publish(nats_client, "resources.pipeline", delete_body)
        create_id = await send(nats_client, resource_json(), event="create")
        await results.wait(create_id)
        await wait_until(lambda: settled(nats_client, "filtered"), what="all settled")
        info = await consumer_info(nats_client, "filtered")

    assert seen == [(create_id, "create")]
    assert results.for_run(delete_id) == []
    # Acked, not terminated: a term is an advisory (and an alert) on every broadcast.
    assert terminated == []
    assert info.num_redelivered == 0


async def test_an_unhandled_step_addressed_to_the_driver_reports_a_failure(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("stepper")

    @driver.on("pipeline", events=["create"])
    async def create(ctx: Context) -> None:
        return None

    async with (
        raw_results(nats_client) as results,
        terminations(nats_client, "stepper") as terminated,
        running(driver, nats_server.url),
    ):
        run_id = await send(
            nats_client,
            resource_json(pipeline="ci"),
            subject="drivers.stepper.resources.pipeline",
            event="process",
        )
        await results.wait(run_id)
        await wait_until(lambda: settled(nats_client, "stepper"), what="all settled")

    (body,) = results.for_run(run_id)
    assert body["driverresult"] == {
        "success": False,
        "message": "driver 'stepper' has no handler for event 'process' of type 'pipeline'",
        "data": None,
        "driver": "stepper",
    }
    assert terminated == []


async def test_fail_publishes_a_failure_and_acks_once(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("failing")
    attempts: list[int] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise Fail("spec.repo is not a git URL", data={"field": "repo"})

    async with (
        raw_results(nats_client) as results,
        terminations(nats_client, "failing") as terminated,
        running(driver, nats_server.url),
    ):
        run_id = await send(nats_client, resource_json())
        await results.wait(run_id)
        await wait_until(lambda: settled(nats_client, "failing"), what="message acked")
        info = await consumer_info(nats_client, "failing")

    [body] = results.for_run(run_id)
    assert body["driverresult"] == {
        "success": False,
        "message": "spec.repo is not a git URL",
        "data": {"field": "repo"},
        "driver": "failing",
    }
    assert attempts == [1]
    assert terminated == []  # acked, not terminated: the failure is a reported outcome
    assert info.num_redelivered == 0
    assert await stream_messages(nats_client, p.MESSAGES_STREAM) == 0


async def test_retry_naks_with_its_delay_and_publishes_only_the_final_result(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("retrying")
    attempts: list[int] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Retry("cluster not ready", delay=0.2)
        return Result.ok("deployed")

    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        run_id = await send(nats_client, resource_json())
        await results.wait(run_id)
        await wait_until(lambda: settled(nats_client, "retrying"), what="message acked")

    assert attempts == [1, 2]
    assert [body["driverresult"] for body in results.for_run(run_id)] == [
        {"success": True, "message": "deployed", "data": None, "driver": "retrying"}
    ]


async def test_exception_is_retried_then_gives_up_with_one_failure(
    nats_server: EmbeddedNats, nats_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outcomes, "BACKOFF_BASE", 0.1)
    driver = Driver("exploding", max_attempts=3)
    attempts: list[int] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ValueError("boom")

    async with (
        raw_results(nats_client) as results,
        terminations(nats_client, "exploding") as terminated,
        running(driver, nats_server.url),
    ):
        run_id, body = driver_message(resource_json())
        sequence = await publish(nats_client, "resources.pipeline", body)
        # The result is published before the term, so after the advisory both are final.
        await wait_until(lambda: terminated == [sequence], timeout=60, what="terminated")
        await results.wait(run_id)
        info = await consumer_info(nats_client, "exploding")

    assert attempts == [1, 2, 3]
    assert [body["driverresult"] for body in results.for_run(run_id)] == [
        {
            "success": False,
            "message": "gave up after 3 attempts: attempt 1: ValueError: boom; "
            "attempt 2: ValueError: boom; attempt 3: ValueError: boom",
            "data": None,
            "driver": "exploding",
        }
    ]
    assert info.num_ack_pending == 0
    assert info.num_pending == 0


async def test_malformed_messages_are_terminated_and_the_driver_goes_on(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("sturdy")
    seen: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        seen.append(ctx.run_id)

    bad_bodies = [
        b"this is not json {",
        json.dumps({"event": "create", "id": "m1", "run_id": "r1"}).encode(),
        json.dumps({"event": "create", "payload": 42, "id": "m2", "run_id": "r2"}).encode(),
        json.dumps({"event": "create", "payload": "[1, 2]", "id": "m3", "run_id": "r3"}).encode(),
    ]
    async with (
        raw_results(nats_client) as results,
        terminations(nats_client, "sturdy") as terminated,
        running(driver, nats_server.url) as task,
    ):
        bad_sequences = [
            await publish(nats_client, "resources.pipeline", body) for body in bad_bodies
        ]
        first = await send(nats_client, resource_json("first"))
        await results.wait(first)
        second = await send(nats_client, resource_json("second"))
        await results.wait(second)
        await wait_until(
            lambda: sorted(terminated) == bad_sequences, what="malformed messages terminated"
        )
        await wait_until(lambda: settled(nats_client, "sturdy"), what="all settled")
        info = await consumer_info(nats_client, "sturdy")
        still_running = not task.done()

    assert seen == [first, second]
    assert info.num_redelivered == 0
    assert len(results.bodies) == 2
    assert still_running


async def test_handler_longer_than_ack_wait_runs_exactly_once(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    # Two slots, so a redelivery during the run would be picked up and run beside it.
    driver = Driver("patient", ack_wait=2.0, concurrency=2)
    attempts: list[int] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        attempts.append(ctx.attempt)
        await asyncio.sleep(6.0)
        return Result.ok("slow but done")

    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        run_id = await send(nats_client, resource_json())
        await results.wait(run_id, timeout=60)
        await wait_until(lambda: settled(nats_client, "patient"), what="message acked")
        # Absence cannot be waited for: give a late redelivery more than an ack_wait to show.
        await asyncio.sleep(3.0)
        info = await consumer_info(nats_client, "patient")

    assert attempts == [1]
    assert [body["driverresult"]["message"] for body in results.for_run(run_id)] == [
        "slow but done"
    ]
    assert info.num_redelivered == 0
    assert info.num_ack_pending == 0


async def test_concurrency_limits_running_and_held_messages(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("parallel", concurrency=4)
    release = asyncio.Event()
    running_now = 0
    most = 0
    done: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        try:
            await release.wait()
        finally:
            running_now -= 1
        done.append(ctx.run_id)

    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        run_ids = [await send(nats_client, resource_json(f"app-{i}")) for i in range(10)]
        await wait_until(lambda: running_now == 4, what="four handlers running")
        # The server's consumer counts a stored message a moment after its PubAck: sample
        # once it has counted all ten.
        await wait_until(lambda: _accounted(nats_client, "parallel", 10), what="ten counted")
        held: list[tuple[int | None, int | None]] = []
        # Sample while blocked: pulling only for free slots, the instance holds 4, not 10.
        for _ in range(10):
            info = await consumer_info(nats_client, "parallel")
            held.append((info.num_ack_pending, info.num_pending))
            await asyncio.sleep(0.2)
        blocked_most = most
        release.set()
        for run_id in run_ids:
            await results.wait(run_id)

    assert blocked_most == 4
    assert held == [(4, 6)] * 10
    assert most == 4
    assert sorted(done) == sorted(run_ids)
    assert sorted(body["run_id"] for body in results.bodies) == sorted(run_ids)


async def test_two_instances_share_the_consumer_without_serialising(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    release = asyncio.Event()
    handled: dict[str, list[str]] = {"one": [], "two": []}
    busy: dict[str, int] = {"one": 0, "two": 0}

    def instance(label: str) -> Driver:
        driver = Driver("shared")

        @driver.on("pipeline")
        async def build(ctx: Context) -> None:
            busy[label] += 1
            await release.wait()
            busy[label] -= 1
            handled[label].append(ctx.run_id)

        return driver

    async with (
        raw_results(nats_client) as results,
        running(instance("one"), nats_server.url),
        running(instance("two"), nats_server.url),
    ):
        run_ids = [await send(nats_client, resource_json(f"app-{i}")) for i in range(2)]
        # With max_ack_pending 1 the second instance would wait for the first.
        await wait_until(lambda: busy == {"one": 1, "two": 1}, what="both instances busy")
        release.set()
        run_ids += [await send(nats_client, resource_json(f"app-{i}")) for i in range(2, 20)]
        for run_id in run_ids:
            await results.wait(run_id)
        await wait_until(lambda: settled(nats_client, "shared"), what="all settled")

    everything = handled["one"] + handled["two"]
    assert sorted(everything) == sorted(run_ids)
    assert len(set(everything)) == 20
    assert handled["one"] and handled["two"]
    assert len(results.bodies) == 20


async def test_driver_keeps_consuming_after_a_nats_restart(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("resilient")
    seen: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        seen.append(ctx.run_id)

    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        before = await send(nats_client, resource_json("before"))
        await results.wait(before)
        await nats_server.stop()
        await wait_until(lambda: not nats_client.is_connected, what="client disconnected")
        await nats_server.start()
        await wait_until(lambda: nats_client.is_connected, timeout=60, what="client reconnected")
        after = await send(nats_client, resource_json("after"))
        await results.wait(after, timeout=60)

    assert seen == [before, after]


@pytest.mark.nats
async def test_missing_stream_is_one_clear_line() -> None:
    driver = Driver("orphan")

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        return None

    async with EmbeddedNats(create_streams=False) as server:
        settings = Settings(nats_urls=server.url, startup_timeout=1.0)
        with pytest.raises(StreamMissingError) as caught:
            await asyncio.wait_for(driver.serve(settings), TIMEOUT)

    message = str(caught.value)
    assert "\n" not in message
    assert "'messages'" in message


async def test_unreachable_nats_is_one_clear_line() -> None:
    driver = Driver("lonely")

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        return None

    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(NatsUnavailableError) as caught:
        await asyncio.wait_for(driver.serve(Settings(nats_urls=url, startup_timeout=2.0)), 60)

    message = str(caught.value)
    assert "\n" not in message
    assert url in message


async def test_shutdown_lets_a_running_handler_finish_and_publish(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("graceful", grace_period=60.0)
    started = asyncio.Event()
    finished: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        started.set()
        await asyncio.sleep(2.0)
        finished.append(ctx.run_id)
        return Result.ok("finished in the grace period")

    async with raw_results(nats_client) as results:
        async with running(driver, nats_server.url) as task:
            run_id = await send(nats_client, resource_json())
            await asyncio.wait_for(started.wait(), TIMEOUT)
        # Leaving `running` cancelled the serving task and waited for it to end.
        assert task.done()
        await results.wait(run_id)
        info = await consumer_info(nats_client, "graceful")

    assert finished == [run_id]
    assert [body["driverresult"]["message"] for body in results.for_run(run_id)] == [
        "finished in the grace period"
    ]
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_shutdown_hands_unfinished_runs_back_for_redelivery(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    # An ack_wait far beyond the test's deadlines: only a nak can bring the message back.
    first = Driver("handover", grace_period=0.2, ack_wait=600.0)
    started = asyncio.Event()
    cancelled: list[str] = []

    @first.on("pipeline")
    async def slow(ctx: Context) -> None:
        started.set()
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            cancelled.append(ctx.run_id)
            raise

    second = Driver("handover", ack_wait=600.0)
    redelivered: list[tuple[str, int]] = []

    @second.on("pipeline")
    async def fast(ctx: Context) -> Result:
        redelivered.append((ctx.run_id, ctx.attempt))
        return Result.ok("picked up")

    async with (
        raw_results(nats_client) as results,
        advisories(nats_client, "NAKED", "handover") as naked,
    ):
        async with running(first, nats_server.url):
            run_id, body = driver_message(resource_json())
            sequence = await publish(nats_client, "resources.pipeline", body)
            await asyncio.wait_for(started.wait(), TIMEOUT)
        await wait_until(lambda: naked == [sequence], what="unfinished run nak'ed")
        async with running(second, nats_server.url):
            await results.wait(run_id)
            await wait_until(lambda: settled(nats_client, "handover"), what="message acked")

    assert cancelled == [run_id]
    # The second delivery, but the first attempt: a hand-back is not an attempt.
    assert redelivered == [(run_id, 1)]
    assert [body["driverresult"]["message"] for body in results.for_run(run_id)] == ["picked up"]


async def test_startup_and_shutdown_hooks_run_in_order(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("hooked")
    order: list[str] = []

    @driver.on_startup
    def sync_startup() -> None:
        order.append("startup sync")

    @driver.on_startup
    async def async_startup() -> None:
        await asyncio.sleep(0)
        order.append("startup async")

    @driver.on_shutdown
    async def async_shutdown() -> None:
        await asyncio.sleep(0)
        order.append("shutdown async")

    @driver.on_shutdown
    def sync_shutdown() -> None:
        order.append("shutdown sync")

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        order.append("handler")

    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        run_id = await send(nats_client, resource_json())
        await results.wait(run_id)
        during = list(order)

    assert during == ["startup sync", "startup async", "handler"]
    assert order == ["startup sync", "startup async", "handler", "shutdown async", "shutdown sync"]


async def test_result_publish_is_acknowledged_by_the_stream_or_refused(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """The consumer's own JetStream publish: it returns once the stream has the result
    (de-duplicated by its id), and raises when no stream takes the subject."""
    driver = Driver("publisher")

    @driver.on("pipeline")
    async def noop(ctx: Context) -> None:
        return None

    log = build_logger(level="warning", fmt="json")
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
        headers = {p.MSG_ID_HEADER: p.result_message_id(driver.name, 1)}
        for _ in range(2):
            await consumer._publisher.publish(
                p.RESULT_SUBJECT, b'{"event":"driver.result"}', headers
            )
        stream = await nats_client.jetstream().stream_info(p.PIPELINE_STREAM)
        assert stream.state.messages == 1
        with pytest.raises(NoStreamResponseError):
            await consumer._publisher.publish("nowhere.at.all", b"{}", {})
    finally:
        await consumer.stop(0)


async def _accounted(nc: Client, consumer: str, messages: int) -> bool:
    """Whether the consumer's delivered-but-unacked and still-pending counts add up to
    ``messages``."""
    info = await consumer_info(nc, consumer)
    return (info.num_ack_pending or 0) + (info.num_pending or 0) == messages
