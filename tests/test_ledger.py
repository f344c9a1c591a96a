"""The run ledger against a real nats-server: what it records per delivery, and why a
redelivery's attempt is not its delivery count."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from conveyor_driver import protocol
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.runtime.ledger import Fenced, RunLedger, RunRecord


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
    assert record.result == '{"event":"driver.result"}'
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
