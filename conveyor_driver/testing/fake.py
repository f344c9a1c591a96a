"""FakeContext: a Context whose log lines land in a list instead of NATS."""

from __future__ import annotations

import uuid
import weakref
from pathlib import Path
from typing import Any, NoReturn

import attrs
import structlog
from structlog.testing import LogCapture
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from .. import protocol
from ..api import ConveyorClient
from ..context import Context
from ..models import Resource, resource_from_json
from ..workspace import RunWorkspace
from .fake_api import FakeConveyorClient


class LogRecorder(LogCapture):
    """structlog's :class:`~structlog.testing.LogCapture`, keeping the level under ``level``.

    That is the key the driver's chain writes (``log_level`` is LogCapture's own), so an
    entry reads the same here as on the console: event text, level and bound keys.
    """

    entries: list[dict[str, Any]]  # type: ignore[assignment]  # what a capture holds: dicts

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> NoReturn:
        try:
            super().__call__(logger, method_name, event_dict)
        finally:
            event_dict["level"] = event_dict.pop("log_level")

    def logger(self) -> FilteringBoundLogger:
        """A debug-level logger feeding this recorder and nothing else."""
        logger: FilteringBoundLogger = structlog.wrap_logger(
            None,
            processors=[self],
            wrapper_class=structlog.make_filtering_bound_logger(0),
        )
        return logger


def as_resource(resource: Resource | dict[str, Any]) -> Resource:
    """A Resource from one, or from a dict shaped like the server's JSON."""
    return resource if isinstance(resource, Resource) else resource_from_json(resource)


@attrs.define(frozen=True, init=False)
class FakeContext(Context):
    """A Context for calling a handler directly in a test; ``ctx.logs`` holds its lines.

    ``ctx.api`` is a :class:`FakeConveyorClient` unless another client is given.
    ``ctx.workspace`` is made on first use under ``workspace_root`` (default: the system's
    temporary directory) and removed when the context is garbage-collected, or at exit.
    """

    logs: list[dict[str, Any]] = attrs.field(factory=list, repr=False)

    def __init__(
        self,
        resource: Resource | dict[str, Any],
        event: str = "create",
        run_id: str | None = None,
        attempt: int = 1,
        api: ConveyorClient | None = None,
        driver: str = "test-driver",
        workspace_root: Path | None = None,
    ) -> None:
        res = as_resource(resource)
        run = run_id or str(uuid.uuid4())
        recorder = LogRecorder()
        workspace = RunWorkspace(workspace_root, driver)
        log = recorder.logger().bind(
            driver=driver,
            run_id=run,
            event_name=event,
            resource_type=res.type,
            resource_name=res.name,
        )
        self.__attrs_init__(
            driver=driver,
            event=event,
            run_id=run,
            message_id=str(uuid.uuid4()),
            subject=protocol.resource_subject(res.type or "unknown"),
            attempt=attempt,
            resource=res,
            log=log,
            api=api if api is not None else FakeConveyorClient(),
            logs=recorder.entries,
            run_workspace=workspace,
        )
        weakref.finalize(self, workspace.remove)
