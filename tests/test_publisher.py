"""The acked publisher against a real nats-server: PubAcks, refusals, weather, retries."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator

import pytest
from _helpers import TIMEOUT, wait_until
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionReconnectingError, MaxPayloadError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import DiscardPolicy
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    ServiceUnavailableError,
)

from conveyor_driver import protocol as p
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.runtime.connection import DriverClient
from conveyor_driver.runtime.publisher import (
    Backoff,
    Publisher,
    answer_error,
    describe,
    headers_size,
    is_permanent,
)

HEADERS = {p.MSG_ID_HEADER: "publisher-test-1"}


@pytest.fixture(params=["nats-py", "driver"])
async def nats_client(
    request: pytest.FixtureRequest, nats_server: EmbeddedNats
) -> AsyncIterator[Client]:
    """Every test here twice: on nats-py's own client, whose subscriptions queue each reply
    for a task, and on the driver's, which hands plain replies over as they are read."""
    nc = DriverClient() if request.param == "driver" else Client()
    await nc.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def test_the_drivers_client_hands_plain_answers_over_and_statuses_to_the_callback(
    nats_server: EmbeddedNats,
) -> None:
    nc = DriverClient()
    await nc.connect(nats_server.url)
    try:
        publisher = Publisher(nc)
        for n in range(3):
            await publisher.publish(p.RESULT_SUBJECT, b"{}", {p.MSG_ID_HEADER: f"direct-{n}"})
        assert publisher._sub is not None
        assert publisher._sub.delivered == 0  # none went through the subscription's queue
        with pytest.raises(NoStreamResponseError):  # a 503 status: headers, nats-py's way
            await publisher.publish("nowhere.at.all", b"{}")
        assert publisher._sub.delivered == 1
        assert await stored(nc) == 3
    finally:
        await nc.close()


async def stored(nc: Client, stream: str = p.PIPELINE_STREAM) -> int:
    return (await nc.jetstream().stream_info(stream)).state.messages


async def test_a_puback_returns_and_a_repeat_with_the_same_id_is_stored_once(
    nats_client: Client,
) -> None:
    publisher = Publisher(nats_client)
    for _ in range(2):
        await publisher.publish(p.RESULT_SUBJECT, b'{"event":"driver.result"}', HEADERS)
    assert await stored(nats_client) == 1


async def test_no_stream_is_503_no_responders_and_weather(nats_client: Client) -> None:
    publisher = Publisher(nats_client)
    with pytest.raises(NoStreamResponseError) as caught:
        await publisher.publish("nowhere.at.all", b"{}")
    assert not is_permanent(caught.value)


async def test_a_jetstream_refusal_is_the_api_error_of_its_code_and_permanent(
    nats_client: Client,
) -> None:
    js = nats_client.jetstream()
    config = (await js.stream_info(p.LOGS_STREAM)).config
    await js.update_stream(dataclasses.replace(config, max_msg_size=1024))
    publisher = Publisher(nats_client)
    with pytest.raises(BadRequestError) as caught:
        await publisher.publish(p.log_subject("run-1"), b"x" * 2048)
    assert (caught.value.code, caught.value.err_code) == (400, 10054)
    assert is_permanent(caught.value)
    assert describe(caught.value) == "400 message size exceeds maximum allowed"


async def test_max_payload_counts_the_headers_and_nothing_is_sent(nats_client: Client) -> None:
    publisher = Publisher(nats_client)
    headers = {p.MSG_ID_HEADER: "h" * 100}
    body = b"x" * (nats_client.max_payload - headers_size(headers) + 1)  # fits without headers
    with pytest.raises(MaxPayloadError) as caught:
        await publisher.publish(p.RESULT_SUBJECT, body, headers)
    assert is_permanent(caught.value)
    fitting = body[:-1]
    await publisher.publish(p.RESULT_SUBJECT, fitting, headers)
    assert await stored(nats_client) == 1
    # The server closes the connection of a client that sends more: it never had to.
    assert nats_client.stats["reconnects"] == 0 and nats_client.is_connected


async def test_no_answer_in_time_is_a_timeout_and_weather(nats_client: Client) -> None:
    async def silent(msg: Msg) -> None:
        return None

    await nats_client.subscribe("silent.subject", cb=silent)
    publisher = Publisher(nats_client, timeout=0.2)
    with pytest.raises(NatsTimeoutError) as caught:
        await publisher.publish("silent.subject", b"{}")
    assert not is_permanent(caught.value)
    assert publisher._waiting == {}  # a late answer finds nothing to wake


