"""The run ledger against a real nats-server: what it records per delivery, and why a
redelivery's attempt is not its delivery count."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
from _fault_proxy import drop_first_acks, fault_proxy
from _helpers import consumer_info, resource_json, send, settled, wait_until
from apps.harness import app, clean_env, driver_process
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError

from conveyor_driver import Context, Driver, protocol
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.models import DriverMessage, Resource
from conveyor_driver.runtime.ledger import Fenced, RunLedger, RunRecord
from conveyor_driver.runtime.publisher import Publisher
from conveyor_driver.testing import running


async def test_hand_backs_and_errors_are_kept_per_stream_sequence(nats_client: Client) -> None:
    ledger = await RunLedger.open(nats_client.jetstream(), "ledgered", build_logger())
    assert (await ledger.read(7, "run-a")) == RunRecord("run-a")

    await ledger.record_error(7, "run-a", 1, "ValueError: first")
    await ledger.count_handback(7, "run-a")
    await ledger.count_handback(7, "run-a")
    record = await ledger.read(7, "run-a")

    # Deliveries: 1 failed, 2 and 3 handed back by shutdowns, 4 is the second attempt.
    assert record.attempt(4) == 2
    assert record.earlier(2) == ("ValueError: first",)
    assert record.earlier(3) == (
        "ValueError: first",
        "the driver stopped mid-run (no outcome recorded)",
    )
    assert (await ledger.read(8, "run-b")) == RunRecord("run-b")


async def test_a_hand_back_whose_answer_was_lost_is_counted_once(
    nats_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write is stored but its answer never comes (a leader died with it): the retry
    finds the change made and does not make it again."""
    ledger = await RunLedger.open(nats_client.jetstream(), "ledgered", build_logger())
    write = RunLedger._write
    lost: list[int] = []

    async def answer_lost_once(self: RunLedger, sequence: int, record: RunRecord, rev: int) -> int:
        revision = await write(self, sequence, record, rev)
        if not lost:
            lost.append(revision)
            raise NatsTimeoutError
        return revision

    monkeypatch.setattr(RunLedger, "_write", answer_lost_once)
    await ledger.count_handback(7, "run-a")
    record = await ledger.read(7, "run-a")
    assert lost and record.handbacks == 1
    assert record.attempt(delivered=2) == 1


async def test_a_record_of_another_run_at_a_reused_sequence_is_ignored(
    nats_client: Client,
) -> None:
    """A recreated stream starts its sequences again: an old record must not count."""
    ledger = await RunLedger.open(nats_client.jetstream(), "reused", build_logger())
    await ledger.count_handback(1, "old-run")
    assert (await ledger.read(1, "new-run")).handbacks == 0
    await ledger.count_handback(1, "new-run")
    assert (await ledger.read(1, "new-run")).handbacks == 1


async def test_the_bucket_is_replicated_like_the_messages_stream_and_expires(
    nats_client: Client,
) -> None:
    js = nats_client.jetstream()
    await RunLedger.open(js, "d:x", build_logger(), ttl=3600.0)
    bucket = protocol.ledger_bucket("d:x")
    assert bucket.startswith("conveyor-runs-d_x-")
    info = await js.stream_info(f"KV_{bucket}")
    messages = await js.stream_info(protocol.MESSAGES_STREAM)
    assert info.config.num_replicas == messages.config.num_replicas
    assert info.config.max_age == 3600.0


async def test_the_first_to_decide_wins_and_the_late_one_is_fenced(nats_client: Client) -> None:
    """Two instances holding one delivery (one paused past ack_wait): one result."""
    js = nats_client.jetstream()
    a = await RunLedger.open(js, "fencing", build_logger(), instance="a")
    b = await RunLedger.open(js, "fencing", build_logger(), instance="b")
    seen_by_a = RunRecord("run-1")  # a first delivery: nothing read
    seen_by_b = await b.read(3, "run-1")  # the redelivery reads the (empty) record

    decided = await b.decide(seen_by_b, 3, b'{"event":"driver.result"}')
    assert (decided.state, decided.instance) == ("decided", "b")
    with pytest.raises(Fenced) as fenced:
        await a.decide(seen_by_a, 3, b'{"event":"driver.result","late":true}')
    assert fenced.value.record.instance == "b"

    record = await a.read(3, "run-1")
    assert record.result == b'{"event":"driver.result"}'
    assert (record.fenced, record.finished) == (1, True)
    await b.mark_reported(decided, 3)
    await a.note_duplicate(3, "run-1")
    assert await a.summary() == {
        "finished": 1,
        "running": 0,
        "fenced": 1,
        "skipped_as_duplicate": 1,
    }


