"""The benchmarks' events and server chores: what every dispatch run loads and clears.

Shared by ``bench_dispatch.py``, its contenders (``_contender.py``) and ``_in_process.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from conveyor_driver import protocol
from conveyor_driver.models import DriverMessage, Resource, encode_driver_message

RESOURCE_TYPE = "pipeline"
ACK_WAIT = 30.0


def make_events(n: int) -> list[bytes]:
    """Encoded DriverMessages shaped like the server's, distinct run ids."""
    bodies = []
    for i in range(n):
        resource = Resource(
            name=f"app-{i}",
            type=RESOURCE_TYPE,
            id=str(uuid.uuid4()),
            metadata={"version": "1"},
            spec={"repo": "https://example.com/app.git", "command": "make build"},
        )
        message = DriverMessage(
            event="create", payload=resource, run_id=str(uuid.uuid4()), id=str(uuid.uuid4())
        )
        bodies.append(encode_driver_message(message))
    return bodies


async def create_consumer(js: JetStreamContext, name: str) -> None:
    config = protocol.consumer_config(name, [RESOURCE_TYPE], ACK_WAIT)
    await js.add_consumer(protocol.MESSAGES_STREAM, config)


async def preload(js: JetStreamContext, bodies: list[bytes]) -> None:
    """Publish every event before consuming starts, so publish speed is not measured.

    The consumer must already exist: ``messages`` has interest retention and would drop
    events nobody is interested in.
    """
    subject = protocol.resource_subject(RESOURCE_TYPE)
    futures = [await js.publish_async(subject, body) for body in bodies]
    await asyncio.gather(*futures)


async def consumer_state(nc: Client, name: str) -> dict[str, object]:
    # A raw request: nats-py's consumer_info builds dataclasses and parses dates, and the
    # collector asks every few milliseconds.
    reply = await nc.request(
        f"$JS.API.CONSUMER.INFO.{protocol.MESSAGES_STREAM}.{name}", b"", timeout=5
    )
    state: dict[str, object] = orjson.loads(reply.data)
    if "error" in state:
        raise RuntimeError(f"consumer info for {name}: {state['error']}")
    return state


async def reset(js: JetStreamContext, name: str, n: int) -> None:
    """Leave the server as the next run expects it: no consumer, empty streams, no ledger.

    The result count doubles as a check that each event produced exactly one result.
    """
    results = (await js.stream_info(protocol.PIPELINE_STREAM)).state.messages
    await js.delete_consumer(protocol.MESSAGES_STREAM, name)
    for stream in (protocol.MESSAGES_STREAM, protocol.PIPELINE_STREAM, protocol.LOGS_STREAM):
        await js.purge_stream(stream)
    with contextlib.suppress(NotFoundError):  # a bucket per driver name adds up
        await js.delete_stream(f"KV_{protocol.ledger_bucket(name)}")
    if results != n:
        raise RuntimeError(f"{name}: {results} result events for {n} events")
