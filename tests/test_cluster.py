"""The run ledger on a 3-node JetStream cluster whose leaders are killed in turn.

Issue 10 measured it without the ledger: with leaders killed one after the other, acks
were lost with a consumer leader and 8-26 of 600 runs executed twice, some also stored
twice. Here two driver processes (``tests/apps/ledger_app.py``, each start of its handler
appended to a calls file) consume events published while, in turn, the leader of the
``messages`` stream, of the driver's consumer, of the ``pipeline-engine`` stream and of
the ledger's own bucket is killed with SIGKILL and started again. Results are consumed
as the Conveyor server consumes them (the durable ``pipeline-engine``, explicit acks), so
the work-queue stream forgets each one once read: a result published again after that
is stored again unless the stream's de-duplication still knows its ``Nats-Msg-Id``, which
a stream-leader restart can lose (nats-server #3272). At the end every run must have
exactly one stored result, and its handler must have started once, unless the
instance that started it was cut off past ``ack_wait`` and says, in its log, that it was
fenced (issue 10's guarantee 2 allows that second start, never one after a decision);
and no instance may take its own decision for a rival's (it did: see ``_check``).

``CONVEYOR_CLUSTER_TEST_LEDGER=off`` in pytest's environment runs the same test with
``--no-ledger``: what the test sees without the ledger (it is expected to fail, though not
deterministically: the losses depend on where the kills land).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from _cluster import JetStreamCluster, answers, poll
from _helpers import driver_message, resource_json
from apps.harness import DriverProcess, app, clean_env, driver_process
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext

from conveyor_driver import protocol

pytestmark = [pytest.mark.nats, pytest.mark.process]

LEDGERED = app("ledger_app.py:driver")
DRIVER = "ledgered"
#: The Conveyor server's consumer of the results.
ENGINE = "pipeline-engine"
#: Longer than the app's 2 s: an election takes seconds, and a run whose in-progress acks
#: cannot reach a consumer leader for that long is (rightly) taken over.
ACK_WAIT = 6.0
#: Events per kill, published one after another while the kill happens.
BURST = 75
#: Each run takes this long, so that runs are in flight when a leader dies.
RUN_SECONDS = 0.2
#: The whole test; the suite's own timeout (pyproject) is the backstop.
TEST_TIMEOUT = 150.0
#: What a driver logs, with the run id, when it lost a run and published nothing.
FENCED_LOGS = ("fenced:", "lease lost:")


@dataclasses.dataclass
class Published:
    """The test's events: each run id, and the ``messages`` sequences PubAcks gave it (more
    than one only if a retried publish was stored twice, de-duplication lost with a
    leader)."""

    runs: dict[str, set[int]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.runs)


async def test_leaders_killed_in_turn_neither_rerun_nor_report_twice(tmp_path: Path) -> None:
    ledger = os.environ.get("CONVEYOR_CLUSTER_TEST_LEDGER", "on") != "off"
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        JetStreamCluster(tmp_path / "cluster") as cluster,
    ):
        nc = await cluster.connect()
        try:
            await _create_streams(nc)
            calls = tmp_path / "calls"
            urls = ",".join(cluster.urls)
            switch = "--ledger" if ledger else "--no-ledger"
            args = (LEDGERED, "--nats-url", urls, "--concurrency", "8", switch)
            env = clean_env(CONVEYOR_TEST_ACK_WAIT=str(ACK_WAIT))
            stored = Stored()
            engine = asyncio.create_task(_consume_results(nc, stored))
            try:
                async with (
                    driver_process(*args, env=env) as a,
                    driver_process(*args, env=env) as b,
                ):
                    await asyncio.gather(a.started(), b.started())
                    published = await _publish_while_killing(cluster, nc, calls, ledger)
                    await _wait_all_settled(nc, published, stored, engine)
            finally:
                engine.cancel()
                for driver in (a, b):  # kept with the calls file, for a failure's post-mortem
                    (tmp_path / f"driver-{driver.pid}.log").write_text(driver.output)
                _check(published, stored, _starts(calls), [a, b], ledger)
        finally:
            await nc.close()


async def _create_streams(nc: Client) -> None:
    """The Conveyor server's streams, replicated on all three nodes."""
    js = nc.jetstream(timeout=2.0)
    for config in protocol.server_streams():
        replicated = dataclasses.replace(config, num_replicas=3)
        await poll(functools.partial(_added, js, replicated), what=f"stream {config.name}")


async def _added(js: JetStreamContext, config: StreamConfig) -> bool:
    return await answers(js.add_stream(config)) is not None


