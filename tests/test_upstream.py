"""``ctx.upstream``: an earlier step's result, from the payload or through the API server.

The stored shape is the server's own: ``handleProcessDriverResult`` marshals the
``driverresult`` it received (``DriverResultEvent``: success, message, data, driver) into
``metadata["driverresults.<driver>"]`` with ``SaveDriverResult``, and forwards that resource.
"""

from __future__ import annotations

import dataclasses
import enum

import attrs
import orjson
import pytest
from _conveyor_api_server import ConveyorAPIServer

from conveyor_driver import (
    Context,
    ConveyorDriverError,
    Driver,
    Fail,
    NotFound,
    Resource,
    Result,
    Upstream,
    UpstreamError,
)
from conveyor_driver.api import ConveyorClient
from conveyor_driver.models import (
    DecodeError,
    DriverMessage,
    DriverResult,
    decode_driver_message,
    decode_stored_result,
    encode_driver_message,
    encode_stored_result,
    with_driver_result,
)
from conveyor_driver.protocol import driver_result_key
from conveyor_driver.testing import FakeContext, FakeConveyorClient, dispatch

# Byte for byte what Go's json.Marshal of a DriverResultEvent gives (fields in order).
STORED = (
    '{"success":true,"message":"cloned",'
    '"data":{"path":"/w/app","commit":"abc123"},"driver":"git-clone"}'
)
PROJECT = {"name": "app", "resource": "project", "pipeline": "ci", "spec": {}}


@attrs.frozen
class CloneOutput:
    path: str
    commit: str


@dataclasses.dataclass(frozen=True)
class Artifact:
    image: str
    size: int = 0


class Arch(enum.Enum):
    AMD64 = "amd64"


@attrs.frozen
class Nested:
    arch: Arch
    artifacts: list[Artifact]


def with_metadata(metadata: dict[str, str]) -> dict[str, object]:
    return {**PROJECT, "metadata": {"version": "3", **metadata}}


# -- the stored shape ----------------------------------------------------------------------


def test_the_key_and_the_stored_json_are_the_servers() -> None:
    assert driver_result_key("git-clone") == "driverresults.git-clone"
    result = DriverResult(True, "cloned", {"path": "/w/app", "commit": "abc123"}, "git-clone")
    assert encode_stored_result(result) == STORED
    assert decode_stored_result(STORED, "git-clone") == result


