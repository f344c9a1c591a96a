"""Several ``conveyor-driver run`` processes of one driver, and signals in the middle of a run.

Each message must produce exactly one result, whoever handles it and however a process is
stopped: that is what the shared durable consumer and the graceful shutdown promise.
"""

from __future__ import annotations

import asyncio
import collections
import signal

import pytest
from apps.harness import DriverProcess, app, driver_process, wait_settled
from nats.aio.client import Client

from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import ResultWatch, emit_event, watch_results
from conveyor_driver.models import Resource

pytestmark = pytest.mark.process

PATIENT = app("worker_app.py:driver")  # grace_period 30 s
IMPATIENT = app("worker_app.py:impatient")  # grace_period 0.5 s, same consumer
SLOW = {"sleep": 5}


async def _stop(proc: DriverProcess, sig: signal.Signals = signal.SIGTERM) -> None:
    proc.send(sig)
    assert await proc.wait() == 0, proc.output


def _results(watch: ResultWatch, run_id: str) -> list[dict[str, object]]:
    return [event.driverresult.data for event in watch.results(run_id)]


async def test_two_processes_share_the_work_and_none_is_done_twice(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    url = nats_server.url
    args = ("--nats-url", url, "--concurrency", "2")
    async with (
        driver_process(PATIENT, *args) as first,
        driver_process(PATIENT, *args) as second,
        watch_results(nats_client) as watch,
    ):
        for started in await asyncio.gather(first.started(), second.started()):
            assert started["concurrency"] == 2
        run_ids = [
            (await emit_event(nats_client, Resource(f"job-{i}", "job", spec={"sleep": 0.2}))).run_id
            for i in range(40)
        ]
        for run_id in run_ids:
            await watch.wait(run_id, timeout=120)
        await asyncio.gather(_stop(first), _stop(second))
        await nats_client.flush()

        info = await wait_settled(nats_client, "worker", lambda i: i.num_ack_pending == 0)
        assert info.num_pending == 0
        assert info.num_redelivered == 0
        # Delivered 40 times in all: no message went to both processes.
        assert info.delivered.consumer_seq == 40

        # the pids, as the JSON gave them
        handled_by: collections.Counter[object] = collections.Counter()
        for run_id in run_ids:
            results = _results(watch, run_id)
            assert len(results) == 1, (run_id, results)
            (data,) = results
            assert data["run_id"] == run_id
            assert data["attempt"] == 1
            handled_by[data["pid"]] += 1
        assert watch.count == 40
    assert set(handled_by) == {first.pid, second.pid}
    assert sum(handled_by.values()) == 40


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_lets_the_running_handler_finish(
    nats_server: EmbeddedNats, nats_client: Client, sig: signal.Signals
) -> None:
    async with (
        driver_process(PATIENT, "--nats-url", nats_server.url) as proc,
        watch_results(nats_client) as watch,
    ):
        await proc.started()
        message = await emit_event(nats_client, Resource("slow", "job", spec=SLOW))
        await proc.wait_for_log("handler started", run_id=message.run_id)
        await _stop(proc, sig)
        # The result was published (PubAck awaited) before the process could exit 0.
        await nats_client.flush()
        assert _results(watch, message.run_id) == [
            {"pid": proc.pid, "run_id": message.run_id, "attempt": 1}
        ]
        assert watch.count == 1
        info = await wait_settled(nats_client, "worker", lambda i: i.num_ack_pending == 0)
    assert info.num_pending == 0
    assert info.num_redelivered == 0
    await proc.wait_for_log("waiting for running handlers", count=1, grace=30.0)
    assert [r["event"] for r in proc.records if r.get("run_id") == message.run_id][-1] == (
        "run succeeded"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_run_cut_short_by_the_grace_period_is_handled_by_the_next_process(
    nats_server: EmbeddedNats, nats_client: Client, sig: signal.Signals
) -> None:
    url = nats_server.url
    async with watch_results(nats_client) as watch:
        async with driver_process(IMPATIENT, "--nats-url", url) as first:
            await first.started()
            message = await emit_event(nats_client, Resource("slow", "job", spec=SLOW))
            await first.wait_for_log("handler started", run_id=message.run_id)
            await _stop(first, sig)
        # Handed back at once by the stopping process, not redelivered after ack_wait.
        await first.wait_for_log("run handed back for redelivery")
        await nats_client.flush()
        assert watch.results(message.run_id) == []

        async with driver_process(PATIENT, "--nats-url", url) as second:
            await second.started()
            await watch.wait(message.run_id, timeout=60)
            await _stop(second)
        await nats_client.flush()
        info = await wait_settled(nats_client, "worker", lambda i: i.num_ack_pending == 0)
    assert _results(watch, message.run_id) == [
        # The second delivery, but its first attempt: a hand-back is not an attempt.
        {"pid": second.pid, "run_id": message.run_id, "attempt": 1}
    ]
    assert watch.count == 1
    assert info.num_pending == 0
    assert info.delivered.consumer_seq == 2
