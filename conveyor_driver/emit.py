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
from nats.js.errors import NoStreamResponseError, NotFoundError

from . import protocol
from .errors import ConfigurationError, StreamMissingError
from .models import (
    DecodeError,
    DriverMessage,
    PipelineEvent,
    Resource,
    decode_pipeline_event,
    encode_driver_message,
    with_driver_result,
)


def check_event(
    resource_type: str,
    name: str,
    *,
    event: str = "create",
    driver: str | None = None,
    pipeline: str = "",
) -> None:
    """Refuse, with one line, an event the Conveyor server would never send.

    The rules are the server's (open-ug/conveyor): ``POST /resources/`` refuses an empty
    resource type, and publishes on ``resources.<type>``, or the pipeline engine on
    ``drivers.<driver>.resources.<type>``, so both are single subject tokens; a resource is
    stored as ``/resources/<type>/<name>`` and addressed as ``/resources/{type}/{name}``,
    whose handlers refuse an empty name, so a name is non-empty and has no ``/`` (nor has
    a pipeline name, addressed as ``/pipelines/{name}``). Anything else would publish an
    event no driver is written for, or on a subject nobody consumes.
    """
    token = "non-empty, without whitespace, '.', '*' or '>' (it is a NATS subject token)"
    if not protocol.is_subject_token(resource_type):
        raise ConfigurationError(
            f"resource type {resource_type!r} is not usable: it must be {token}"
        )
    if driver is not None and not protocol.is_subject_token(driver):
        raise ConfigurationError(f"driver {driver!r} is not usable: it must be {token}")
    if not name or "/" in name:
        raise ConfigurationError(
            f"resource name {name!r} is not usable: the Conveyor server needs a non-empty "
            "name without '/' (it addresses resources as /resources/TYPE/NAME)"
        )
    if "/" in pipeline:
        raise ConfigurationError(f"pipeline {pipeline!r} is not usable: a pipeline name has no '/'")
    if not event.strip():
        raise ConfigurationError("event must not be empty (the server sends create or process)")


def subject_of(resource_type: str, driver: str | None = None) -> str:
    """The subject an event for ``resource_type`` goes to, addressed to ``driver`` or not."""
    if driver:
        return protocol.driver_resource_subject(driver, resource_type)
    return protocol.resource_subject(resource_type)


def _stream_missing(subject: str) -> StreamMissingError:
    return StreamMissingError(
        f"stream {protocol.MESSAGES_STREAM!r} does not exist on this NATS server, so nothing "
        f"stores {subject}: start the Conveyor server first, or a driver with --embedded"
    )


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a NATS filter ``pattern`` (``*`` one token, ``>`` the rest) takes ``subject``."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(wanted) == len(tokens)


async def consumers_of(nc: Client, subject: str) -> list[str]:
    """Names of the consumers of the ``messages`` stream whose filters take ``subject``.

    The stream keeps a message only while some consumer is interested in it, so an empty
    list means an event published there is dropped at once and no result can ever come.
    """
    try:
        infos = await nc.jetstream().consumers_info(protocol.MESSAGES_STREAM)
    except NotFoundError:
        raise _stream_missing(subject) from None
    names = []
    for info in infos:
        config = info.config
        filters = config.filter_subjects or (
            [config.filter_subject] if config.filter_subject else []
        )
        if not filters or any(subject_matches(f, subject) for f in filters):
            names.append(str(info.name))
    return sorted(names)


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
    pipeline); with it, to ``drivers.<driver>.resources.<type>`` (a pipeline step). What
    :func:`check_event` refuses is refused here too, before anything is sent.
    """
    check_event(
        resource.type, resource.name, event=event, driver=driver, pipeline=resource.pipeline
    )
    message = DriverMessage(
        event=event,
        payload=resource,
        run_id=run_id or str(uuid.uuid4()),
        id=str(uuid.uuid4()),
    )
    subject = subject_of(resource.type, driver)
    try:
        await nc.jetstream().publish(subject, encode_driver_message(message))
    except NoStreamResponseError:
        # No stream takes the subject: nats-py's "no response from stream" means the
        # Conveyor streams were never created on this server.
        raise _stream_missing(subject) from None
    return message


async def emit_next_step(nc: Client, result: PipelineEvent, driver: str) -> DriverMessage:
    """Hand a step's result on to the next step, as the server's pipeline engine does.

    The engine stores the result on the resource (``metadata["driverresults.<driver>"]``)
    and publishes the updated resource as a ``process`` event of the same run to the next
    step's driver. It does so only after a success: so should a caller playing its role.
    """
    return await emit_event(
        nc,
        with_driver_result(result.resource, result.driverresult),
        event=protocol.PROCESS_EVENT,
        driver=driver,
        run_id=result.run_id,
    )


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

    async def wait(
        self, run_id: str, timeout: float, *, driver: str | None = None
    ) -> PipelineEvent:
        """The first result of ``run_id`` (reported by ``driver``, when given: every step of
        a pipeline reports under the same run id); TimeoutError when none comes in time.
        """

        def matching() -> list[PipelineEvent]:
            events = self._seen.get(run_id, [])
            return [e for e in events if driver is None or e.driverresult.driver == driver]

        async with self._changed:
            return (await asyncio.wait_for(self._changed.wait_for(matching), timeout))[0]


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
