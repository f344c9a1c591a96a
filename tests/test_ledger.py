"""The run ledger against a real nats-server: what it records per delivery, and why a
redelivery's attempt is not its delivery count."""

from __future__ import annotations

from nats.aio.client import Client

from conveyor_driver import protocol
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.runtime.ledger import RunLedger, RunRecord


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