async def test_publish_until_stored_waits_out_a_full_stream(nats_client: Client) -> None:
    js = nats_client.jetstream()
    # A full stream that discards new messages answers 503 at once, like an election.
    full = dataclasses.replace(p.server_streams()[1], max_msgs=1, discard=DiscardPolicy.NEW)
    await js.update_stream(full)
    await js.publish("pipelines.filler", b"{}")
    publisher = Publisher(nats_client)
    weather: list[tuple[int, Exception]] = []

    async def purge_later() -> None:
        await asyncio.sleep(0.5)
        await js.purge_stream(p.PIPELINE_STREAM)

    purging = asyncio.create_task(purge_later())
    tries = await publisher.publish_until_stored(
        p.RESULT_SUBJECT,
        b"{}",
        HEADERS,
        backoff=Backoff(first=0.05, cap=0.1),
        on_weather=lambda n, error: weather.append((n, error)),
    )
    await purging
    assert tries is not None and tries > 1 and [n for n, _ in weather] == list(range(1, tries))
    assert all(isinstance(error, ServiceUnavailableError) for _, error in weather)
    assert not is_permanent(weather[0][1])
    assert await stored(nats_client) == 1


async def test_publish_until_stored_hands_nothing_to_a_client_that_is_reconnecting(
    nats_client: Client, nats_server: EmbeddedNats
) -> None:
    """nats-py keeps what is published while it reconnects and sends it afterwards, however
    late: a result that is no longer wanted by then would still be stored. So an acked
    publish is not sent while disconnected (weather), and the try after the link is back
    asks first."""
    publisher = Publisher(nats_client, timeout=0.5)
    await publisher.start()
    await nats_server.stop()
    await wait_until(lambda: nats_client.is_reconnecting, what="the client reconnecting")
    with pytest.raises(ConnectionReconnectingError):
        await publisher.store(p.RESULT_SUBJECT, b"{}", HEADERS)
    with pytest.raises(ConnectionReconnectingError):  # a log line of a batch, the same
        await publisher.batch().send(p.log_subject("run-1"), b"{}")
    weather: list[Exception] = []
    wanted = [True]

    async def still_wanted() -> bool:
        return wanted[0]

    trying = asyncio.create_task(
        publisher.publish_until_stored(
            p.RESULT_SUBJECT,
            b"{}",
            HEADERS,
            backoff=Backoff(first=0.05, cap=0.1),
            on_weather=lambda _n, error: weather.append(error),
            still_wanted=still_wanted,
        )
    )
    await wait_until(lambda: len(weather) >= 2, what="tries while disconnected")
    wanted[0] = False
    await nats_server.start()
    assert await asyncio.wait_for(trying, TIMEOUT) is None
    await wait_until(lambda: nats_client.is_connected, what="the client reconnected")
    await nats_client.flush()
    assert await stored(nats_client) == 0
    assert all(isinstance(error, ConnectionReconnectingError) for error in weather)


async def test_publish_until_stored_raises_a_permanent_refusal_at_once(
    nats_client: Client,
) -> None:
    publisher = Publisher(nats_client)
    weather: list[int] = []
    with pytest.raises(MaxPayloadError):
        await publisher.publish_until_stored(
            p.RESULT_SUBJECT,
            b"x" * (nats_client.max_payload + 1),
            on_weather=lambda n, _error: weather.append(n),
        )
    assert weather == []


async def test_a_confirmation_nobody_answers_but_the_server_is_missing(nats_client: Client) -> None:
    """A JetStream ack sent while its consumer has no leader reaches nobody, and the server
    says so at once (503 no responders): that is no confirmation."""
    publisher = Publisher(nats_client)
    missing: list[str] = []
    await publisher.confirm(
        "$JS.ACK.nobody.listens.1.1.1.0.0", p.ACK, 60.0, lambda: missing.append("no ack")
    )
    await wait_until(lambda: missing, what="the ack reported missing")
    assert missing == ["no ack"]


async def test_a_confirmation_answered_is_not_missing(nats_client: Client) -> None:
    async def applied(msg: Msg) -> None:
        await msg.respond(b"")

    await nats_client.subscribe("acks.applied", cb=applied)
    publisher = Publisher(nats_client)
    missing: list[str] = []
    await publisher.confirm("acks.applied", p.ACK, 0.5, lambda: missing.append("no ack"))
    await asyncio.sleep(1.0)  # past ``within``: a missing answer would have been reported
    assert missing == []


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = list(itertools.islice(Backoff(first=0.1, cap=0.5).delays(), 5))
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]


