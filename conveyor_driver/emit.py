"""Publish events the way the Conveyor server does, and watch the results drivers report.

For ``conveyor-driver emit``, the demo, the benchmarks and tests: a driver can be exercised
end to end without a Conveyor server, on the same subjects and with the same JSON.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from nats.aio.client import Client

from . import protocol
from .models import (
    DecodeError,
    DriverMessage,
    PipelineEvent,
    Resource,
    decode_pipeline_event,
    encode_driver_message,
)


async def emit_event(
    nc: Client,
    resource: Resource,
    *,
    event: str = "create",
    driver: str | None = None,
    run_id: str | None = None,
) -> DriverMessage:
    """Publish a DriverMessage and await the stream's acknowledgement.

    Without ``driver`` it goes to ``resources.<type>`` (a resource created outside a
    pipeline); with it, to ``drivers.<driver>.resources.<type>`` (a pipeline step).
    """
    message = DriverMessage(
        event=event,
        payload=resource,
        run_id=run_id or str(uuid.uuid4()),
        id=str(uuid.uuid4()),
    )
    subject = (
        protocol.driver_resource_subject(driver, resource.type)
        if driver
        else protocol.resource_subject(resource.type)
    )
    await nc.jetstream().publish(subject, encode_driver_message(message))
    return message


class ResultWatch:
    """Result events seen on a core subscription, looked up by run id."""

    def __init__(self) -> None:
        self._seen: dict[str, list[PipelineEvent]] = {}
        self._changed = asyncio.Condition()

    async def add(self, event: PipelineEvent) -> None:
        async with self._changed:
            self._seen.setdefault(event.run_id, []).append(event)
            self._changed.notify_all()

    def results(self, run_id: str) -> list[PipelineEvent]:
        return list(self._seen.get(run_id, []))

    @property
    def count(self) -> int:
        return sum(len(events) for events in self._seen.values())

    async def wait(self, run_id: str, timeout: float) -> PipelineEvent:
        """The first result of ``run_id``; TimeoutError when none comes in time."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: run_id in self._seen), timeout)
            return self._seen[run_id][0]


@asynccontextmanager
async def watch_results(nc: Client) -> AsyncIterator[ResultWatch]:
    """Listen on the result subject with a core subscription.

    The result stream is a work queue the server consumes; a second JetStream consumer
    on it would take results away from the server, so listening happens beside it.
    """
    watch = ResultWatch()

    async def on_result(msg: object) -> None:
        try:
            await watch.add(decode_pipeline_event(msg.data))  # type: ignore[attr-defined]
        except DecodeError:
            return

    sub = await nc.subscribe(protocol.RESULT_SUBJECT, cb=on_result)
    try:
        yield watch
    finally:
        await sub.unsubscribe()
