"""The object every handler receives: the event, the resource, a logger and the API."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from structlog.typing import FilteringBoundLogger

from .models import Resource

if TYPE_CHECKING:
    from .api import ConveyorClient


@attrs.define(frozen=True)
class Context:
    """Everything a handler needs about one delivery, handed in rather than imported.

    Handlers take their logger and API client from here, never from globals, so a test
    can hand them a :class:`~conveyor_driver.testing.FakeContext` instead.
    """

    driver: str
    event: str
    run_id: str
    message_id: str
    subject: str
    attempt: int
    resource: Resource
    log: FilteringBoundLogger = attrs.field(repr=False)
    api: ConveyorClient = attrs.field(repr=False)