async def test_a_batch_answers_each_publish_in_order(nats_client: Client) -> None:
    js = nats_client.jetstream()
    config = (await js.stream_info(p.LOGS_STREAM)).config
    await js.update_stream(dataclasses.replace(config, max_msg_size=1024))
    publisher = Publisher(nats_client)
    batch = publisher.batch()
    await batch.send(p.log_subject("run-1"), b"{}")
    await batch.send(p.log_subject("run-1"), b"x" * 2048)
    await batch.send("nowhere.at.all", b"{}")
    with pytest.raises(MaxPayloadError):  # never sent, never answered
        await batch.send(p.log_subject("run-1"), b"x" * (nats_client.max_payload + 1))
    await batch.send(p.log_subject("run-2"), b"{}")
    answers = await batch.wait()
    assert [type(answer) for answer in answers] == [
        type(None),
        BadRequestError,
        NoStreamResponseError,
        type(None),
    ]
    assert publisher._waiting == {}
    assert await stored(nats_client, p.LOGS_STREAM) == 2


async def test_a_batch_left_unanswered_reads_as_timeouts(nats_client: Client) -> None:
    async def silent(msg: Msg) -> None:
        return None

    await nats_client.subscribe("silent.subject", cb=silent)
    publisher = Publisher(nats_client)
    batch = publisher.batch()
    await batch.send(p.log_subject("run-1"), b"{}")
    await batch.send("silent.subject", b"{}")
    answers = await batch.wait(timeout=0.3)
    assert answers[0] is None and isinstance(answers[1], NatsTimeoutError)
    assert publisher._waiting == {}


@pytest.mark.parametrize(
    ("data", "headers", "expected"),
    [
        (b'{"stream":"PIPELINES","seq":7}', None, None),
        (b'{"stream":"PIPELINES","seq":7,"duplicate":true}', None, None),
        (b'{"seq":7,"stream":"PIPELINES"}', None, None),  # another writer's key order
        (b"", {"Status": "503"}, NoStreamResponseError),
        (
            b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"},'
            b'"stream":"PIPELINES","seq":0}',
            None,
            ServiceUnavailableError,
        ),
        (b'{"error":{"code":400,"err_code":10054,"description":"too big"}}', None, BadRequestError),
        (b'{"error":{"code":418,"description":"odd"}}', None, APIError),
        (b"not json", None, APIError),
        (b"", None, APIError),
    ],
)
def test_answers_are_read_one_way(
    data: bytes, headers: dict[str, str] | None, expected: type[Exception] | None
) -> None:
    error = answer_error(data, headers)
    if expected is None:
        assert error is None
    else:
        assert type(error) is expected


def test_what_is_permanent() -> None:
    permanent = answer_error(b'{"error":{"code":418,"description":"odd"}}')
    unreadable = answer_error(b"not json")
    assert permanent is not None and is_permanent(permanent)
    assert unreadable is not None and not is_permanent(unreadable)
    assert not is_permanent(ConnectionError())


async def test_a_direct_handler_that_raises_is_reported_and_reading_goes_on(
    nats_server: EmbeddedNats,
) -> None:
    errors: list[Exception] = []
    seen: list[bytes] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(exc)

    async def queued(msg: Msg) -> None:
        seen.append(b"queued " + msg.data)

    def direct(subject: bytes, reply: bytes, data: bytes) -> None:
        if data == b"bad":
            raise ValueError("a broken handler")
        seen.append(data)

    nc = DriverClient()
    await nc.connect(nats_server.url, error_cb=error_cb)
    try:
        sub = await nc.subscribe("direct.*", cb=queued)
        nc.read_directly(sub._id, direct)
        for data in (b"bad", b"good"):
            await nc.publish("direct.x", data)
        await nc.publish("direct.x", b"with headers", headers={"a": "b"})
        await nc.flush()
        # the one with headers is handed over later, by the subscription's task
        await wait_until(lambda: len(seen) == 2, what="both readable messages handled")
        assert [str(e) for e in errors] == ["a broken handler"]
        assert seen == [b"good", b"queued with headers"]
    finally:
        await nc.close()
