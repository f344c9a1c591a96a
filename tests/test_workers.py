"""``conveyor-driver run --workers N``: one parent, N worker processes sharing the consumer.

Real processes against a real nats-server: both workers take work, a worker killed with
SIGKILL is started again and its run is still reported once, SIGTERM to the parent drains
every worker, and workers that cannot start end the parent instead of a restart loop.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
from typing import Any

import aiohttp
import nats
import pytest
from _helpers import invoke, one_error_line, wait_until
from apps.harness import (
    DriverProcess,
    app,
    clean_env,
    driver_process,
    parse_json_line,
    run_cli,
    wait_settled,
)
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from conveyor_driver import Driver, Settings
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.emit import ResultWatch, emit_event, watch_results
from conveyor_driver.errors import ConfigurationError
from conveyor_driver.models import Resource
from conveyor_driver.runtime.fleet_probes import FleetProbes, merge_expositions
from conveyor_driver.runtime.probes import Answer, start_probes
from conveyor_driver.variables import as_environment

PATIENT = app("worker_app.py:driver")  # grace_period 30 s
NIMBLE = app("worker_app.py:nimble")  # ack_wait 3 s: a killed worker's run returns soon
DOOMED = app("worker_app.py:doomed")  # its start-up hook raises
TIMEOUT = 90.0


def _workers(proc: DriverProcess) -> dict[int, list[int]]:
    """The pids the parent started, by worker index, in order."""
    pids: dict[int, list[int]] = collections.defaultdict(list)
    for record in proc.records:
        if record.get("event") == "worker started":
            pids[record["worker"]].append(record["pid"])
    return pids


async def _started(proc: DriverProcess, workers: int = 2) -> dict[int, int]:
    """Wait until every worker consumes; each worker's pid."""
    for index in range(workers):
        await proc.wait_for_log("driver started", timeout=TIMEOUT, worker=index)
    return {index: pids[-1] for index, pids in _workers(proc).items()}


def _results(watch: ResultWatch, run_id: str) -> list[dict[str, Any]]:
    return [event.driverresult.data for event in watch.results(run_id)]