async def _publish_while_killing(
    cluster: JetStreamCluster, nc: Client, calls: Path, ledger: bool
) -> Published:
    """One burst of events per leader; a third into each burst, that leader is killed,
    kept down until another node leads, started again, and the cluster waited for until
    whole. The next kill is always a single fault."""
    published = Published()
    bucket = f"KV_{protocol.ledger_bucket(DRIVER)}"
    streams = [protocol.MESSAGES_STREAM, protocol.PIPELINE_STREAM, protocol.LOGS_STREAM]
    streams += [bucket] if ledger else []
    targets: dict[str, Callable[[], Awaitable[str]]] = {
        "messages stream": lambda: cluster.stream_leader(nc, protocol.MESSAGES_STREAM),
        "driver consumer": lambda: cluster.consumer_leader(nc, protocol.MESSAGES_STREAM, DRIVER),
        "pipeline-engine stream": lambda: cluster.stream_leader(nc, protocol.PIPELINE_STREAM),
    }
    if ledger:
        targets["ledger bucket"] = lambda: cluster.stream_leader(nc, bucket)
    js = nc.jetstream(timeout=2.0)
    await cluster.wait_healthy(nc, streams, DRIVER)
    for what, leader_of in targets.items():
        before = len(published)
        burst = asyncio.create_task(_publish(js, published, calls, BURST))
        try:
            third = functools.partial(_reached, published, before + BURST // 3)
            await poll(third, what="a third of the burst published")
            leader = await leader_of()
            print(f"killing {leader}, leader of the {what}, after {len(published)} events")
            cluster.kill(leader)
            moved = functools.partial(_moved, leader_of, leader)
            await poll(moved, what=f"the {what} led by another node")
            await cluster.restart(leader)
            await cluster.wait_healthy(nc, streams, DRIVER)
            await burst
        finally:
            burst.cancel()
    return published


async def _moved(leader_of: Callable[[], Awaitable[str]], old: str) -> bool:
    return await leader_of() != old


async def _reached(published: Published, count: int) -> bool:
    return len(published) >= count


async def _publish(js: JetStreamContext, published: Published, calls: Path, count: int) -> None:
    """``count`` events, one after another, as the Conveyor server publishes them (awaiting
    each PubAck), retried through elections under a ``Nats-Msg-Id`` of their run id."""
    spec = {"calls": str(calls), "sleep": RUN_SECONDS}
    for n in range(count):
        run_id, body = driver_message(resource_json(f"build-{n}", "job", spec=spec))
        headers = {protocol.MSG_ID_HEADER: run_id}
        published.runs[run_id] = set()
        stored = functools.partial(_stored_at, js, body, headers)
        sequence = await poll(stored, what="an event stored", timeout=60.0)
        published.runs[run_id].add(sequence)
        await asyncio.sleep(0.01)  # a steady trickle, not one burst: runs overlap the kill


async def _stored_at(js: JetStreamContext, body: bytes, headers: dict[str, str]) -> int | None:
    try:
        ack = await js.publish(protocol.resource_subject("job"), body, headers=headers)
    except (NatsError, TimeoutError):
        return None
    return int(ack.seq)


async def _wait_all_settled(
    nc: Client, published: Published, stored: Stored, engine: asyncio.Task[None]
) -> None:
    """Every run has a result, the driver's consumer has nothing left to deliver or to wait
    for (no redelivery, and so no result published again, can come after this), and every
    result stored has been read."""
    js = nc.jetstream(timeout=2.0)

    async def settled(stream: str, consumer: str) -> bool:
        info = await js.consumer_info(stream, consumer)
        return bool(info.num_ack_pending == 0 and info.num_pending == 0)

    async def results() -> bool:
        if engine.done():
            engine.result()  # the reader failed: say why, not "no result"
        return all(stored.by_run[run] for run in published.runs)

    await poll(results, what="a result for every run", timeout=60.0)
    await poll(
        lambda: answers(settled(protocol.MESSAGES_STREAM, DRIVER)),
        what="every delivery acked",
        timeout=60.0,
    )
    await poll(
        lambda: answers(settled(protocol.PIPELINE_STREAM, ENGINE)),
        what="every result read",
        timeout=60.0,
    )


@dataclasses.dataclass
class Stored:
    """The results the engine read: per run id, and per ``Nats-Msg-Id``, each stored
    message once (a redelivery to the engine, its ack lost with a leader, is the same
    stream sequence)."""

    sequences: set[int] = dataclasses.field(default_factory=set)
    by_run: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    by_message_id: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    message_ids: dict[str, set[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(set)
    )

    def add(self, sequence: int, run_id: str, message_id: str) -> None:
        if sequence in self.sequences:
            return
        self.sequences.add(sequence)
        self.by_run[run_id] += 1
        self.by_message_id[message_id] += 1
        self.message_ids[run_id].add(message_id)


async def _consume_results(nc: Client, stored: Stored) -> None:
    """Read ``pipeline-engine`` as the Conveyor server does, through every election."""
    js = nc.jetstream(timeout=2.0)
    sub = None
    while True:
        try:
            if sub is None:
                sub = await js.pull_subscribe(
                    "pipelines.>", durable=ENGINE, stream=protocol.PIPELINE_STREAM
                )
            for msg in await sub.fetch(64, timeout=1.0):
                run_id = str(orjson.loads(msg.data or b"{}").get("run_id"))
                message_id = (msg.headers or {}).get(protocol.MSG_ID_HEADER, "")
                stored.add(msg.metadata.sequence.stream, run_id, message_id)
                await msg.ack()
        except (NatsError, TimeoutError):
            await asyncio.sleep(0.1)  # an election, a dead node: read on when it answers


@dataclasses.dataclass(frozen=True)
class Start:
    """One start of the handler, as the app notes it."""

    pid: int
    attempt: int
    at: float


def _starts(calls: Path) -> dict[str, list[Start]]:
    """Handler starts per run id (the app appends ``<pid> <run id> <attempt> <time>``)."""
    starts: dict[str, list[Start]] = collections.defaultdict(list)
    for line in calls.read_text().splitlines() if calls.exists() else []:
        pid, run_id, attempt, at = line.split()
        starts[run_id].append(Start(int(pid), int(attempt), float(at)))
    return starts


def _check(
    published: Published,
    stored: Stored,
    runs: dict[str, list[Start]],
    drivers: list[DriverProcess],
    ledger: bool,
) -> None:
    """One result per message, none lost; a handler started again only as a takeover.

    A second start is a takeover when its delivery was a redelivery (attempt 2 or more:
    it read the ledger and found the run undecided) and one instance, for each extra
    start, says it lost the run ("fenced", "lease lost", naming the run). A second start
    as attempt 1 skipped the ledger: nothing would have stopped it after a decision.
    """
    # Each fencing, by run: the decision's compare-and-set, or a renewal finding it lost.
    fencings = [
        (driver.pid, record)
        for driver in drivers
        for record in driver.records
        if str(record.get("event", "")).startswith(FENCED_LOGS)
    ]
    fenced = collections.Counter(str(record.get("run_id", "?")) for _, record in fencings)
    # The reason names who decided. An instance may lose a run to itself, but only when
    # it held two deliveries of it; else it took its own decision for a rival's.
    by_itself = [
        record
        for pid, record in fencings
        if f":{pid} at " in str(record.get("reason", ""))
        and sum(start.pid == pid for start in runs.get(str(record.get("run_id")), [])) < 2
    ]
    events = [str(record.get("event", "")) for driver in drivers for record in driver.records]
    replays = sum(event.startswith("run already finished") for event in events)
    unconfirmed = sum(event.startswith("ack not confirmed") for event in events)
    # A run id the test published twice (a retried publish stored twice) is two messages.
    messages = {run: max(len(stored.message_ids.get(run, ())), 1) for run in published.runs}
    lost = sorted(run for run in published.runs if stored.by_run[run] == 0)
    twice_stored = {run: n for run, n in stored.by_run.items() if n > messages.get(run, 1)}
    twice_by_id = {mid: n for mid, n in stored.by_message_id.items() if n > 1}
    rerun = {run: each for run, each in runs.items() if len(each) > messages.get(run, 1)}
    unexplained = {
        run: each
        for run, each in rerun.items()
        if fenced[run] < len(each) - messages[run]
        or sum(start.attempt == 1 for start in each) > messages[run]
    }
    print(
        f"ledger {'on' if ledger else 'off'}: {len(published)} runs published "
        f"({sum(n > 1 for n in messages.values())} stored twice by the test's retries), "
        f"{sum(stored.by_run.values())} results stored, "
        f"{sum(len(each) for each in runs.values())} handler starts; lost {len(lost)}, "
        f"stored twice {len(twice_stored)}, started again {len(rerun)} (takeovers "
        f"{len(rerun) - len(unexplained)}, unexplained {len(unexplained)}); "
        f"fencings {len(fencings)} (by itself {len(by_itself)}), replays {replays}, "
        f"unconfirmed acks {unconfirmed}"
    )
    assert not lost, f"runs without a result: {lost}"
    assert not twice_by_id, f"results stored twice under one Nats-Msg-Id: {twice_by_id}"
    assert not twice_stored, f"runs with more results than messages: {twice_stored}"
    assert set(stored.by_run) <= set(published.runs), "results of runs nobody published"
    assert all(runs.get(run) for run in published.runs), "a stored run never started"
    assert not unexplained, f"handlers started again, not as a takeover: {unexplained}"
    assert not by_itself, f"instances fenced by their own decision: {by_itself[:3]}"
