"""Results handed between pipeline steps: ``ctx.upstream("git-clone")``.

Conveyor has no channel from one step to the next other than the resource itself: the
pipeline engine stores each driver's result on it, as the JSON string
``metadata["driverresults.<driver>"]``, and forwards the updated resource to the next step
(``docs/protocol.md#results-handed-between-steps``). This module reads that result back,
from the payload when the engine put it there, and from the API server's copy of the
resource when it did not (an event emitted by hand, a step run again, a broadcast).

Why a missing or unreadable upstream result is a :class:`~conveyor_driver.Fail`: no retry
makes an earlier step's result appear; the pipeline is wired wrongly, or the step never
ran. Reporting it at once, in one line, beats three attempts and a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import attrs
from cattrs import transform_error
from cattrs.errors import BaseValidationError

from . import protocol
from .errors import ConveyorDriverError
from .models import DecodeError, Resource, converter, decode_stored_result
from .outcomes import Fail

if TYPE_CHECKING:
    from .api import ConveyorClient

DataT = TypeVar("DataT")


@attrs.frozen
class Upstream(Generic[DataT]):
    """The stored result of an earlier step: what its handler returned, and whose it was.

    ``data`` is the JSON the step reported, or an instance of the class asked for with
    ``data=``.
    """

    driver: str
    success: bool
    message: str
    data: DataT


class UpstreamError(ConveyorDriverError, Fail):
    """An earlier step's result that cannot be used: malformed, failed, or not of the
    class asked for.

    Uncaught, it fails the run at once (it is a :class:`~conveyor_driver.Fail`).
    """


class NotFound(UpstreamError):
    """No result of the named driver is stored on this resource.

    The payload has none and neither has the API server's copy: the driver is not an
    earlier step of the resource's pipeline, or it has not reported yet.
    """


@overload
async def read_upstream(
    resource: Resource, driver: str, api: ConveyorClient, data: None = None
) -> Upstream[Any]: ...


@overload
async def read_upstream(
    resource: Resource, driver: str, api: ConveyorClient, data: type[DataT]
) -> Upstream[DataT]: ...


async def read_upstream(
    resource: Resource, driver: str, api: ConveyorClient, data: type[Any] | None = None
) -> Upstream[Any]:
    """The last result ``driver`` reported for ``resource``, its data structured as ``data``.

    ``data`` describes what the step reports when it succeeds; a failed result asked for
    with it raises :class:`UpstreamError` with the step's message (without ``data``, a
    failed result is returned, for a handler to look at).

    The API server is asked only when the payload lacks the result. Its copy holds the
    latest result of that driver for the resource, which may belong to an earlier run: the
    server keeps one per driver, with no run id.
    """
    key = protocol.driver_result_key(driver)
    where = f"{resource.type}/{resource.name}"
    stored = resource.metadata.get(key)
    if stored is None:
        stored = await _from_api(resource, driver, key, api)
    try:
        result = decode_stored_result(stored, driver)
    except DecodeError as exc:
        raise UpstreamError(
            f"the result of {driver!r} stored on {where} is unusable: {exc}"
        ) from exc
    if data is not None and not result.success:
        raise UpstreamError(f"{driver!r} failed for {where}: {result.message or 'no message'}")
    value = result.data if data is None else _structure(result.data, data, driver, where)
    return Upstream(
        driver=result.driver, success=result.success, message=result.message, data=value
    )


async def _from_api(resource: Resource, driver: str, key: str, api: ConveyorClient) -> str:
    # Imported here: the API client's module loads aiohttp, which `import conveyor_driver`
    # (defining a driver, testing its handlers) does not need.
    from .api.errors import NotFoundError

    where = f"{resource.type}/{resource.name}"
    try:
        current = await api.get_resource(resource.type, resource.name)
    except NotFoundError as exc:
        raise NotFound(
            f"no result of {driver!r} for {where}: the payload has none, and the API "
            f"server has no such resource ({exc.error})"
        ) from exc
    stored = current.metadata.get(key)
    if stored is None:
        pipeline = f" of pipeline {resource.pipeline!r}" if resource.pipeline else ""
        raise NotFound(
            f"no result of {driver!r} for {where}: metadata[{key!r}] is neither in the "
            f"payload nor on the API server's resource (is {driver!r} an earlier "
            f"step{pipeline}, and has it reported?)"
        )
    return stored


def _structure(value: Any, cls: type[DataT], driver: str, where: str) -> DataT:
    try:
        return converter.structure(value, cls)
    except BaseValidationError as exc:
        reason = "; ".join(transform_error(exc, path="data"))
    except (TypeError, ValueError, AttributeError) as exc:
        reason = str(exc) or type(exc).__name__
    name = cls.__name__ if isinstance(cls, type) else repr(cls)
    raise UpstreamError(f"the result of {driver!r} on {where} does not fit {name}: {reason}")
