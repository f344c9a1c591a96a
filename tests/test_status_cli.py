"""``conveyor-driver status APP``: the driver's consumer as the server sees it, so an operator
can tell a backlog, stuck deliveries and redeliveries at a glance."""

from __future__ import annotations

from datetime import UTC, datetime

from _helpers import (
    TIMEOUT,
    driver_message,
    resource_json,
    run_in_process,
    settled,
    wait_until,
)
from apps.harness import Completed, app
from apps.worker_app import driver as worker
from nats.aio.client import Client
from nats.js.api import ConsumerInfo

from conveyor_driver import protocol
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.testing.fixtures import running

WORKER = app("worker_app.py:driver")  # driver "worker", resource type "job"
LABELS = [
    "consumer",
    "subjects",
    "pending",
    "ack pending",
    "redelivered",
    "waiting pulls",
    "last delivery",
    "last ack",
    "run ledger",
]


def rows(completed: Completed) -> dict[str, str]:
    """The ``label: value`` rows, checking that every row is there once and in order."""
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    pairs = [line.split(": ", 1) for line in completed.stdout.splitlines()]
    assert [label.strip() for label, _ in pairs] == LABELS, completed.stdout
    return {label.strip(): value for label, value in pairs}


def moment(value: str, since: datetime) -> datetime:
    """A timestamp the status printed, which must be aware and no older than ``since``."""
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None
    assert since <= parsed <= datetime.now(UTC)
    return parsed


async def publish_jobs(nc: Client, count: int) -> None:
    for i in range(count):
        _, body = driver_message(resource_json(f"job-{i}", "job", spec={}))
        await nc.jetstream().publish("resources.job", body)


async def test_status_shows_the_backlog_of_a_stopped_driver(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    async with running(worker, nats_server.url):
        pass  # the driver ran once, so its durable consumer exists; now it is down
    since = datetime.now(UTC).replace(microsecond=0)
    await publish_jobs(nats_client, 3)

    # One delivery handed back and delivered again, then left unacknowledged: what a
    # crashed instance leaves behind.
    js = nats_client.jetstream()
    sub = await js.pull_subscribe_bind(durable="worker", stream=protocol.MESSAGES_STREAM)
    [first] = await sub.fetch(1, timeout=TIMEOUT)
    # A nak asked as a request is answered once the consumer has applied it; a plain one
    # may still be queued on the server when the next pull is served.
    await nats_client.request(first.reply, b"-NAK", timeout=TIMEOUT)
    [again] = await sub.fetch(1, timeout=TIMEOUT)
    assert again.metadata.sequence.stream == first.metadata.sequence.stream
    assert again.metadata.num_delivered == 2
    await sub.unsubscribe()

    status = rows(await run_in_process("status", WORKER, "--nats-url", nats_server.url))
    assert status["consumer"] == "worker on stream messages"
    assert status["subjects"] == "resources.job, drivers.worker.resources.job"
    assert status["pending"] == "2 waiting to be delivered"
    assert status["ack pending"] == "1 delivered, not yet acknowledged"
    assert status["redelivered"] == "1"
    assert status["waiting pulls"] == "0"
    moment(status["last delivery"], since)
    assert status["last ack"] == "never"
    assert status["run ledger"] == (
        "0 finished, 0 running (long runs), 0 fenced, 0 skipped as duplicates"
    )


async def test_status_counts_the_run_ledger(nats_server: EmbeddedNats, nats_client: Client) -> None:
    from conveyor_driver.logs.chain import build_logger
    from conveyor_driver.runtime.ledger import RunLedger, RunRecord

    async with running(worker, nats_server.url):
        pass  # its consumer and its ledger bucket exist from now on
    ledger = await RunLedger.open(nats_client.jetstream(), "worker", build_logger(), instance="a")
    decided = await ledger.decide(RunRecord("r1"), 1, b"{}")
    await ledger.mark_reported(decided, 1)
    await ledger.note_duplicate(1, "r1")
    await ledger.renew(RunRecord("r2"), 2)
    status = rows(await run_in_process("status", WORKER, "--nats-url", nats_server.url))
    assert status["run ledger"] == (
        "1 finished, 1 running (long runs), 0 fenced, 1 skipped as duplicates"
    )


async def test_status_of_a_running_driver_that_drained_its_backlog(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    async with running(worker, nats_server.url):
        pass
    since = datetime.now(UTC).replace(microsecond=0)
    await publish_jobs(nats_client, 3)

    async with running(worker, nats_server.url):
        await wait_until(lambda: settled(nats_client, "worker"), what="backlog drained")
        # Idle, the driver keeps one pull request open for its one free slot.
        await wait_until(lambda: _one_pull_waiting(nats_client), what="a pull request waiting")
        status = rows(await run_in_process("status", WORKER, "--nats-url", nats_server.url))

    assert status["pending"] == "0 waiting to be delivered"
    assert status["ack pending"] == "0 delivered, not yet acknowledged"
    assert status["redelivered"] == "0"
    assert status["waiting pulls"] == "1"
    delivered = moment(status["last delivery"], since)
    assert moment(status["last ack"], since) >= delivered


async def _one_pull_waiting(nc: Client) -> bool:
    info: ConsumerInfo = await nc.jetstream().consumer_info(protocol.MESSAGES_STREAM, "worker")
    return info.num_waiting == 1


async def test_status_of_a_driver_whose_consumer_does_not_exist_is_one_line(
    nats_server: EmbeddedNats,
) -> None:
    completed = await run_in_process("status", WORKER, "--nats-url", nats_server.url)
    assert completed.returncode == 1
    assert completed.stdout == ""
    assert completed.stderr_lines == [
        "Error: consumer 'worker' not found on stream 'messages' "
        "(has the driver run against this NATS, and does the stream exist?)"
    ]


async def test_status_with_nats_unreachable_is_one_line() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    completed = await run_in_process("status", WORKER, "--nats-url", url)
    assert completed.returncode == 1
    assert completed.stdout == ""
    [line] = completed.stderr_lines
    assert line.startswith(f"Error: cannot reach NATS at {url}: "), line
