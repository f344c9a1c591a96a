"""Shared helpers of the runtime integration tests (real nats-server, no mocks).

Waiting is always on a condition (``wait_until``), never a blind sleep, because the
machine is shared and slow: a generous deadline only matters when the test is failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from apps.harness import Completed
from click.testing import CliRunner, Result
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo

from conveyor_driver import protocol

#: Generous on purpose: a 2-core machine shared with other test runs.
TIMEOUT = 30.0


def resource_json(
    name: str = "app",
    resource_type: str = "pipeline",
    *,
    pipeline: str | None = None,
    spec: Any = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Resource as the Go server encodes it (``pipeline`` omitted when empty)."""
    body: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "name": name,
        "resource": resource_type,
        "metadata": metadata if metadata is not None else {"version": "1"},
        "spec": spec if spec is not None else {"repo": "https://example.com/app.git"},
    }
    if pipeline:
        body["pipeline"] = pipeline
    return body


def driver_message(
    resource: dict[str, Any],
    *,
    event: str = "create",
    run_id: str | None = None,
    payload_as_string: bool = True,
) -> tuple[str, bytes]:
    """(run id, body) of a DriverMessage, payload as the Go server sends it or as an object."""
    run_id = run_id or str(uuid.uuid4())
    payload: Any = json.dumps(resource) if payload_as_string else resource
    body = {"event": event, "payload": payload, "id": str(uuid.uuid4()), "run_id": run_id}
    return run_id, json.dumps(body).encode()


async def publish(nc: Client, subject: str, body: bytes) -> int:
    """Publish to JetStream as the server does; the stream sequence the message got."""
    ack = await nc.jetstream().publish(subject, body)
    return int(ack.seq)


async def send(
    nc: Client,
    resource: dict[str, Any],
    *,
    subject: str | None = None,
    event: str = "create",
    payload_as_string: bool = True,
) -> str:
    """Publish one DriverMessage for ``resource`` (to ``resources.<type>`` by default)."""
    run_id, body = driver_message(resource, event=event, payload_as_string=payload_as_string)
    await publish(nc, subject or protocol.resource_subject(resource["resource"]), body)
    return run_id


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = TIMEOUT,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` (sync or async) until it is truthy; TimeoutError naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


async def consumer_info(nc: Client, driver: str) -> ConsumerInfo:
    info: ConsumerInfo = await nc.jetstream().consumer_info(protocol.MESSAGES_STREAM, driver)
    return info


async def stream_messages(nc: Client, stream: str) -> int:
    info = await nc.jetstream().stream_info(stream)
    return int(info.state.messages)


async def settled(nc: Client, driver: str) -> bool:
    """Nothing left for the consumer: every delivered message acked (or terminated)."""
    info = await consumer_info(nc, driver)
    return info.num_ack_pending == 0 and info.num_pending == 0


class RawResults:
    """Result events as raw JSON, seen on a core subscription beside the server's consumer."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def for_run(self, run_id: str) -> list[dict[str, Any]]:
        return [body for body in self.bodies if body.get("run_id") == run_id]

    async def wait(self, run_id: str, *, count: int = 1, timeout: float = TIMEOUT) -> None:
        await wait_until(
            lambda: len(self.for_run(run_id)) >= count,
            timeout=timeout,
            what=f"{count} result(s) of run {run_id}",
        )


@contextlib.asynccontextmanager
async def raw_results(nc: Client) -> AsyncIterator[RawResults]:
    results = RawResults()

    async def on_result(msg: Msg) -> None:
        results.bodies.append(json.loads(msg.data))

    sub = await nc.subscribe(protocol.RESULT_SUBJECT, cb=on_result)
    try:
        yield results
    finally:
        await sub.unsubscribe()


@contextlib.asynccontextmanager
async def advisories(nc: Client, kind: str, driver: str) -> AsyncIterator[list[int]]:
    """Stream sequences of the messages the driver settled as ``kind`` (``TERMINATED``,
    ``NAKED``), from JetStream's own advisories.

    An ack, a term and a nak look alike in consumer_info; the advisories tell them apart.
    """
    sequences: list[int] = []

    async def on_advisory(msg: Msg) -> None:
        sequences.append(int(json.loads(msg.data)["stream_seq"]))

    subject = f"$JS.EVENT.ADVISORY.CONSUMER.MSG_{kind}.{protocol.MESSAGES_STREAM}.{driver}"
    sub = await nc.subscribe(subject, cb=on_advisory)
    await nc.flush()
    try:
        yield sequences
    finally:
        await sub.unsubscribe()


def terminations(nc: Client, driver: str) -> contextlib.AbstractAsyncContextManager[list[int]]:
    return advisories(nc, "TERMINATED", driver)


def invoke(*args: str, env: Mapping[str, str] | None = None) -> Result:
    """``conveyor-driver ARGS`` in-process (click's CliRunner), with only ``env``'s
    CONVEYOR_* variables: the way to test the CLI where a child process is not the point.
    From an async test, run it with ``asyncio.to_thread`` (the command runs its own loop)."""
    from conveyor_driver.cli import main

    cleared: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CONVEYOR_")}
    return CliRunner().invoke(main, list(args), env={**cleared, **(env or {})})


async def run_in_process(*args: str, env: Mapping[str, str] | None = None) -> Completed:
    """:func:`invoke` from an async test, answered as ``apps.harness.run_cli`` answers (exit
    status, stdout, stderr), so a test reads the same either way.

    It runs in a thread, since the command runs an event loop of its own. An exception
    other than SystemExit is raised here, where a child process would print a traceback.
    """
    result = await asyncio.to_thread(invoke, *args, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Completed(result.exit_code, result.stdout, result.stderr)


def one_error_line(result: Result) -> str:
    """The text of the single ``Error:`` line of a refused command: no traceback, status 1."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0].removeprefix("Error: ")


class NatsLogs:
    """Log entries published on ``logs.>`` (a core subscription beside the server's consumer)."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    async def on_message(self, msg: Msg) -> None:
        self.entries.append(json.loads(msg.data))

    def messages(self, run_id: str) -> list[str]:
        return [e["message"] for e in self.entries if e["runid"] == run_id]