@pytest.mark.process
async def test_two_workers_share_the_work_and_the_parent_answers_for_both(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    port = free_port()
    args = ("--nats-url", nats_server.url, "--workers", "2", "--http-port", str(port))
    async with (
        driver_process(PATIENT, *args) as parent,
        watch_results(nats_client) as watch,
        aiohttp.ClientSession() as http,
    ):
        pids = await _started(parent)
        assert len(set(pids.values())) == 2 and parent.pid not in pids.values()
        run_ids = [
            (await emit_event(nats_client, Resource(f"job-{i}", "job", spec={"sleep": 0.3}))).run_id
            for i in range(20)
        ]
        for run_id in run_ids:
            await watch.wait(run_id, timeout=TIMEOUT)

        async def get(path: str) -> tuple[int, str]:
            async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                return response.status, await response.text()

        async def both_ready() -> bool:
            return (await get("/readyz"))[0] == 200

        await wait_until(both_ready, timeout=TIMEOUT, what="/readyz of the parent")
        assert await get("/healthz") == (
            200,
            '{"status":"worker 0: consuming; worker 1: consuming"}',
        )
        runs: collections.Counter[str] = collections.Counter()

        async def all_runs_counted() -> bool:
            status, metrics = await get("/metrics")
            assert status == 200, metrics
            runs.clear()
            for family in text_string_to_metric_families(metrics):
                for sample in family.samples:
                    if sample.name == "conveyor_driver_runs_total":
                        runs[sample.labels["worker"]] += int(sample.value)
            return sum(runs.values()) == 20

        await wait_until(all_runs_counted, timeout=TIMEOUT, what="20 runs on /metrics")

        parent.send(signal.SIGTERM)
        assert await parent.wait(TIMEOUT) == 0, parent.output
        info = await wait_settled(nats_client, "worker", lambda i: i.num_ack_pending == 0)

    handled_by: collections.Counter[object] = collections.Counter()
    for run_id in run_ids:
        (data,) = _results(watch, run_id)  # exactly one result each
        assert data["attempt"] == 1
        handled_by[data["pid"]] += 1
    assert set(handled_by) == set(pids.values()), handled_by
    assert info.num_pending == 0 and info.num_redelivered == 0
    assert info.delivered.consumer_seq == 20
    # /metrics holds both workers' series, told apart by their label.
    assert sorted(runs) == ["0", "1"]
    assert sum(runs.values()) == 20 and all(runs.values())


@pytest.mark.process
async def test_a_worker_killed_mid_run_is_restarted_and_nothing_is_lost(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    args = ("--nats-url", nats_server.url, "--workers", "2")
    async with driver_process(NIMBLE, *args) as parent, watch_results(nats_client) as watch:
        pids = await _started(parent)
        first = await emit_event(nats_client, Resource("long", "job", spec={"sleep": 4}))
        record = await parent.wait_for_log("handler started", TIMEOUT, run_id=first.run_id)
        victim = record["worker"]
        os.kill(pids[victim], signal.SIGKILL)

        restarted = await parent.wait_for_log(
            "worker exited; restarting it", TIMEOUT, worker=victim, exit="killed by SIGKILL"
        )
        assert restarted["pid"] == pids[victim]
        await wait_until(
            lambda: len(_workers(parent)[victim]) == 2, timeout=TIMEOUT, what="a new worker"
        )
        new_pid = _workers(parent)[victim][1]
        await wait_until(
            lambda: (
                sum(
                    1
                    for r in parent.records
                    if r.get("event") == "driver started" and r.get("worker") == victim
                )
                == 2
            ),
            timeout=TIMEOUT,
            what="the new worker consuming",
        )
        later = [
            (await emit_event(nats_client, Resource(f"job-{i}", "job", spec={"sleep": 0.5}))).run_id
            for i in range(10)
        ]
        for run_id in [first.run_id, *later]:
            await watch.wait(run_id, timeout=TIMEOUT)
        parent.send(signal.SIGTERM)
        assert await parent.wait(TIMEOUT) == 0, parent.output
        info = await wait_settled(nats_client, "nimble", lambda i: i.num_ack_pending == 0)

    # The killed run came back (after ack_wait) and was reported once, by a live worker.
    (data,) = _results(watch, first.run_id)
    assert data["pid"] != pids[victim]
    assert data["attempt"] == 2
    handled_by = collections.Counter(_results(watch, run_id)[0]["pid"] for run_id in later)
    assert all(len(_results(watch, run_id)) == 1 for run_id in later)
    assert new_pid in handled_by, (new_pid, handled_by)
    assert info.num_pending == 0


@pytest.mark.process
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_to_the_parent_drains_both_workers(
    nats_server: EmbeddedNats, nats_client: Client, sig: signal.Signals
) -> None:
    args = ("--nats-url", nats_server.url, "--workers", "2")
    async with driver_process(PATIENT, *args) as parent, watch_results(nats_client) as watch:
        pids = await _started(parent)
        messages = [
            await emit_event(nats_client, Resource(f"slow-{i}", "job", spec={"sleep": 4}))
            for i in range(2)
        ]
        for message in messages:
            await parent.wait_for_log("handler started", TIMEOUT, run_id=message.run_id)
        parent.send(sig)
        assert await parent.wait(TIMEOUT) == 0, parent.output
        await nats_client.flush()
        results = [_results(watch, message.run_id) for message in messages]
        info = await wait_settled(nats_client, "worker", lambda i: i.num_ack_pending == 0)

    # Each running handler finished in its own worker: one result each, first attempt.
    assert sorted(data["pid"] for (data,) in results) == sorted(pids.values())
    assert all(data["attempt"] == 1 for (data,) in results)
    assert info.num_pending == 0 and info.num_redelivered == 0
    for index in (0, 1):
        await parent.wait_for_log("waiting for running handlers", worker=index, count=1)
        await parent.wait_for_log("worker stopped", worker=index, exit="exit status 0")
    await parent.wait_for_log("workers stopped", workers=2)


@pytest.mark.process
async def test_max_runs_counts_per_worker_and_finished_workers_end_the_parent(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    args = ("--nats-url", nats_server.url, "--workers", "2", "--max-runs", "1")
    async with driver_process(PATIENT, *args) as parent, watch_results(nats_client) as watch:
        pids = await _started(parent)
        run_ids = [
            (await emit_event(nats_client, Resource(f"job-{i}", "job"))).run_id for i in range(2)
        ]
        # Nobody signals: each worker stops after its run, and then the parent.
        assert await parent.wait(TIMEOUT) == 0, parent.output
        await nats_client.flush()
        results = [_results(watch, run_id) for run_id in run_ids]
    assert sorted(data["pid"] for (data,) in results) == sorted(pids.values())
    assert _workers(parent) == {index: [pid] for index, pid in pids.items()}  # no restart
    for index in (0, 1):
        await parent.wait_for_log("worker finished", worker=index)


@pytest.mark.process
async def test_workers_stop_by_themselves_when_the_parent_is_killed(
    nats_server: EmbeddedNats,
) -> None:
    """A parent killed with SIGKILL forwards nothing: orphaned workers must not consume on."""
    args = ("--nats-url", nats_server.url, "--workers", "2")
    async with driver_process(PATIENT, *args) as parent:
        await _started(parent)
        parent.send(signal.SIGKILL)
        # The workers share the parent's stderr: it ends once both have exited.
        assert await parent.wait(TIMEOUT) == -signal.SIGKILL
        for index in (0, 1):
            await parent.wait_for_log("supervisor gone; stopping", worker=index)
            await parent.wait_for_log("driver stopped", worker=index)


@pytest.mark.nats
@pytest.mark.process
async def test_embedded_with_workers_is_one_server_for_all() -> None:
    port = free_port()
    args = ("--embedded", "--embedded-port", str(port), "--workers", "2")
    async with driver_process(PATIENT, *args) as parent:
        await _started(parent)
        url = f"nats://127.0.0.1:{port}"
        servers = [r for r in parent.records if r.get("event") == "embedded nats-server started"]
        assert [(r.get("url"), "worker" in r) for r in servers] == [(url, False)]
        started = [r for r in parent.records if r.get("event") == "driver started"]
        assert [r["nats"] for r in started] == [url, url]
        nc = await nats.connect(url)
        try:
            async with watch_results(nc) as watch:
                message = await emit_event(nc, Resource("one", "job"))
                await watch.wait(message.run_id, timeout=TIMEOUT)
        finally:
            await nc.close()
        parent.send(signal.SIGTERM)
        assert await parent.wait(TIMEOUT) == 0, parent.output


@pytest.mark.process
async def test_workers_that_keep_dying_at_start_end_the_parent_with_one_line(
    nats_server: EmbeddedNats,
) -> None:
    result = await run_cli(
        "run", DOOMED, "--nats-url", nats_server.url, "--workers", "2", timeout=150
    )
    assert result.returncode == 1
    last = result.stderr_lines[-1]
    assert last.startswith("Error: worker "), result.stderr
    assert "exited at start 5 times in a row (last: exit status 1); giving up" in last
    assert "the cache this driver needs is unreachable" in result.stderr


def test_a_bad_app_is_one_line_before_any_worker_starts() -> None:
    line = one_error_line(invoke("run", app("broken_app.py:driver"), "--workers", "2"))
    assert line.startswith("importing ") and "RuntimeError: settings file missing" in line


def test_workers_need_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """driver.run() is one process: it refuses workers it cannot start rather than ignore them."""
    driver = Driver("single")
    driver.on("job")(lambda ctx: None)
    with pytest.raises(ConfigurationError, match=r"^2 workers need `conveyor-driver run APP"):
        driver.run(Settings(workers=2))


def test_the_options_given_reach_the_workers_as_their_variables() -> None:
    given = {
        "nats_urls": "nats://a:4222,nats://b:4222",
        "embedded": True,
        "ledger": False,
        "http_port": "9000",
        "loki_url": "http://loki:3100",
        "loki_labels": ("env=prod", "team=a"),
    }
    env = as_environment(given)
    assert env["CONVEYOR_LEDGER"] == "off" and env["CONVEYOR_LOKI_LABEL"] == "env=prod team=a"
    assert Settings.from_env(env) == Settings.from_env({}, **given)


def test_one_metrics_page_for_all_workers() -> None:
    worker = (
        "# HELP runs_total Runs.\n# TYPE runs_total counter\n"
        'runs_total{outcome="success"} N\n'
        "# HELP up Up.\n# TYPE up gauge\nup N\n"
    )
    merged = merge_expositions([(0, worker.replace("N", "3")), (1, worker.replace("N", "4"))])
    assert merged.splitlines() == [
        "# HELP runs_total Runs.",
        "# TYPE runs_total counter",
        'runs_total{worker="0",outcome="success"} 3',
        'runs_total{worker="1",outcome="success"} 4',
        "# HELP up Up.",
        "# TYPE up gauge",
        'up{worker="0"} 3',
        'up{worker="1"} 4',
    ]
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    assert [sample.labels for sample in families["up"].samples] == [
        {"worker": "0"},
        {"worker": "1"},
    ]


class _Worker:
    """What one worker's probe server answers from."""

    def __init__(self, health: tuple[bool, str], ready: tuple[bool, str]) -> None:
        self._health, self._ready = health, ready

    def health(self) -> tuple[bool, str]:
        return self._health

    def readiness(self) -> tuple[bool, str]:
        return self._ready


async def test_the_parent_answers_for_every_worker_and_names_the_one_at_fault() -> None:
    """Real probe servers as the workers; the third worker's port has nobody (restarting)."""

    def no_sdk() -> Answer:
        return 501, "text/plain", b"metrics need the SDK\n"

    ports = [free_port() for _ in range(3)]
    good = await start_probes(_Worker((True, "consuming"), (True, "ready")), ports[0])
    stalled = await start_probes(
        _Worker((False, "consume loop has not iterated for 31s"), (False, "starting")),
        ports[1],
        metrics=no_sdk,
    )
    try:
        fleet = FleetProbes(list(ports))
        assert await asyncio.to_thread(fleet.health) == (
            False,
            "worker 0: consuming; worker 1: consume loop has not iterated for 31s; "
            "worker 2: starting",
        )
        assert await asyncio.to_thread(fleet.readiness) == (
            False,
            "worker 0: ready; worker 1: starting; worker 2: not answering (starting)",
        )
        assert (await asyncio.to_thread(fleet.metrics))[0] == 501
        fleet.ports[:] = ports[:1] + ports[2:]  # worker 1 out of the way
        assert (await asyncio.to_thread(fleet.health))[0] is True
        fleet.ports[:] = [ports[2]]
        assert (await asyncio.to_thread(fleet.metrics))[0] == 503
        fleet.stopping = True
        assert await asyncio.to_thread(fleet.readiness) == (False, "shutting down")
    finally:
        await good.cleanup()
        await stalled.cleanup()


_CHATTY = (
    "from conveyor_driver.logs.chain import build_logger\n"
    "log = build_logger(fmt='json')\n"
    "for i in range(3000):\n"
    "    log.info('line', i=i, pad='x' * 200)\n"
)


@pytest.mark.process
async def test_lines_of_workers_sharing_a_stream_do_not_run_into_each_other() -> None:
    """Unbuffered, as in deploy/Dockerfile: each line must be one write, not text + newline."""
    read, write = os.pipe()
    env = {**clean_env(), "PYTHONUNBUFFERED": "1"}
    try:
        writers = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHATTY, stderr=write, env=env
            )
            for _ in range(2)
        ]
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as stream:
        lines = (await asyncio.to_thread(stream.read)).decode().splitlines()
    for writer in writers:
        assert await writer.wait() == 0
    assert len(lines) == 6000
    assert all(parse_json_line(line) is not None for line in lines)
