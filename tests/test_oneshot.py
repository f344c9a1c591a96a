"""One-shot and draining modes against a real nats-server: ``--max-runs`` and
``--exit-when-idle`` (docs/protocol.md#one-shot-and-draining-modes).

What matters is what the server saw: how many deliveries an instance took (the consumer's
delivery sequence), what is still pending for the next instance, and that the process ended
on its own, gracefully, with exit status 0.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
from _helpers import (
    TIMEOUT,
    consumer_info,
    raw_results,
    resource_json,
    send,
    settled,
    wait_until,
)
from apps.harness import DriverProcess, app, driver_process
from apps.worker_app import driver as worker
from nats.aio.client import Client
from nats.aio.msg import Msg

from conveyor_driver import Context, Driver, Settings, protocol
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.models import Resource
from conveyor_driver.runtime.consumer import ensure_consumer
from conveyor_driver.runtime.ledger import RunLedger
from conveyor_driver.runtime.settlement import Settlement
from conveyor_driver.testing.fixtures import running

WORKER = app("worker_app.py:driver")  # driver "worker", type "job", spec "sleep"


async def _jobs(nc: Client, count: int, **spec: Any) -> list[str]:
    """``count`` job events, published once the consumer exists (the stream keeps nothing
    no consumer wants); their run ids."""
    await ensure_consumer(nc, worker)
    return [
        (await emit_event(nc, Resource(f"job-{i}", "job", spec=spec))).run_id for i in range(count)
    ]


def _index(proc: DriverProcess, event: str) -> int:
    return next(i for i, r in enumerate(proc.records) if r.get("event") == event)


@pytest.mark.process
async def test_max_runs_1_takes_one_message_and_leaves_the_next_to_another_instance(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    async with raw_results(nats_client) as results:
        first, second = await _jobs(nats_client, 2)
        async with driver_process(WORKER, "--nats-url", nats_server.url, "--max-runs", "1") as one:
            assert await one.wait() == 0, one.output
        await wait_until(lambda: results.bodies, what="the first result")
        info = await consumer_info(nats_client, "worker")
        # One delivery ever: the second message was never fetched (nor handed back).
        assert info.delivered is not None and info.delivered.consumer_seq == 1
        assert (info.num_pending, info.num_ack_pending) == (1, 0)
        assert [body["run_id"] for body in results.bodies] == [first]

        async with driver_process(WORKER, "--nats-url", nats_server.url, "--max-runs", "1") as two:
            assert await two.wait() == 0, two.output
        await wait_until(lambda: len(results.bodies) == 2, what="the second result")
        info = await consumer_info(nats_client, "worker")

    assert [body["run_id"] for body in results.bodies] == [first, second]
    assert info.delivered is not None and info.delivered.consumer_seq == 2
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    assert one.records[-1]["event"] == "driver stopped"
    assert one.records[-1]["runs"] == 1
    assert any(r.get("reason") == "max runs reached" for r in one.records)
    pids = {body["driverresult"]["data"]["pid"] for body in results.bodies}
    assert pids == {one.pid, two.pid}


@pytest.mark.process
async def test_max_runs_3_with_concurrency_64_runs_exactly_three(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    async with raw_results(nats_client) as results:
        run_ids = await _jobs(nats_client, 5, sleep=0.5)
        args = ("--nats-url", nats_server.url, "--max-runs", "3", "--concurrency", "64")
        async with driver_process(WORKER, *args) as proc:
            assert await proc.wait() == 0, proc.output
        await wait_until(lambda: len(results.bodies) >= 3, what="three results")
        info = await consumer_info(nats_client, "worker")

    assert sorted(body["run_id"] for body in results.bodies) == sorted(run_ids[:3])
    assert info.delivered is not None and info.delivered.consumer_seq == 3
    assert (info.num_pending, info.num_ack_pending) == (2, 0)
    assert proc.records[-1]["runs"] == 3
    started = next(r for r in proc.records if r.get("event") == "driver started")
    assert (started["concurrency"], started["max_runs"]) == (3, 3)


@pytest.mark.process
async def test_exit_when_idle_exits_after_idling(nats_server: EmbeddedNats) -> None:
    args = ("--nats-url", nats_server.url, "--exit-when-idle", "1")
    async with driver_process(WORKER, *args) as proc:
        await proc.started()
        assert await proc.wait() == 0, proc.output
    assert any(r.get("reason") == "idle" for r in proc.records)
    assert proc.records[-1]["event"] == "driver stopped"


@pytest.mark.process
async def test_exit_when_idle_waits_for_a_handler_running_longer(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """A 4-second run under ``--exit-when-idle 1``: the idle spell starts when it ends."""
    async with raw_results(nats_client) as results:
        (run_id,) = await _jobs(nats_client, 1, sleep=4)
        args = ("--nats-url", nats_server.url, "--exit-when-idle", "1")
        async with driver_process(WORKER, *args) as proc:
            assert await proc.wait() == 0, proc.output
        await wait_until(lambda: results.bodies, what="the result")
        info = await consumer_info(nats_client, "worker")

    assert [body["run_id"] for body in results.bodies] == [run_id]
    assert results.bodies[0]["driverresult"]["success"]
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)
    assert _index(proc, "handler finished") < _index(proc, "shutting down")
    assert any(r.get("reason") == "idle" for r in proc.records)


@pytest.mark.process
async def test_sigterm_during_a_max_runs_run_finishes_it_cleanly(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    async with raw_results(nats_client) as results:
        (run_id,) = await _jobs(nats_client, 1, sleep=3)
        async with driver_process(WORKER, "--nats-url", nats_server.url, "--max-runs", "1") as proc:
            await proc.wait_for_log("handler started")
            proc.send(signal.SIGTERM)
            assert await proc.wait() == 0, proc.output
        await wait_until(lambda: results.bodies, what="the result")
        info = await consumer_info(nats_client, "worker")

    assert [body["run_id"] for body in results.bodies] == [run_id]
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    assert any(r.get("reason") == "signal" for r in proc.records)
    stopped = proc.records[-1]
    assert (stopped["event"], stopped["runs"]) == ("driver stopped", 1)
    assert stopped["log_lines_sent"] >= 2  # the run's lines were flushed before the exit


async def test_serve_returns_after_max_runs_and_skipped_events_count(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """``driver.serve`` honours the setting too; a broadcast no handler takes is a run."""
    driver = Driver("counted", concurrency=8)
    calls: list[str] = []

    @driver.on("pipeline", events=["create"])
    async def build(ctx: Context) -> None:
        calls.append(ctx.run_id)

    settings = Settings(nats_urls=nats_server.url, max_runs=2, log_format="json")
    await ensure_consumer(nats_client, driver)
    skipped = await send(nats_client, resource_json("a"), event="delete")
    built = await send(nats_client, resource_json("b"))
    await asyncio.wait_for(driver.serve(settings), TIMEOUT)

    assert calls == [built] and skipped != built
    assert await settled(nats_client, "counted")


async def test_a_duplicate_skipped_by_the_ledger_does_not_count(
    nats_server: EmbeddedNats, nats_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redelivery of a finished run is acked without running: not one of the runs."""
    real_settle = Settlement.settle
    lost: list[int] = []

    async def settle_losing_the_first_ack(
        self: Settlement, msg: Any, outcome: Any, admission: Any = None
    ) -> None:
        if not lost:  # neither acked nor marked reported: JetStream redelivers it
            lost.append(1)
            return
        await real_settle(self, msg, outcome, admission)

    monkeypatch.setattr(Settlement, "settle", settle_losing_the_first_ack)
    driver = Driver("once-more", ack_wait=2.0)
    calls: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        calls.append(ctx.run_id)

    async with running(driver, nats_server.url):
        first = await send(nats_client, resource_json("a"))
        await wait_until(lambda: calls == [first], what="the first run")
    kv = await nats_client.jetstream().key_value(protocol.ledger_bucket("once-more"))
    ledger = RunLedger(kv, build_logger())
    settings = Settings(nats_urls=nats_server.url, max_runs=1, log_format="json")
    serving = asyncio.create_task(driver.serve(settings))
    try:
        # The lost ack brings the first message back after ack_wait: a duplicate.
        await wait_until(lambda: _duplicates(ledger), timeout=TIMEOUT, what="the duplicate acked")
        assert not serving.done()
        second = await send(nats_client, resource_json("b"))
        await asyncio.wait_for(asyncio.shield(serving), TIMEOUT)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    assert calls == [first, second]
    assert await settled(nats_client, "once-more")


