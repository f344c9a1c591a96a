"""The JSON shapes Conveyor sends and expects, and the one converter that maps them.

The server is written in Go; these classes mirror ``pkg/types`` of open-ug/conveyor. Field
names follow Python (``Resource.type``) and the converter renames them on the wire
(``"resource"``), so no other module needs to know a JSON key.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
from cattrs import ClassValidationError
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.orjson import make_converter

from . import protocol


@attrs.frozen
class Resource:
    """A Conveyor resource: what a handler reconciles.

    ``spec`` is whatever JSON the resource definition's schema allows, so it stays ``Any``.
    """

    name: str = ""
    type: str = ""
    id: str = ""
    pipeline: str = ""
    metadata: dict[str, str] = attrs.field(factory=dict)
    spec: Any = None


@attrs.frozen
class DriverMessage:
    """The body of every event a driver consumes (``types.DriverMessage``)."""

    event: str
    payload: Resource
    run_id: str
    id: str = ""


@attrs.frozen
class DriverResult:
    success: bool
    message: str
    data: Any
    driver: str


@attrs.frozen
class PipelineEvent:
    """What a driver publishes on the result subject when a handler has finished."""

    run_id: str
    resource: Resource
    driverresult: DriverResult
    event: str = protocol.RESULT_EVENT


@attrs.frozen
class LogEntry:
    """One log line of a run as the server stores it (``types.Log``): note ``runid``."""

    runid: str
    driver: str
    pipeline: str
    timestamp: str
    message: str


class DecodeError(ValueError):
    """A message body that is not a DriverMessage the server could have sent."""


converter = make_converter()
converter.register_structure_hook(
    Resource,
    make_dict_structure_fn(Resource, converter, type=override(rename="resource")),
)
converter.register_unstructure_hook(
    Resource,
    make_dict_unstructure_fn(
        Resource,
        converter,
        type=override(rename="resource"),
        pipeline=override(omit_if_default=True),
    ),
)


def _structure_resource(value: Any) -> Resource:
    if isinstance(value, str | bytes):
        value = orjson.loads(value)
    if not isinstance(value, dict):
        raise DecodeError(f"payload is a JSON {type(value).__name__}, not a resource object")
    if value.get("metadata", {}) is None:  # Go encodes a nil map as null
        value = {key: item for key, item in value.items() if key != "metadata"}
    return converter.structure(value, Resource)


def resource_to_json(resource: Resource) -> dict[str, Any]:
    """The server's JSON shape of a Resource (``pipeline`` left out when empty, as Go does)."""
    body: dict[str, Any] = {
        "id": resource.id,
        "name": resource.name,
        "resource": resource.type,
        "metadata": resource.metadata,
        "spec": resource.spec,
    }
    if resource.pipeline:
        body["pipeline"] = resource.pipeline
    return body


def encode_result(
    run_id: str,
    resource: Resource,
    success: bool,
    message: str,
    data: Any,
    driver: str,
    *,
    event: str = protocol.RESULT_EVENT,
) -> bytes:
    """The PipelineEvent of a finished run as JSON, from its parts.

    Every message's path encodes one, so it is built straight from the parts rather than
    through a PipelineEvent and the converter.
    """
    return orjson.dumps(
        {
            "event": event,
            "run_id": run_id,
            "resource": resource_to_json(resource),
            "driverresult": {
                "success": success,
                "message": message,
                "data": data,
                "driver": driver,
            },
        }
    )


def resource_from_json(value: Any) -> Resource:
    """A Resource from the server's JSON: an object, or an object encoded into a string."""
    try:
        return _structure_resource(value)
    except DecodeError:
        raise
    except (orjson.JSONDecodeError, ClassValidationError, TypeError, ValueError) as exc:
        raise DecodeError(f"payload is not a resource: {_reason(exc)}") from exc


def decode_driver_message(data: bytes, subject: str) -> DriverMessage:
    """Decode and check a message body; raise DecodeError with a one-line reason.

    The Go server sends ``payload`` as a JSON *string* holding the Resource, while the
    design document shows an object: both are accepted. A resource without a type takes it
    from the subject, which names it.
    """
    body = _json_object(data, "body is ", "an object")
    event = body.get("event")
    if not isinstance(event, str) or not event:
        raise DecodeError("'event' is missing or not a string")
    run_id = body.get("run_id")
    if not isinstance(run_id, str) or not protocol.is_subject_token(run_id):
        raise DecodeError("'run_id' is missing or not a usable id")
    if body.get("payload") is None:
        raise DecodeError("'payload' is missing")
    resource = resource_from_json(body["payload"])
    if not resource.type:
        resource = attrs.evolve(resource, type=protocol.resource_type_from_subject(subject) or "")
    message_id = body.get("id")
    return DriverMessage(
        event=event,
        payload=resource,
        run_id=run_id,
        id=message_id if isinstance(message_id, str) else "",
    )


