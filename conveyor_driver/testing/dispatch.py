"""dispatch(): the runtime's decision for one event, computed without NATS."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import attrs

from .. import protocol
from ..api import ConveyorClient
from ..app import Driver
from ..logs.redact import Redactor
from ..models import DriverMessage, Resource, encode_driver_message
from ..outcomes import Action, Kind, Result
from ..runtime.dispatcher import Delivery, Services, process
from ..telemetry import Telemetry
from .fake import LogRecorder, UpstreamResults, as_resource, with_upstream
from .fake_api import FakeConveyorClient


@attrs.frozen
class DispatchReport:
    """What the runtime would do: publish ``result`` (if any), then ``action``.

    ``action`` is ``"ack"``, ``"nak"`` (redelivered after ``delay`` seconds) or ``"term"``;
    ``kind`` says why: ``success``, ``failure``, ``retry``, ``gave_up``, ``undecodable``,
    ``unrouted`` (a step addressed to this driver that no handler takes: a failure result)
    or ``skipped`` (a broadcast event no handler takes: acked quietly). Both are the
    runtime's own enums, :class:`~conveyor_driver.outcomes.Action` and
    :class:`~conveyor_driver.outcomes.Kind`, which compare equal to those strings.
    """

    result: Result | None
    action: Action = attrs.field(converter=Action)
    delay: float | None
    kind: Kind = attrs.field(converter=Kind)
    logs: list[dict[str, Any]]


async def dispatch(
    driver: Driver,
    resource: Resource | dict[str, Any],
    event: str = "create",
    attempt: int = 1,
    *,
    run_id: str | None = None,
    api: ConveyorClient | None = None,
    addressed: bool | None = None,
    upstream: UpstreamResults | None = None,
    workspace_root: Path | None = None,
    keep_failed_workspaces: bool = False,
) -> DispatchReport:
    """Encode the event as the server would and run it through the real dispatcher.

    ``attempt`` is the handler's attempt (the last one, ``max_attempts``, gives up on an
    error). ``addressed`` says whether the event comes as a pipeline step addressed to this
    driver (``drivers.<driver>.resources.<type>``) or as a broadcast (``resources.<type>``);
    by default a ``process`` event is a step and any other event a broadcast, as the
    server sends them. ``upstream`` stores earlier steps' results on the resource, as
    :class:`FakeContext` does. ``workspace_root`` and ``keep_failed_workspaces`` are the
    ``--workspace-root`` and ``--keep-failed-workspaces`` settings.
    """
    res = with_upstream(as_resource(resource), upstream)
    message = DriverMessage(
        event=event, payload=res, run_id=run_id or str(uuid.uuid4()), id=str(uuid.uuid4())
    )
    recorder = LogRecorder()
    redactor = Redactor(driver.secrets)
    services = Services(
        log=recorder.logger(redactor).bind(driver=driver.name),
        api=api if api is not None else FakeConveyorClient(),
        telemetry=Telemetry(),
        redactor=redactor,
        workspace_root=workspace_root,
        keep_failed_workspaces=keep_failed_workspaces,
    )
    delivery = Delivery(
        data=encode_driver_message(message),
        subject=(
            protocol.driver_resource_subject(driver.name, res.type or "unknown")
            if (event == "process" if addressed is None else addressed)
            else protocol.resource_subject(res.type or "unknown")
        ),
        attempt=attempt,
    )
    processed = await process(driver, delivery, services)
    outcome = processed.outcome
    return DispatchReport(
        result=outcome.result,
        action=outcome.action,
        delay=outcome.delay,
        kind=outcome.kind,
        logs=recorder.entries,
    )