async def _duplicates(ledger: RunLedger) -> int:
    return (await ledger.summary())["skipped_as_duplicate"]


class _Proxy:
    """A TCP relay to the nats-server whose connections the test can cut: a reconnect
    of the driver's connection while the server itself stays up (and keeps its pull
    requests)."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers += [writer, upstream_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


async def test_a_pull_request_outliving_a_reconnect_delivers_nothing_beyond_max_runs(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """The server keeps a pull request across the client's reconnect, and the driver asks
    again afterwards. Were the old one answered too, a one-shot instance would take a
    second message and have to hand it back."""
    proxy = _Proxy(int(nats_server.url.rsplit(":", 1)[1]))
    await proxy.start()
    driver = Driver("reconnected", concurrency=4, grace_period=10.0)
    calls: list[str] = []

    @driver.on("pipeline")
    async def build(ctx: Context) -> None:
        calls.append(ctx.run_id)
        await asyncio.sleep(1.0)

    pulls: list[bytes] = []

    async def on_pull(msg: Msg) -> None:
        pulls.append(msg.data)

    subject = protocol.pull_request_subject(protocol.MESSAGES_STREAM, "reconnected")
    await nats_client.subscribe(subject, cb=on_pull)
    settings = Settings(nats_urls=proxy.url, max_runs=1, log_format="json")
    serving = asyncio.create_task(driver.serve(settings))
    try:
        await wait_until(lambda: len(pulls) == 1, what="a pull request")
        proxy.cut()
        await wait_until(lambda: len(pulls) == 2, what="the pull request after the reconnect")
        first = await send(nats_client, resource_json("a"))
        await send(nats_client, resource_json("b"))
        await asyncio.wait_for(asyncio.shield(serving), TIMEOUT)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await proxy.close()
    info = await consumer_info(nats_client, "reconnected")

    assert calls == [first]
    assert proxy.connections == 2
    assert info.delivered is not None and info.delivered.consumer_seq == 1
    assert (info.num_pending, info.num_ack_pending) == (1, 0)
