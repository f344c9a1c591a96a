"""The wire models against docs/protocol.md: what the server sends, and what it reads back."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from conveyor_driver.models import (
    DecodeError,
    DriverMessage,
    DriverResult,
    LogEntry,
    PipelineEvent,
    Resource,
    converter,
    decode_driver_message,
    decode_pipeline_event,
    encode_driver_message,
)

RESOURCE_JSON: dict[str, Any] = {
    "id": "0b6d3c5e",
    "name": "my-app",
    "pipeline": "ci",
    "resource": "pipeline",
    "metadata": {"version": "1"},
    "spec": {"repo": "https://example.com/app.git", "steps": [1, 2]},
}


def encode(value: Any) -> bytes:
    """A wire model as JSON through the one converter: the shape the server reads back."""
    return orjson.dumps(converter.unstructure(value))


EXPECTED = Resource(
    id="0b6d3c5e",
    name="my-app",
    pipeline="ci",
    type="pipeline",
    metadata={"version": "1"},
    spec={"repo": "https://example.com/app.git", "steps": [1, 2]},
)


def body(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def test_payload_as_json_string_as_the_go_server_sends_it() -> None:
    data = body(
        event="create", payload=orjson.dumps(RESOURCE_JSON).decode(), id="m-1", run_id="run-1"
    )
    message = decode_driver_message(data, "resources.pipeline")
    assert message == DriverMessage(event="create", payload=EXPECTED, run_id="run-1", id="m-1")


def test_payload_as_object_as_the_design_document_shows_it() -> None:
    data = body(event="process", payload=RESOURCE_JSON, id="m-2", run_id="run-2")
    message = decode_driver_message(data, "drivers.d.resources.pipeline")
    assert message == DriverMessage(event="process", payload=EXPECTED, run_id="run-2", id="m-2")


def test_missing_message_id_becomes_empty() -> None:
    message = decode_driver_message(
        body(event="create", payload=RESOURCE_JSON, run_id="r"), "resources.pipeline"
    )
    assert message.id == ""


@pytest.mark.parametrize(
    ("subject", "expected_type"),
    [
        ("resources.deployment", "deployment"),
        ("drivers.command-runner.resources.deployment", "deployment"),
        # Not a driver subject: nothing to take the type from.
        ("events.something", ""),
    ],
)
def test_resource_type_taken_from_subject_when_missing(subject: str, expected_type: str) -> None:
    payload = {"name": "app", "spec": {}}
    message = decode_driver_message(body(event="create", payload=payload, run_id="r"), subject)
    assert message.payload.type == expected_type
    assert message.payload.name == "app"


def test_resource_type_in_payload_wins_over_subject() -> None:
    payload = {"name": "app", "resource": "pipeline"}
    message = decode_driver_message(
        body(event="create", payload=payload, run_id="r"), "resources.other"
    )
    assert message.payload.type == "pipeline"


@pytest.mark.parametrize("as_string", [True, False])
def test_null_metadata_from_a_go_nil_map_is_accepted(as_string: bool) -> None:
    resource = {"name": "app", "resource": "pipeline", "metadata": None}
    payload: Any = orjson.dumps(resource).decode() if as_string else resource
    message = decode_driver_message(
        body(event="create", payload=payload, run_id="r"), "resources.pipeline"
    )
    assert message.payload == Resource(name="app", type="pipeline", metadata={})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"this is not json", "body is not JSON"),
        (b'["create"]', "body is a JSON list, not an object"),
        (b'"create"', "body is a JSON str, not an object"),
        (body(payload={}, run_id="r"), "'event' is missing or not a string"),
        (body(event="", payload={}, run_id="r"), "'event' is missing or not a string"),
        (body(event=3, payload={}, run_id="r"), "'event' is missing or not a string"),
        (body(event="create", payload={}), "'run_id' is missing or not a usable id"),
        (body(event="create", payload={}, run_id=""), "'run_id' is missing or not a usable id"),
        (body(event="create", payload={}, run_id=7), "'run_id' is missing or not a usable id"),
        # The run id becomes a subject token (logs.<run_id>): a dot or wildcard would
        # publish the run's logs somewhere else.
        (body(event="create", payload={}, run_id="a.b"), "'run_id' is missing or not a usable id"),
        (body(event="create", payload={}, run_id="a*"), "'run_id' is missing or not a usable id"),
        (body(event="create", payload={}, run_id="a b"), "'run_id' is missing or not a usable id"),
        (body(event="create", run_id="r"), "'payload' is missing"),
        (body(event="create", payload=None, run_id="r"), "'payload' is missing"),
        (body(event="create", payload=5, run_id="r"), "payload is a JSON int, not a resource"),
        (body(event="create", payload=[1], run_id="r"), "payload is a JSON list, not a resource"),
        (body(event="create", payload="[1]", run_id="r"), "payload is a JSON list, not a resource"),
        (body(event="create", payload="not json", run_id="r"), "payload is not a resource:"),
        (body(event="create", payload="", run_id="r"), "payload is not a resource:"),
        (
            body(event="create", payload={"metadata": ["x"]}, run_id="r"),
            "payload is not a resource: expected a mapping @ $.metadata",
        ),
    ],
)
def test_malformed_messages_raise_decode_error_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_driver_message(data, "resources.pipeline")
    message = str(info.value)
    assert message.startswith(reason), message
    assert "\n" not in message


def test_pipeline_event_has_exactly_the_protocol_shape() -> None:
    event = PipelineEvent(
        run_id="run-1",
        resource=EXPECTED,
        driverresult=DriverResult(
            success=True, message="built", data={"image": "app:1"}, driver="builder"
        ),
    )
    assert orjson.loads(encode(event)) == {
        "event": "driver.result",
        "run_id": "run-1",
        "resource": RESOURCE_JSON,
        "driverresult": {
            "success": True,
            "message": "built",
            "data": {"image": "app:1"},
            "driver": "builder",
        },
    }


def test_pipeline_event_omits_an_empty_pipeline_and_keeps_null_data() -> None:
    event = PipelineEvent(
        run_id="r",
        resource=Resource(name="app", type="command", id="i"),
        driverresult=DriverResult(success=False, message="no", data=None, driver="d"),
    )
    decoded = orjson.loads(encode(event))
    assert decoded["resource"] == {
        "id": "i",
        "name": "app",
        "resource": "command",
        "metadata": {},
        "spec": None,
    }
    assert decoded["driverresult"] == {
        "success": False,
        "message": "no",
        "data": None,
        "driver": "d",
    }


def test_pipeline_event_round_trips() -> None:
    event = PipelineEvent(
        run_id="r",
        resource=EXPECTED,
        driverresult=DriverResult(success=True, message="", data=[1, "a"], driver="d"),
    )
    assert decode_pipeline_event(encode(event)) == event


def test_decode_pipeline_event_rejects_garbage() -> None:
    with pytest.raises(DecodeError, match="not a result event"):
        decode_pipeline_event(b'{"event": "driver.result"}')


def test_log_entry_uses_the_runid_key() -> None:
    entry = LogEntry(
        runid="run-1",
        driver="d",
        pipeline="ci",
        timestamp="2024-01-02T03:04:05Z",
        message="cloning repo=x",
    )
    assert orjson.loads(encode(entry)) == {
        "runid": "run-1",
        "driver": "d",
        "pipeline": "ci",
        "timestamp": "2024-01-02T03:04:05Z",
        "message": "cloning repo=x",
    }


def test_encode_driver_message_sends_payload_as_a_string_by_default() -> None:
    message = DriverMessage(event="create", payload=EXPECTED, run_id="run-1", id="m-1")
    decoded = orjson.loads(encode_driver_message(message))
    assert set(decoded) == {"event", "payload", "id", "run_id"}
    assert isinstance(decoded["payload"], str)
    assert orjson.loads(decoded["payload"]) == RESOURCE_JSON
    assert decoded["event"] == "create"
    assert decoded["run_id"] == "run-1"
    assert decoded["id"] == "m-1"


def test_encode_driver_message_payload_as_object_on_request() -> None:
    message = DriverMessage(event="create", payload=EXPECTED, run_id="run-1", id="m-1")
    decoded = orjson.loads(encode_driver_message(message, payload_as_string=False))
    assert decoded["payload"] == RESOURCE_JSON


@pytest.mark.parametrize("as_string", [True, False])
def test_encoded_driver_message_decodes_to_itself(as_string: bool) -> None:
    message = DriverMessage(event="create", payload=EXPECTED, run_id="run-1", id="m-1")
    data = encode_driver_message(message, payload_as_string=as_string)
    assert decode_driver_message(data, "resources.pipeline") == message
