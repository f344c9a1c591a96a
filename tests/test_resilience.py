"""Outcomes under stress, against a real nats-server: shutdowns that must not burn attempts,
results too large for NATS, handlers raising BaseException, start-up in bad weather, and
result publishes outlasting a JetStream outage."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from _helpers import (
    TIMEOUT,
    consumer_info,
    driver_message,
    publish,
    raw_results,
    resource_json,
    send,
    settled,
    stream_messages,
    wait_until,
)
from apps.harness import app, driver_process, parse_json_line
from nats.aio.client import Client
from nats.js.api import DiscardPolicy

from conveyor_driver import Context, Driver, Result, Settings, outcomes
from conveyor_driver import protocol as p
from conveyor_driver.embedded import EmbeddedNats, find_nats_server, free_port
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.errors import ConsumerSetupError
from conveyor_driver.models import Resource
from conveyor_driver.testing.fixtures import running


@contextlib.asynccontextmanager
async def _stopped_mid_run(driver: Driver, url: str, started: asyncio.Event) -> AsyncIterator[None]:
    """Serve ``driver`` until its handler has started, then stop it gracefully."""
    async with running(driver, url):
        yield
        await asyncio.wait_for(started.wait(), TIMEOUT)
        started.clear()


async def test_a_graceful_stop_hands_runs_back_once_without_bouncing_them(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """Open pull requests must not deliver handed-back runs into the closing process."""
    # Free slots beyond the two runs keep pull requests open while the driver stops.
    driver = Driver("bouncer", concurrency=6, grace_period=0.5, ack_wait=600.0)
    started: list[str] = []

    @driver.on("pipeline")
    async def slow(ctx: Context) -> None:
        started.append(ctx.run_id)
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            # One run cleans up for a while: the other's hand-back is long done by then.
            await asyncio.sleep(1.0 if ctx.resource.name == "b" else 0)
            raise

    async with running(driver, nats_server.url):
        for name in ("a", "b"):
            await send(nats_client, resource_json(name))
        await wait_until(lambda: len(started) == 2, what="both runs started")
    info = await consumer_info(nats_client, "bouncer")
    # Two messages, two deliveries: nothing came back into the stopping process.
    assert info.delivered is not None
    assert info.delivered.consumer_seq == 2
    assert info.num_ack_pending == 2  # nak'ed, waiting for the next instance


async def test_graceful_restarts_do_not_burn_attempts(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """Three restarts mid-run, then a process that finishes it: attempt 1, a success."""
    attempts: list[int] = []
    started = asyncio.Event()
    finish = False

    def make() -> Driver:
        driver = Driver("restarted", max_attempts=3, grace_period=0.2, ack_wait=600.0)

        @driver.on("pipeline")
        async def build(ctx: Context) -> Result:
            attempts.append(ctx.attempt)
            started.set()
            if not finish:
                await asyncio.sleep(120)
            return Result.ok("built")

        return driver

    async with raw_results(nats_client) as results:
        run_id, body = driver_message(resource_json())
        for restart in range(3):
            async with _stopped_mid_run(make(), nats_server.url, started):
                if restart == 0:
                    await publish(nats_client, "resources.pipeline", body)
        finish = True
        async with running(make(), nats_server.url):
            await results.wait(run_id)
            await wait_until(lambda: settled(nats_client, "restarted"), what="acked")

    assert attempts == [1, 1, 1, 1]
    assert [b["driverresult"]["message"] for b in results.for_run(run_id)] == ["built"]


async def test_giving_up_names_the_attempts_that_ran_not_the_hand_backs(
    nats_server: EmbeddedNats, nats_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outcomes, "BACKOFF_BASE", 0.1)
    started = asyncio.Event()
    calls: list[int] = []

    def make(*, hang_on_second: bool) -> Driver:
        driver = Driver("storyteller", max_attempts=2, grace_period=0.2, ack_wait=600.0)

        @driver.on("pipeline")
        async def build(ctx: Context) -> None:
            calls.append(ctx.attempt)
            started.set()
            if ctx.attempt == 2 and hang_on_second:
                await asyncio.sleep(120)
            raise ValueError(f"failed on attempt {ctx.attempt}")

        return driver

    async with raw_results(nats_client) as results:
        run_id, body = driver_message(resource_json())
        async with running(make(hang_on_second=True), nats_server.url):
            await publish(nats_client, "resources.pipeline", body)
            await wait_until(lambda: calls == [1, 2], what="second attempt running")
        async with running(make(hang_on_second=False), nats_server.url):
            await results.wait(run_id)

    assert calls == [1, 2, 2]
    (result,) = results.for_run(run_id)
    assert result["driverresult"]["message"] == (
        "gave up after 2 attempts: attempt 1: ValueError: failed on attempt 1; "
        "attempt 2: ValueError: failed on attempt 2"
    )


async def test_a_result_larger_than_max_payload_is_one_failure_and_one_run(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("bulky")
    calls: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        calls.append(ctx.run_id)
        return Result.ok("built", data={"blob": "x" * 1_300_000})

    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        run_id = await send(nats_client, resource_json())
        await results.wait(run_id)
        await wait_until(lambda: settled(nats_client, "bulky"), what="acked")
        info = await consumer_info(nats_client, "bulky")

    assert calls == [run_id]
    assert info.num_redelivered == 0
    (result,) = results.for_run(run_id)
    assert result["driverresult"] == {
        "success": False,
        "message": "result data is 1.2 MB; the NATS server accepts at most 1.0 MB",
        "data": None,
        "driver": "bulky",
    }


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_base_exceptions_fail_the_run_and_the_driver_carries_on(
    nats_server: EmbeddedNats,
    nats_client: Client,
    monkeypatch: pytest.MonkeyPatch,
    raised: type[BaseException],
    sync: bool,
) -> None:
    monkeypatch.setattr(outcomes, "BACKOFF_BASE", 0.1)
    driver = Driver("raiser", max_attempts=2)

    def handle(ctx: Context) -> str:
        if ctx.resource.name == "bad":
            raise raised()
        return "fine"

    async def async_handle(ctx: Context) -> str:
        return handle(ctx)

    driver.on("pipeline")(handle if sync else async_handle)
    async with raw_results(nats_client) as results, running(driver, nats_server.url) as task:
        bad = await send(nats_client, resource_json("bad"))
        await results.wait(bad)
        good = await send(nats_client, resource_json("good"))
        await results.wait(good)
        assert not task.done()

    (failure,) = results.for_run(bad)
    assert failure["driverresult"]["message"] == (
        f"gave up after 2 attempts: attempt 1: {raised.__name__}; attempt 2: {raised.__name__}"
    )
    assert results.for_run(good)[0]["driverresult"]["data"] == "fine"


@pytest.mark.process
@pytest.mark.parametrize("kind", ["async-job", "sync-job"])
async def test_a_handler_raising_system_exit_does_not_stop_the_process(
    nats_server: EmbeddedNats, nats_client: Client, kind: str
) -> None:
    """In a real process (and with SIGTERM still stopping it gracefully afterwards)."""
    async with (
        watch_results(nats_client) as watch,
        driver_process(app("raising_app.py:driver"), "--nats-url", nats_server.url) as proc,
    ):
        await proc.started()
        for name, spec in (("a", {"raise": "SystemExit"}), ("b", {"raise": "KeyboardInterrupt"})):
            bad = await emit_event(nats_client, Resource(name, kind, spec=spec))
            result = await watch.wait(bad.run_id, timeout=TIMEOUT)
            assert not result.driverresult.success
        good = await emit_event(nats_client, Resource("c", kind, spec={}))
        assert (await watch.wait(good.run_id, timeout=TIMEOUT)).driverresult.success
        assert proc.proc.returncode is None
        proc.send(signal.SIGTERM)
        assert await proc.wait() == 0, proc.output
    # Every line is a log record: no traceback printed by a dying task or interpreter.
    assert [line for line in proc.stderr_lines if line and not parse_json_line(line)] == []


@pytest.mark.nats
async def test_start_up_waits_for_nats_that_comes_up_later() -> None:
    driver = Driver("patient")

    @driver.on("pipeline")
    async def build(ctx: Context) -> str:
        return "late but fine"

    port = free_port()
    settings = Settings(nats_urls=f"nats://127.0.0.1:{port}", startup_timeout=60.0)
    serving = asyncio.create_task(driver.serve(settings))
    try:
        await asyncio.sleep(4.5)  # longer than the old three tries
        assert not serving.done()
        async with EmbeddedNats(port=port) as server:
            nc = await nats.connect(server.url)
            try:
                await wait_until(
                    lambda: _has_consumer(nc, "patient"), timeout=60, what="consumer created"
                )
                async with raw_results(nc) as results:
                    run_id = await send(nc, resource_json())
                    await results.wait(run_id)
            finally:
                await nc.close()
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving


async def test_start_up_waits_for_the_stream_to_be_created(nats_server: EmbeddedNats) -> None:
    """The driver may start before the Conveyor server has created its streams."""
    driver = Driver("early")

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        return None

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.delete_stream(p.MESSAGES_STREAM)
    serving = asyncio.create_task(driver.serve(Settings(nats_urls=nats_server.url)))
    try:
        await asyncio.sleep(1.5)
        assert not serving.done()
        await js.add_stream(p.server_streams()[0])
        await wait_until(lambda: _has_consumer(nc, "early"), timeout=60, what="consumer")
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        await nc.close()


@pytest.mark.nats
async def test_jetstream_switched_off_is_one_clear_line_at_once(tmp_path: Any) -> None:
    driver = Driver("nojs")

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        return None

    port = free_port()
    server = subprocess.Popen(
        [find_nats_server(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_listening(port)
        began = time.monotonic()
        settings = Settings(nats_urls=f"nats://127.0.0.1:{port}", startup_timeout=60.0)
        with pytest.raises(ConsumerSetupError) as caught:
            await asyncio.wait_for(driver.serve(settings), TIMEOUT)
        assert time.monotonic() - began < 10  # not after the start-up timeout
    finally:
        server.terminate()
        server.wait(10)
    assert "JetStream is not enabled" in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_a_result_waits_out_a_jetstream_outage_and_the_build_runs_once(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """JetStream refusing results for 10 s (longer than the old 7.5 s of retries): the
    result is stored once it can be, and the finished build is not re-run."""
    driver = Driver("steadfast", ack_wait=4.0)
    calls: list[str] = []
    js = nats_client.jetstream()
    # A full stream that discards new messages answers every publish with an error at
    # once, as a stream without a leader does during an election.
    full = dataclasses.replace(p.server_streams()[1], max_msgs=1, discard=DiscardPolicy.NEW)
    await js.update_stream(full)
    await js.publish("pipelines.filler", b"{}")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        calls.append(ctx.run_id)
        return Result.ok("built")

    async with running(driver, nats_server.url):
        run_id = await send(nats_client, resource_json())
        await wait_until(lambda: calls == [run_id], what="handler ran")
        await asyncio.sleep(10.0)
        await js.purge_stream(p.PIPELINE_STREAM)
        await wait_until(
            lambda: stream_messages(nats_client, p.PIPELINE_STREAM), timeout=60, what="stored"
        )
        await wait_until(lambda: settled(nats_client, "steadfast"), what="acked")
        stored = await js.get_msg(p.PIPELINE_STREAM, subject=p.RESULT_SUBJECT)

    assert calls == [run_id]
    assert json.loads(stored.data or b"{}")["run_id"] == run_id


async def _has_consumer(nc: Client, name: str) -> bool:
    try:
        await nc.jetstream().consumer_info(p.MESSAGES_STREAM, name)
    except Exception:
        return False
    return True


async def _wait_listening(port: int) -> None:
    async def listening() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    await wait_until(listening, what=f"nats-server on {port}")


async def test_a_cancellation_lost_during_start_up_still_stops_the_driver(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's ``asyncio.wait_for`` (under every nats-py request) can drop a
    cancellation that lands as the answer arrives; serving on forever is not an option."""
    from conveyor_driver.runtime.ledger import RunLedger

    opening = asyncio.Event()
    real_open = RunLedger.open

    async def open_dropping_a_cancel(*args: Any, **kwargs: Any) -> Any:
        opening.set()
        with contextlib.suppress(asyncio.CancelledError):  # as wait_for may do
            await asyncio.sleep(30)
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(RunLedger, "open", open_dropping_a_cancel)
    driver = Driver("cancelled-early")

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        return None

    serving = asyncio.create_task(driver.serve(Settings(nats_urls=nats_server.url)))
    await asyncio.wait_for(opening.wait(), TIMEOUT)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(serving, TIMEOUT)