def test_a_stored_result_without_a_driver_name_takes_the_key_s() -> None:
    decoded = decode_stored_result('{"success":false,"message":"no","data":null}', "lint")
    assert decoded == DriverResult(False, "no", None, "lint")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "a JSON list, not a result object"),
        ('{"message": "m"}', "'success' is missing or not a boolean"),
        ('{"success": "yes"}', "'success' is missing or not a boolean"),
        ('{"success": true, "message": 3}', "'message' is not a string"),
    ],
)
def test_a_malformed_stored_result_is_a_decode_error(text: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_stored_result(text, "git-clone")


def test_the_result_survives_the_payload_string_the_go_server_sends() -> None:
    resource = with_driver_result(
        Resource(name="app", type="project", pipeline="ci", metadata={"version": "2"}),
        DriverResult(True, "cloned", {"path": "/w/app", "commit": "abc123"}, "git-clone"),
    )
    body = encode_driver_message(DriverMessage("process", resource, "run-1", "m-1"))
    assert isinstance(orjson.loads(body)["payload"], str)  # a JSON string, as Go sends it
    decoded = decode_driver_message(body, "drivers.build.resources.project")
    assert decoded.payload.metadata == {"version": "2", "driverresults.git-clone": STORED}


# -- from the payload ----------------------------------------------------------------------


async def test_upstream_reads_the_payload_and_asks_no_api() -> None:
    api = FakeConveyorClient()
    ctx = FakeContext(with_metadata({"driverresults.git-clone": STORED}), api=api)

    cloned = await ctx.upstream("git-clone")

    assert cloned == Upstream(
        driver="git-clone",
        success=True,
        message="cloned",
        data={"path": "/w/app", "commit": "abc123"},
    )
    assert api.calls == []


async def test_data_is_structured_into_the_class_asked_for() -> None:
    ctx = FakeContext(with_metadata({"driverresults.git-clone": STORED}))
    cloned = await ctx.upstream("git-clone", data=CloneOutput)
    assert cloned.data == CloneOutput(path="/w/app", commit="abc123")
    assert cloned.success and cloned.message == "cloned"


async def test_dataclasses_enums_lists_and_defaults_are_structured_too() -> None:
    data = {"arch": "amd64", "artifacts": [{"image": "app:1", "size": 3}, {"image": "app:2"}]}
    ctx = FakeContext(PROJECT, upstream={"package": Result.ok("packed", data=data)})
    packed = await ctx.upstream("package", data=Nested)
    assert packed.data == Nested(Arch.AMD64, [Artifact("app:1", 3), Artifact("app:2", 0)])


async def test_data_that_does_not_fit_the_class_names_each_bad_field() -> None:
    ctx = FakeContext(PROJECT, upstream={"git-clone": Result.ok(data={"path": 3})})
    with pytest.raises(UpstreamError) as caught:
        await ctx.upstream("git-clone", data=CloneOutput)
    message = str(caught.value)
    assert message.startswith("the result of 'git-clone' on project/app does not fit CloneOutput")
    assert "@ data.commit" in message and "required" in message
    assert not isinstance(caught.value, NotFound)


@pytest.mark.parametrize(
    ("data", "cls", "reason"),
    [
        ("x", int, "does not fit int: invalid literal for int() with base 10: 'x'"),
        (
            [1, "y"],
            list[int],
            "does not fit list[int]: invalid value for type, expected int @ data[1]",
        ),
    ],
)
async def test_data_of_other_types_that_does_not_fit_is_an_upstream_error(
    data: object, cls: type[object], reason: str
) -> None:
    ctx = FakeContext(PROJECT, upstream={"count": Result.ok(data=data)})
    with pytest.raises(UpstreamError) as caught:
        await ctx.upstream("count", data=cls)
    assert str(caught.value) == f"the result of 'count' on project/app {reason}"


async def test_a_failed_upstream_is_returned_as_is_but_refused_with_a_data_class() -> None:
    ctx = FakeContext(PROJECT, upstream={"git-clone": Result.fail("no such branch")})
    assert (await ctx.upstream("git-clone")) == Upstream("git-clone", False, "no such branch", None)
    with pytest.raises(UpstreamError) as caught:
        await ctx.upstream("git-clone", data=CloneOutput)
    assert str(caught.value) == "'git-clone' failed for project/app: no such branch"


async def test_a_malformed_stored_result_is_an_upstream_error_naming_the_driver() -> None:
    ctx = FakeContext(with_metadata({"driverresults.git-clone": "{oops"}))
    with pytest.raises(UpstreamError, match="the result of 'git-clone' stored on project/app is"):
        await ctx.upstream("git-clone")


# -- through the API -----------------------------------------------------------------------


async def test_without_it_in_the_payload_upstream_reads_the_api_server_s_resource() -> None:
    async with ConveyorAPIServer() as server:
        server.resources[("project", "app")] = [
            {**PROJECT, "id": "r-1", "metadata": {"version": "1"}},
            {
                **PROJECT,
                "id": "r-1",
                "metadata": {"version": "2", "driverresults.git-clone": STORED},
            },
        ]
        api = ConveyorClient(server.url)
        try:
            ctx = FakeContext(with_metadata({}), api=api)
            cloned = await ctx.upstream("git-clone", data=CloneOutput)
        finally:
            await api.close()
    assert cloned.data == CloneOutput(path="/w/app", commit="abc123")
    assert [(r.method, r.path) for r in server.requests] == [("GET", "/resources/project/app")]
    assert server.violations == []


async def test_no_result_on_the_api_server_either_is_not_found_naming_step_and_pipeline() -> None:
    async with ConveyorAPIServer() as server:
        server.resources[("project", "app")] = [{**PROJECT, "id": "r-1", "metadata": {}}]
        api = ConveyorClient(server.url)
        try:
            with pytest.raises(NotFound) as caught:
                await FakeContext(PROJECT, api=api).upstream("git-clone")
        finally:
            await api.close()
    assert str(caught.value) == (
        "no result of 'git-clone' for project/app: metadata['driverresults.git-clone'] is "
        "neither in the payload nor on the API server's resource (is 'git-clone' an earlier "
        "step of pipeline 'ci', and has it reported?)"
    )


async def test_a_resource_the_api_server_does_not_have_is_not_found_too() -> None:
    async with ConveyorAPIServer() as server:  # the Go server answers 500 "... not found"
        api = ConveyorClient(server.url)
        try:
            with pytest.raises(NotFound, match="the API server has no such resource") as caught:
                await FakeContext(PROJECT, api=api).upstream("git-clone")
        finally:
            await api.close()
    assert "not found" in str(caught.value)


async def test_not_found_is_the_framework_s_error_and_a_fail_never_a_key_error() -> None:
    with pytest.raises(NotFound) as caught:
        await FakeContext(PROJECT).upstream("git-clone")
    assert isinstance(caught.value, ConveyorDriverError)
    assert isinstance(caught.value, Fail)
    assert not isinstance(caught.value, KeyError)


# -- FakeContext(upstream=...) -------------------------------------------------------------


async def test_fake_context_stores_upstream_results_as_the_engine_does() -> None:
    ctx = FakeContext(
        PROJECT,
        upstream={
            "git-clone": Result.ok("cloned", data={"path": "/w", "commit": "c"}),
            "lint": {"success": False, "message": "3 warnings"},
        },
    )
    assert ctx.resource.metadata[driver_result_key("lint")] == (
        '{"success":false,"message":"3 warnings","data":null,"driver":"lint"}'
    )
    assert (await ctx.upstream("lint")) == Upstream("lint", False, "3 warnings", None)
    assert (await ctx.upstream("git-clone", data=CloneOutput)).data == CloneOutput("/w", "c")


def test_fake_context_refuses_an_upstream_that_is_not_a_result() -> None:
    with pytest.raises(TypeError, match=r"upstream\['lint'\] must be a Result"):
        FakeContext(PROJECT, upstream={"lint": {"ok": True}})


# -- through the dispatcher ----------------------------------------------------------------

builder = Driver("build")
calls: list[str] = []


@builder.on("project", events=["process"])
async def build(ctx: Context) -> Result:
    calls.append(ctx.run_id)
    cloned = await ctx.upstream("git-clone", data=CloneOutput)
    return Result.ok("built", data={"commit": cloned.data.commit})


async def test_a_step_reads_the_result_the_engine_put_in_its_payload() -> None:
    resource = with_metadata({"driverresults.git-clone": STORED})
    report = await dispatch(builder, resource, event="process")
    assert report.action == "ack" and report.kind == "success"
    assert report.result == Result.ok("built", data={"commit": "abc123"})


async def test_a_missing_upstream_fails_the_run_at_once_without_a_retry() -> None:
    calls.clear()
    report = await dispatch(builder, PROJECT, event="process", run_id="run-1")
    assert report.kind == "failure" and report.action == "ack" and report.delay is None
    assert report.result is not None and not report.result.success
    assert report.result.message.startswith("no result of 'git-clone' for project/app")
    assert calls == ["run-1"]
