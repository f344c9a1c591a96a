"""FakeContext: a Context whose log lines land in a list instead of NATS."""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

import attrs
import structlog
from structlog.testing import LogCapture
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from .. import protocol, specs
from ..api import ConveyorClient
from ..context import Context, S
from ..logs.redact import Redactor
from ..models import DriverResult, Resource, resource_from_json, with_driver_result
from ..outcomes import Result
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

    def logger(self, redactor: Redactor | None = None) -> FilteringBoundLogger:
        """A debug-level logger feeding this recorder (through ``redactor``, if given)."""
        logger: FilteringBoundLogger = structlog.wrap_logger(
            None,
            processors=[redactor, self] if redactor is not None else [self],
            wrapper_class=structlog.make_filtering_bound_logger(0),
        )
        return logger


def as_resource(resource: Resource | dict[str, Any]) -> Resource:
    """A Resource from one, or from a dict shaped like the server's JSON.

    Its spec may be a spec object (``BuildSpec(repo=...)``): it becomes the JSON the
    server would send, so that it is checked on its way in like any other.
    """
    res = resource if isinstance(resource, Resource) else resource_from_json(resource)
    if specs.is_spec_class(type(res.spec)):
        res = attrs.evolve(res, spec=specs.unstructure(res.spec))
    return res


@attrs.define(frozen=True, init=False)
class FakeContext(Context[S]):
    """A Context for calling a handler directly in a test; ``ctx.logs`` holds its lines.

    ``ctx.api`` is a :class:`FakeConveyorClient` unless another client is given. The lines
    are masked as the driver's are: ``secrets`` and what ``ctx.secret`` registers.
    ``ctx.workspace`` is made on first use under ``workspace_root`` (default: the system's
    temporary directory) and removed when the context is garbage-collected, or at exit.

    ``upstream`` maps earlier steps' drivers to their results (a ``Result``, or a dict
    with ``success``, ``message`` and ``data``): they are stored on the resource as the
    pipeline engine stores them, so ``ctx.upstream`` reads them as it would in production.

    ``spec`` is the handler's ``spec=`` class: the resource's spec (JSON, or a spec object)
    is structured into it as the runtime does, raising
    :class:`~conveyor_driver.specs.InvalidSpec` with the same errors the runtime reports.
    A spec object in the resource without ``spec=`` is taken as its own class.
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
        upstream: UpstreamResults | None = None,
        spec: type[S] | None = None,
        secrets: Sequence[str] = (),
        workspace_root: Path | None = None,
    ) -> None:
        given = resource.spec if isinstance(resource, Resource) else resource.get("spec")
        if spec is None and specs.is_spec_class(type(given)):
            spec = cast("type[S]", type(given))
        res = with_upstream(as_resource(resource), upstream)
        typed = specs.structure(res.spec, spec) if spec is not None else res.spec
        run = run_id or str(uuid.uuid4())
        recorder = LogRecorder()
        redactor = Redactor(secrets)
        workspace = RunWorkspace(workspace_root, driver)
        log = recorder.logger(redactor).bind(
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
            spec=typed,
            redactor=redactor,
            run_workspace=workspace,
        )
        weakref.finalize(self, workspace.remove)


#: Earlier steps' results for a test: a ``Result``, or a dict with ``success``, ``message``
#: and ``data``, by driver.
UpstreamResults = Mapping[str, Result | Mapping[str, Any]]


def with_upstream(resource: Resource, upstream: UpstreamResults | None) -> Resource:
    """``resource`` with earlier steps' results stored on it, as the pipeline engine does."""
    for name, result in (upstream or {}).items():
        resource = with_driver_result(resource, _driver_result(name, result))
    return resource


def _driver_result(driver: str, result: Result | Mapping[str, Any]) -> DriverResult:
    if isinstance(result, Result):
        return DriverResult(result.success, result.message, result.data, driver)
    unknown = set(result) - {"success", "message", "data"}
    if unknown or not isinstance(result.get("success"), bool):
        raise TypeError(
            f"upstream[{driver!r}] must be a Result or a dict with a boolean 'success' and "
            f"optional 'message' and 'data', not {dict(result)!r}"
        )
    return DriverResult(result["success"], result.get("message", ""), result.get("data"), driver)