async def test_a_lease_renewal_learns_of_a_takeover(nats_client: Client) -> None:
    js = nats_client.jetstream()
    a = await RunLedger.open(js, "leases", build_logger(), instance="a")
    b = await RunLedger.open(js, "leases", build_logger(), instance="b")
    lease = await a.renew(RunRecord("run-2"), 5)
    assert (lease.state, lease.instance) == ("running", "a")
    assert (await a.summary())["running"] == 1
    # Another instance's hand-back moves the revision: the lease carries on from it.
    await b.count_handback(5, "run-2")
    lease = await a.renew(lease, 5)
    assert (lease.state, lease.handbacks) == ("running", 1)
    await b.decide(await b.read(5, "run-2"), 5, b"{}")
    with pytest.raises(Fenced):
        await a.renew(lease, 5)


# --- the ledger in a running driver -----------------------------------------------------

LEDGERED = app("ledger_app.py:driver")  # driver "ledgered", ack_wait 2 s


def _runs(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


async def _stored_results(nc: Client, run_id: str) -> int:
    """Results of ``run_id`` the result stream holds (nothing consumes it in these tests)."""
    js = nc.jetstream()
    state = (await js.stream_info(protocol.PIPELINE_STREAM)).state
    count = 0
    for sequence in range(state.first_seq, state.last_seq + 1):
        try:
            msg = await js.get_msg(protocol.PIPELINE_STREAM, sequence)
        except Exception:
            continue  # a gap: a deleted message
        count += orjson.loads(msg.data or b"{}").get("run_id") == run_id
    return count


async def _short_duplicate_window(nc: Client) -> None:
    """The result stream forgets a Nats-Msg-Id after 1 s: a redelivery that comes later
    must be stopped by the ledger, not by JetStream's de-duplication."""
    js = nc.jetstream()
    config = dataclasses.replace(protocol.server_streams()[1], duplicate_window=1.0)
    await js.update_stream(config)


async def _lost_acks(nats_server: EmbeddedNats, nats_client: Client, dropped: int) -> _Outcome:
    """Run one build behind a proxy that drops the driver's first ``dropped`` acks on the
    wire, with the result stream's de-duplication window at 1 s; wait until it is acked."""
    await _short_duplicate_window(nats_client)
    driver, calls = _counted("forgetful")
    async with (
        fault_proxy(nats_server.url, drop_first_acks(dropped)) as proxy,
        running(driver, proxy.url),
    ):
        run_id = await send(nats_client, resource_json())
        await wait_until(lambda: len(proxy.dropped) == dropped, what="the acks dropped")
        bucket = await nats_client.jetstream().key_value(protocol.ledger_bucket("forgetful"))
        ledger = RunLedger(bucket, build_logger())
        if dropped > 1:  # JetStream redelivers after ack_wait: the ledger turns it away
            await wait_until(
                lambda: _skipped(ledger, dropped - 1), what="the redelivery acked unrun"
            )
        await wait_until(lambda: settled(nats_client, "forgetful"), what="acked at last")
        info = await consumer_info(nats_client, "forgetful")
    assert info.delivered is not None and info.ack_floor is not None
    return _Outcome(
        calls=calls,
        run_id=run_id,
        dropped=len(proxy.dropped),
        deliveries=info.delivered.consumer_seq,
        stored=await _stored_results(nats_client, run_id),
        record=await ledger.read(info.ack_floor.stream_seq, run_id),
        summary=await ledger.summary(),
    )


async def _skipped(ledger: RunLedger, count: int) -> bool:
    return (await ledger.summary())["skipped_as_duplicate"] >= count


@dataclasses.dataclass
class _Outcome:
    calls: list[str]
    run_id: str
    dropped: int
    deliveries: int
    stored: int
    record: RunRecord
    summary: dict[str, int]


async def test_a_lost_ack_is_noticed_and_sent_again(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """The ack of a finished run is dropped on the wire: it goes unconfirmed, so the run is
    marked reported and acked again, well before JetStream would redeliver it."""
    outcome = await _lost_acks(nats_server, nats_client, dropped=1)
    assert outcome.dropped == 1
    assert outcome.calls == [outcome.run_id]
    assert outcome.stored == 1
    assert outcome.record.state == "reported"
    assert outcome.deliveries == 1
    assert outcome.summary["skipped_as_duplicate"] == 0


async def test_a_redelivery_after_lost_acks_does_not_run_a_finished_build_again(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    """The ack and its second sending are both dropped: JetStream redelivers after
    ``ack_wait``, later than the result stream's de-duplication window. The ledger says
    reported, so the redelivery is acked without running the handler or publishing."""
    outcome = await _lost_acks(nats_server, nats_client, dropped=2)
    assert outcome.dropped == 2
    assert outcome.calls == [outcome.run_id]
    assert outcome.stored == 1
    assert outcome.deliveries == 2
    assert outcome.summary["skipped_as_duplicate"] == 1


@pytest.mark.process
async def test_kill_9_after_the_result_is_stored_neither_loses_it_nor_runs_twice(
    nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    """The result is stored, then the process dies before its ack and before the ledger
    says "reported": the redelivery re-publishes the recorded result under the same
    Nats-Msg-Id (JetStream keeps one), and the handler does not run again."""
    calls = tmp_path / "calls"
    message = await _decided_then_killed(nats_server, nats_client, calls)
    async with driver_process(LEDGERED, "--nats-url", nats_server.url) as survivor:
        await survivor.started()
        await wait_until(lambda: settled(nats_client, "ledgered"), what="acked")
        await wait_until(
            lambda: _logged(survivor.records, "run already finished"), what="the replay logged"
        )
    assert len(_runs(calls)) == 1
    assert await _stored_results(nats_client, message.run_id) == 1


@pytest.mark.process
async def test_a_replay_marks_the_run_reported_even_when_the_first_mark_is_lost(
    nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    """The replay of a decided run marks it reported, so that another redelivery (its ack
    lost too) acks without publishing the result a third time: the mark is waited for,
    and sent again when its first sending is lost on the wire."""
    calls = tmp_path / "calls"
    message = await _decided_then_killed(nats_server, nats_client, calls)
    marks: list[bytes] = []

    def first_mark(subject: str, payload: bytes) -> bool:
        if subject.startswith("$KV.") and b'"state":"reported"' in payload and not marks:
            marks.append(payload)
            return True
        return False

    async with (
        fault_proxy(nats_server.url, first_mark) as proxy,
        driver_process(LEDGERED, "--nats-url", proxy.url) as survivor,
    ):
        await survivor.started()
        await wait_until(lambda: settled(nats_client, "ledgered"), what="acked")
        info = await consumer_info(nats_client, "ledgered")
    assert marks and _logged(survivor.records, "run already finished")
    assert info.ack_floor is not None
    bucket = await nats_client.jetstream().key_value(protocol.ledger_bucket("ledgered"))
    record = await RunLedger(bucket, build_logger()).read(info.ack_floor.stream_seq, message.run_id)
    assert record.state == "reported"
    assert await _stored_results(nats_client, message.run_id) == 1


@pytest.mark.process
async def test_an_instance_paused_past_ack_wait_is_fenced_and_one_result_is_stored(
    nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    """A is SIGSTOPped mid-run for longer than ack_wait; B takes the redelivery and
    finishes; A, let go, finishes too, finds B's decision in the ledger and publishes
    nothing."""
    await _short_duplicate_window(nats_client)
    calls = tmp_path / "calls"
    url = ("--nats-url", nats_server.url)
    async with driver_process(LEDGERED, *url) as a:
        await a.started()
        spec = {"calls": str(calls), "sleep": 4}
        message = await emit_event(nats_client, Resource("slow", "job", spec=spec))
        await wait_until(lambda: len(_runs(calls)) == 1, what="A started the run")
        a.send(signal.SIGSTOP)
        try:
            async with driver_process(LEDGERED, *url) as b:
                await b.started()
                await wait_until(lambda: len(_runs(calls)) == 2, what="B took the redelivery")
                await wait_until(
                    lambda: _has_result(nats_client, message.run_id), what="B's result stored"
                )
                a.send(signal.SIGCONT)
                await wait_until(
                    lambda: _logged(a.records, "fenced") or _logged(a.records, "lease lost"),
                    what="A fenced",
                )
                await wait_until(lambda: settled(nats_client, "ledgered"), what="acked")
        finally:
            a.send(signal.SIGCONT)
    assert await _stored_results(nats_client, message.run_id) == 1


@pytest.mark.process
async def test_an_instance_paused_after_deciding_publishes_nothing_once_another_reported(
    nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    """A stops right after recording its decision, before publishing the result; B takes
    the redelivery, publishes the recorded result and acks. A, let go later than the result
    stream's de-duplication window, sees that its decision took long, asks the ledger
    before its first try, and publishes nothing."""
    await _short_duplicate_window(nats_client)
    calls = tmp_path / "calls"
    url = ("--nats-url", nats_server.url)
    env = clean_env(CONVEYOR_TEST_STOP_AFTER_DECIDE="1")

    async def a_went_on(run_id: str) -> bool:
        stood_down = _logged(a.records, "another instance reported this run")
        return stood_down or await _stored_results(nats_client, run_id) == 2

    async with driver_process(LEDGERED, *url, env=env) as a:
        await a.started()
        message = await emit_event(nats_client, Resource("a", "job", spec={"calls": str(calls)}))
        await wait_until(lambda: _stopped(a.pid), what="A stopped after deciding")
        try:
            async with driver_process(LEDGERED, *url) as b:
                await b.started()
                await wait_until(lambda: settled(nats_client, "ledgered"), what="B acked")
                await asyncio.sleep(1.5)  # past the result stream's de-duplication window
                a.send(signal.SIGCONT)
                await wait_until(lambda: a_went_on(message.run_id), what="A went on")
        finally:
            a.send(signal.SIGCONT)
    assert [line.split()[:2] for line in _runs(calls)] == [[str(a.pid), message.run_id]]
    assert await _stored_results(nats_client, message.run_id) == 1
    assert _logged(a.records, "another instance reported this run")


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state ``T`` in /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


async def _decided_then_killed(
    nats_server: EmbeddedNats, nats_client: Client, calls: Path
) -> DriverMessage:
    """One run whose driver stores the result, then dies (SIGKILL) before acking it."""
    env = clean_env(CONVEYOR_TEST_DIE_AFTER_PUBLISH="1")
    async with driver_process(LEDGERED, "--nats-url", nats_server.url, env=env) as doomed:
        await doomed.started()
        message = await emit_event(nats_client, Resource("a", "job", spec={"calls": str(calls)}))
        assert await doomed.wait() == -signal.SIGKILL
    return message


def _logged(records: list[dict[str, Any]], start: str) -> bool:
    return any(str(record.get("event", "")).startswith(start) for record in records)


async def _has_result(nc: Client, run_id: str) -> bool:
    return await _stored_results(nc, run_id) > 0


async def test_a_result_waiting_out_weather_is_not_fenced_by_its_own_decision(
    nats_server: EmbeddedNats, nats_client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """The result stream is away for several ``ack_wait``s after the run was decided: the
    in-progress acks keep the delivery here, the decision in the ledger is this instance's
    own (no lease renewal may take it for another's), and the result is stored once the
    stream is back, without a redelivery."""
    js = nats_client.jetstream()
    driver, calls = _counted("patient")
    async with running(driver, nats_server.url):
        await js.delete_stream(protocol.PIPELINE_STREAM)
        run_id = await send(nats_client, resource_json())
        await wait_until(lambda: calls, what="the handler ran")
        await asyncio.sleep(3 * driver.ack_wait)  # the weather: renewals are due meanwhile
        await js.add_stream(protocol.server_streams()[1])
        await wait_until(lambda: settled(nats_client, "patient"), what="acked")
        info = await consumer_info(nats_client, "patient")
        summary = await _summary(nats_client, "patient")
    console = capsys.readouterr().err
    assert summary == {"finished": 1, "running": 0, "fenced": 0, "skipped_as_duplicate": 0}
    assert calls == [run_id]
    assert await _stored_results(nats_client, run_id) == 1
    assert info.delivered is not None and info.delivered.consumer_seq == 1
    assert "result not stored yet; retrying" in console
    assert "fenced" not in console and "lease lost" not in console


async def test_a_result_held_back_while_another_instance_reported_the_run_is_not_sent_again(
    nats_server: EmbeddedNats, nats_client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """A decided the run, then its result and in-progress acks are lost on the wire: after
    ``ack_wait`` JetStream redelivers to B, which finds A's decision, publishes it and acks.
    A's link comes back later than the result stream's de-duplication window; A's next try
    first asks the ledger, finds that B reported the run, and sends nothing: one result
    stored, one run of the handler."""
    await _short_duplicate_window(nats_client)
    cut = [True]

    def cut_off(subject: str, payload: bytes) -> bool:
        return cut[0] and (subject == protocol.RESULT_SUBJECT or payload == b"+WPI")

    calls: list[str] = []
    a, _ = _counted("twins", calls)
    b, _ = _counted("twins", calls)
    console: list[str] = []

    def said(text: str) -> bool:
        console.append(capsys.readouterr().err)
        return text in "".join(console)

    held = "another instance reported this run while its result waited"

    async def a_tried_again(run_id: str) -> bool:
        return said(held) or await _stored_results(nats_client, run_id) == 2

    async with fault_proxy(nats_server.url, cut_off) as proxy, running(a, proxy.url):
        run_id = await send(nats_client, resource_json())
        await wait_until(
            lambda: any(s == protocol.RESULT_SUBJECT for s, _ in proxy.dropped),
            what="A's result lost on the wire",
        )
        async with running(b, nats_server.url):
            await wait_until(lambda: settled(nats_client, "twins"), what="B acked the redelivery")
            await asyncio.sleep(1.5)  # past the result stream's de-duplication window (1 s)
            cut[0] = False
            await wait_until(lambda: a_tried_again(run_id), what="A's next try")
        stored = await _stored_results(nats_client, run_id)
    assert calls == [run_id]
    assert stored == 1
    assert said(held)


async def test_a_decision_stored_but_unanswered_is_recognised_as_this_instances_own(
    nats_server: EmbeddedNats,
    nats_client: Client,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The decision's write is stored, but its answer is lost (a stream leader that died
    after replicating it): the retry finds the write already there. It is this instance's
    own, not another's: the result is published at once, without a fence or a redelivery."""
    store = Publisher.store
    lost: list[str] = []

    async def answer_lost_once(
        self: Publisher, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> int:
        revision = await store(self, subject, body, headers)
        if subject.startswith("$KV.") and not lost:
            lost.append(subject)
            raise NatsTimeoutError
        return revision

    monkeypatch.setattr(Publisher, "store", answer_lost_once)
    driver, calls = _counted("unanswered", result={"built": "ü", "n": 1.5})
    async with running(driver, nats_server.url):
        run_id = await send(nats_client, resource_json())
        await wait_until(lambda: settled(nats_client, "unanswered"), what="acked")
        info = await consumer_info(nats_client, "unanswered")
        summary = await _summary(nats_client, "unanswered")
    console = capsys.readouterr().err
    assert summary == {"finished": 1, "running": 0, "fenced": 0, "skipped_as_duplicate": 0}
    assert lost and calls == [run_id]
    assert await _stored_results(nats_client, run_id) == 1
    assert info.delivered is not None and info.delivered.consumer_seq == 1
    assert "fenced" not in console


async def _summary(nc: Client, driver: str) -> dict[str, int]:
    bucket = await nc.jetstream().key_value(protocol.ledger_bucket(driver))
    return await RunLedger(bucket, build_logger()).summary()


def _counted(
    name: str, calls: list[str] | None = None, *, result: Any = "built", concurrency: int = 1
) -> tuple[Driver, list[str]]:
    """A driver (``ack_wait`` 2 s) whose pipeline handler appends each run id it starts to
    ``calls`` (a new list unless given, so two instances can share one) and returns
    ``result``."""
    driver = Driver(name, ack_wait=2.0, concurrency=concurrency)
    started = [] if calls is None else calls

    @driver.on("pipeline")
    async def build(ctx: Context) -> Any:
        started.append(ctx.run_id)
        return result

    return driver, started