def encode_driver_message(message: DriverMessage, *, payload_as_string: bool = True) -> bytes:
    """Encode a DriverMessage the way the Go server does (payload as a JSON string)."""
    resource = converter.unstructure(message.payload)
    payload: Any = orjson.dumps(resource).decode() if payload_as_string else resource
    return orjson.dumps(
        {"event": message.event, "payload": payload, "id": message.id, "run_id": message.run_id}
    )


def encode_log_entry(entry: LogEntry) -> bytes:
    """A LogEntry as JSON: the hot path of log shipping, so no generic unstructuring."""
    return orjson.dumps(
        {
            "runid": entry.runid,
            "driver": entry.driver,
            "pipeline": entry.pipeline,
            "timestamp": entry.timestamp,
            "message": entry.message,
        }
    )


def decode_pipeline_event(data: bytes) -> PipelineEvent:
    """Read a result event back (for ``emit --wait`` and tests)."""
    try:
        return converter.structure(orjson.loads(data), PipelineEvent)
    except (orjson.JSONDecodeError, ClassValidationError, TypeError, ValueError) as exc:
        raise DecodeError(f"not a result event: {_reason(exc)}") from exc


def encode_stored_result(result: DriverResult) -> str:
    """A result as the server stores it in ``metadata["driverresults.<driver>"]``.

    The engine marshals the whole ``driverresult`` it received into one JSON string
    (``SaveDriverResult``), since metadata values are strings.
    """
    return orjson.dumps(
        {
            "success": result.success,
            "message": result.message,
            "data": result.data,
            "driver": result.driver,
        }
    ).decode()


def decode_stored_result(text: str, driver: str) -> DriverResult:
    """Read back a result stored by the server; DecodeError with a one-line reason.

    ``driver`` fills in the name when the stored object lacks it (the ``DriverResult`` of
    ``pkg/types`` has no such field), so a result always says whose it is.
    """
    body = _json_object(text, "", "a result object")
    success, message = body.get("success"), body.get("message", "")
    if not isinstance(success, bool):
        raise DecodeError("'success' is missing or not a boolean")
    if not isinstance(message, str):
        raise DecodeError("'message' is not a string")
    name = body.get("driver")
    return DriverResult(
        success=success,
        message=message,
        data=body.get("data"),
        driver=name if isinstance(name, str) and name else driver,
    )


def with_driver_result(resource: Resource, result: DriverResult) -> Resource:
    """The resource as the engine forwards it once it has stored ``result`` on it."""
    key = protocol.driver_result_key(result.driver)
    return attrs.evolve(resource, metadata={**resource.metadata, key: encode_stored_result(result)})


def json_problem(value: Any, path: str = "data") -> str | None:
    """Why ``value`` cannot travel as JSON, naming the first bad value's path; None if it can.

    A result's ``data`` is often a deep structure built by the handler: "object of type set
    is not JSON" alone leaves its author searching, ``data["images"][2]: ...`` does not.
    The common case (it serialises) costs one ``orjson.dumps``.
    """
    try:
        orjson.dumps(value)
    except TypeError as exc:
        return _first_problem(value, path) or f"{path}: {exc}"
    return None


def _first_problem(value: Any, path: str) -> str | None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path}: key {key!r} of type {type(key).__name__} is not a string"
            found = _first_problem(item, f"{path}[{orjson.dumps(key).decode()}]")
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _first_problem(item, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    try:
        orjson.dumps(value)
    except TypeError as exc:
        if "not JSON serializable" in str(exc):
            return f"{path}: object of type {type(value).__name__} is not JSON"
        return f"{path}: {str(exc)[:1].lower()}{str(exc)[1:]}"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ClassValidationError):
        from cattrs import transform_error

        return "; ".join(transform_error(exc))
    return str(exc) or type(exc).__name__


def _json_object(data: bytes | str, subject: str, wanted: str) -> dict[str, Any]:
    """``data`` as a JSON object, or DecodeError: "<subject>not JSON" / "<subject>a JSON list"."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"{subject}not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise DecodeError(f"{subject}a JSON {type(body).__name__}, not {wanted}")
    return body
