"""The typed specs as ResourceDefinitions: applied to a server that validates requests
against ``api-swagger.json`` and resources against the applied schema, as Conveyor does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_asyncio
from _conveyor_api_server import ConveyorAPIServer, api_server
from _helpers import invoke, raw_results, resource_json, run_in_process, send, settled, wait_until
from nats.aio.client import Client

from conveyor_driver import Context, Driver, Resource, Settings
from conveyor_driver.api import APIUnavailableError, ConveyorAPIError, ConveyorClient
from conveyor_driver.definitions import apply_definitions, resource_definitions
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.specs import json_schema
from conveyor_driver.testing.fake import LogRecorder
from conveyor_driver.testing.fixtures import running


@attrs.frozen
class BuildSpec:
    """What to build, and from where."""

    repo: str
    ref: str = "main"
    timeout_s: int = 600


@attrs.frozen
class BuildSpecV2:
    """What to build, and from where."""

    repo: str
    ref: str = "main"
    timeout_s: int = 900
    target: str = "all"


@attrs.frozen
class Undocumented:
    size: int = 1


def typed_driver(spec: type[Any] = BuildSpec, **options: Any) -> Driver:
    driver = Driver("builder", **options)

    @driver.on("build", "release", spec=spec)
    async def build(ctx: Context[Any]) -> str:
        return f"built {ctx.spec.repo}"

    return driver


@pytest_asyncio.fixture
async def server() -> AsyncIterator[ConveyorAPIServer]:
    async with api_server() as running_server:
        yield running_server


@pytest_asyncio.fixture
async def client(server: ConveyorAPIServer) -> AsyncIterator[ConveyorClient]:
    api = ConveyorClient(server.url, attempts=1)
    try:
        yield api
    finally:
        await api.close()


def applies(server: ConveyorAPIServer) -> list[dict[str, Any]]:
    return [r.body for r in server.calls("POST", "/resource-definitions/apply")]


async def test_apply_creates_then_leaves_equal_definitions_alone(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    recorder = LogRecorder()
    driver = typed_driver()
    changes = await apply_definitions(driver, client, recorder.logger())
    assert [c.describe() for c in changes] == ["created build", "created release"]
    assert server.definitions["build"]["schema"] == json_schema(BuildSpec)
    assert server.definitions["build"]["description"] == "What to build, and from where."
    assert [e["event"] for e in recorder.entries] == ["resource definition created"] * 2

    again = await apply_definitions(driver, client, recorder.logger())
    assert [c.action for c in again] == ["unchanged", "unchanged"]
    assert len(applies(server)) == 2  # nothing sent the second time
    assert server.violations == []


async def test_apply_updates_a_changed_schema_and_logs_what_changed(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    await apply_definitions(typed_driver(), client, LogRecorder().logger())
    recorder = LogRecorder()
    changes = await apply_definitions(typed_driver(BuildSpecV2), client, recorder.logger())
    assert changes[0].describe() == "updated build: schema (added target; changed timeout_s)"
    assert server.definitions["build"]["schema"] == json_schema(BuildSpecV2)
    updated = [e for e in recorder.entries if e["event"] == "resource definition updated"]
    assert updated[0]["definition"] == "build"
    assert (updated[0]["added"], updated[0]["changed"]) == (["target"], ["timeout_s"])
    assert server.violations == []


async def test_an_operators_description_is_kept_when_the_class_has_none(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.define("build", {"type": "object"})
    server.definitions["build"]["description"] = "builds, as the operator says"
    changes = await apply_definitions(typed_driver(Undocumented), client, LogRecorder().logger())
    assert changes[0].describe() == "updated build: schema (added size)"
    stored = server.definitions["build"]
    assert stored["description"] == "builds, as the operator says"
    assert stored["version"] == "1" and stored["id"]  # kept, not blanked
    assert server.violations == []


async def test_the_server_validates_resources_with_the_applied_schema(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    await apply_definitions(typed_driver(), client, LogRecorder().logger())
    await client.create_resource(Resource(name="ok", type="build", spec={"repo": "r"}))
    for bad in ({"timeout_s": "ten"}, {"repo": "r", "reff": "typo"}, None):
        with pytest.raises(ConveyorAPIError) as refused:
            await client.create_resource(Resource(name="bad", type="build", spec=bad))
        assert refused.value.status == 400
        assert "Resource validation failed" in str(refused.value)
    assert len(server.refused_specs) == 3
    assert server.violations == []


def test_the_definitions_carry_the_schema_the_command_prints() -> None:
    (build, release) = resource_definitions(typed_driver())
    assert (build.name, release.name) == ("build", "release")
    assert build.schema == release.schema == json_schema(BuildSpec)


# -- conveyor-driver apply ------------------------------------------------------------------------


async def test_the_apply_command_says_what_it_did(server: ConveyorAPIServer) -> None:
    app = "tests/apps/specs_app.py:driver"
    first = await run_in_process("apply", app, "--api-url", server.url)
    assert (first.returncode, first.stdout) == (0, "created build\n"), first.stderr
    second = await run_in_process("apply", app, env={"CONVEYOR_API_URL": server.url})
    assert (second.returncode, second.stdout) == (0, "unchanged build\n"), second.stderr
    assert len(applies(server)) == 1
    assert server.violations == []


async def test_the_apply_command_without_typed_specs_applies_nothing(
    server: ConveyorAPIServer,
) -> None:
    done = await run_in_process("apply", "tests/apps/shapes_app.py:routed", "--api-url", server.url)
    assert done.returncode == 0
    assert done.stdout == "nothing to apply: no handler of driver 'router' has a spec= class\n"
    assert server.requests == []


async def test_the_apply_command_names_an_unreachable_server() -> None:
    done = await run_in_process(
        "apply", "tests/apps/specs_app.py:driver", "--api-url", "http://127.0.0.1:9"
    )
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ") and len(done.stderr.splitlines()) == 1


# -- at start, and over NATS ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["driver", "setting"])
async def test_the_driver_applies_its_definitions_at_start(
    nats_server: EmbeddedNats, server: ConveyorAPIServer, how: str
) -> None:
    driver = typed_driver(apply_definitions=how == "driver")
    setting = {"apply_definitions": True} if how == "setting" else {}
    async with running(driver, nats_server.url, api_url=server.url, **setting):
        assert set(server.definitions) == {"build", "release"}
        assert server.definitions["release"]["schema"] == json_schema(BuildSpec)
    assert server.violations == []


async def test_a_server_that_cannot_be_reached_stops_start_up(nats_server: EmbeddedNats) -> None:
    driver = typed_driver(apply_definitions=True)
    settings = Settings(nats_urls=nats_server.url, api_url="http://127.0.0.1:9", log_format="json")
    with pytest.raises(APIUnavailableError, match="/resource-definitions/build got no answer"):
        await asyncio.wait_for(driver.serve(settings), 60)


def test_routes_names_the_spec_class() -> None:
    result = invoke("routes", "tests/apps/specs_app.py:driver")
    assert result.exit_code == 0, result.output
    assert "  build: resource types build; events *; spec BuildSpec\n" in result.stdout
    assert "  cleanup: resource types cleanup; events *\n" in result.stdout


async def test_without_the_option_the_driver_applies_nothing(
    nats_server: EmbeddedNats, server: ConveyorAPIServer
) -> None:
    async with running(typed_driver(), nats_server.url, api_url=server.url):
        pass
    assert server.requests == []


async def test_a_bad_spec_over_nats_is_reported_at_once_and_acked(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    calls: list[Any] = []
    driver = Driver("builder", max_attempts=3)

    @driver.on("build", spec=BuildSpec)
    async def build(ctx: Context[BuildSpec]) -> None:
        calls.append(ctx.spec)

    async with raw_results(nats_client) as results, running(driver, nats_server.url):
        bad = await send(nats_client, resource_json(resource_type="build", spec={"ref": 1}))
        good = await send(nats_client, resource_json(resource_type="build", spec={"repo": "r"}))
        await results.wait(bad)
        await results.wait(good)
        await wait_until(lambda: settled(nats_client, "builder"), what="both acked")
    (failure,) = results.for_run(bad)
    assert failure["driverresult"] == {
        "success": False,
        "message": "invalid spec: spec.repo: required; spec.ref: expected str, got 1",
        "data": {"errors": ["spec.repo: required", "spec.ref: expected str, got 1"]},
        "driver": "builder",
    }
    assert json.dumps(failure["resource"]["spec"]) == '{"ref": 1}'
    assert calls == [BuildSpec(repo="r")]  # the bad one never reached the handler
    assert len(results.for_run(bad)) == 1  # reported once: not retried
