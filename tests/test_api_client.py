"""ConveyorClient against a real HTTP server that holds it to the OpenAPI file.

The server (tests/_conveyor_api_server.py) answers 400 and records a violation for any
request off the documented contract, so ``server.violations == []`` after a test means
every call used a documented path, method, query and body shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from _conveyor_api_server import SWAGGER_FILE, ConveyorAPIServer
from _helpers import run_in_process, wait_until
from cattrs import ClassValidationError

from conveyor_driver import ConveyorDriverError, models
from conveyor_driver.api import (
    APIUnavailable,
    APIUnavailableError,
    ConveyorAPIError,
    ConveyorClient,
    NotFound,
    NotFoundError,
    Pipeline,
    ResourceCreated,
    ResourceDefinition,
    Step,
)
from conveyor_driver.api import models as api_models
from conveyor_driver.embedded import free_port
from conveyor_driver.models import DriverMessage, LogEntry, Resource
from conveyor_driver.testing import FakeContext, FakeConveyorClient
from conveyor_driver.testing.fake import LogRecorder

#: The client's methods, exactly as issue 4 names them.
API_METHODS = [
    "apply_resource_definition",
    "broadcast_message",
    "create_pipeline",
    "create_resource",
    "create_resource_definition",
    "delete_pipeline",
    "delete_resource",
    "delete_resource_definition",
    "get_logs",
    "get_pipeline",
    "get_resource",
    "get_resource_definition",
    "get_resource_version",
    "health",
    "list_resources",
    "post_log",
    "stream_logs",
    "update_pipeline",
    "update_resource",
    "update_resource_definition",
]


def log_line(message: str, *, run: str = "run-1", driver: str = "build") -> dict[str, str]:
    return {
        "runid": run,
        "driver": driver,
        "pipeline": "ci",
        "timestamp": "2025-01-02T03:04:05Z",
        "message": message,
    }


def as_entry(line: dict[str, str]) -> LogEntry:
    return LogEntry(**line)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[ConveyorAPIServer]:
    async with ConveyorAPIServer() as running:
        yield running


@contextlib.asynccontextmanager
async def client_of(url: str, **options: Any) -> AsyncIterator[ConveyorClient]:
    client = ConveyorClient(url, **{"backoff": 0.01, **options})
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture
async def client(server: ConveyorAPIServer) -> AsyncIterator[ConveyorClient]:
    async with client_of(server.url) as api:
        yield api


def public_methods(cls: type) -> list[str]:
    return sorted(
        name
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and callable(member) and name not in ("close", "from_settings")
    )


# -- the contract ----------------------------------------------------------------------------


def test_client_has_exactly_the_methods_of_the_issue() -> None:
    assert public_methods(ConveyorClient) == API_METHODS


async def test_every_method_hits_a_documented_route_with_a_documented_body(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    definition = ResourceDefinition(
        name="pipeline", description="CI", version="1", schema={"type": "object"}
    )
    assert (await client.create_resource_definition(definition)).name == "pipeline"
    assert (await client.apply_resource_definition(definition)).schema == {"type": "object"}
    assert (await client.get_resource_definition("pipeline")).description == "CI"
    updated_definition = await client.update_resource_definition(
        ResourceDefinition(name="pipeline", version="2", schema={"type": "object"})
    )
    assert updated_definition.version == "2"

    pipeline = Pipeline(
        name="ci",
        resource="pipeline",
        steps=[Step(name="build", driver="builder", id="s1")],
        description="build it",
        version="1",
        metadata={"team": "a"},
    )
    assert await client.create_pipeline(pipeline) == pipeline
    assert await client.get_pipeline("ci") == pipeline
    assert (await client.update_pipeline(Pipeline(name="ci", resource="pipeline"))).steps == []

    app = Resource(name="app", type="pipeline", pipeline="ci", spec={"repo": "r"})
    created = await client.create_resource(app)
    assert isinstance(created, ResourceCreated)
    assert (created.name, created.version) == ("app", "1") and created.runid
    assert [r.name for r in await client.list_resources("pipeline")] == ["app"]
    assert (await client.get_resource("pipeline", "app")).spec == {"repo": "r"}
    # spec {}: the server validates an update against the definition's schema too.
    updated = await client.update_resource(Resource(name="app", type="pipeline", spec={}))
    assert updated.metadata == {"version": "2"}
    assert (await client.get_resource_version("pipeline", "app", 1)).spec == {"repo": "r"}

    line = LogEntry(**log_line("hello"))
    assert cast(object, await client.post_log(line)) is None  # None at run time too
    assert await client.get_logs(pipeline="ci", driver="build", run_id="run-1") == [line]
    assert await client.get_logs() == [line]

    message = DriverMessage(event="create", payload=app, run_id="run-1", id="m1")
    assert await client.broadcast_message(message) == {"message": "message published"}
    # The payload travels as a JSON string, as the swagger's DriverMessage has it.
    assert json.loads(server.broadcasts[0]["payload"]) == {
        "name": "app",
        "resource": "pipeline",
        "id": "",
        "pipeline": "ci",
        "metadata": {},
        "spec": {"repo": "r"},
    }

    health = await client.health()
    assert health["status"] == "healthy"

    for driver in (None, "build"):
        server.end_streams()
        streamed = [entry async for entry in _ended(server, client.stream_logs("run-1", driver))]
        assert streamed == [line]

    await client.delete_resource("pipeline", "app")
    await client.delete_pipeline("ci")
    await client.delete_resource_definition("pipeline")

    assert server.violations == []
    documented = set(server.contract.operations)
    used = {(r.method, r.template) for r in server.requests}
    assert used == documented, f"not exercised: {documented - used}"


async def _ended(
    server: ConveyorAPIServer, stream: AsyncIterator[LogEntry]
) -> AsyncIterator[LogEntry]:
    """Iterate a stream, ending it from the server side once it is open."""

    async def end_when_open() -> None:
        await wait_until(lambda: server.streams_open == 1, what="stream open")
        server.end_streams()

    ender = asyncio.create_task(end_when_open())
    try:
        async for entry in stream:
            yield entry
    finally:
        await ender


async def test_the_create_path_is_the_documented_one(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.define("pipeline")
    await client.create_resource(Resource(name="app", type="pipeline"))
    await client.create_resource_definition(ResourceDefinition(name="job"))
    assert [r.path for r in server.requests] == ["/resources", "/resource-definitions"]
    assert server.requests[0].body == {
        "name": "app",
        "resource": "pipeline",
        "id": "",
        "metadata": {},
        "spec": None,
    }


async def test_resource_versions_round_trip(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.define("pipeline")
    await client.create_resource(Resource(name="app", type="pipeline", spec={"n": 1}))
    first = await client.get_resource("pipeline", "app")
    second = await client.update_resource(attrs_evolve(first, spec={"n": 2}))
    assert (first.metadata, second.metadata) == ({"version": "1"}, {"version": "2"})
    assert second.id == first.id
    assert (await client.get_resource_version("pipeline", "app", "1")).spec == {"n": 1}
    assert (await client.get_resource_version("pipeline", "app", 2)).spec == {"n": 2}
    assert (await client.get_resource("pipeline", "app")).spec == {"n": 2}
    await client.delete_resource("pipeline", "app")
    with pytest.raises(NotFound):
        await client.get_resource("pipeline", "app")
    assert server.violations == []


def attrs_evolve(resource: Resource, **changes: Any) -> Resource:
    import attrs

    return attrs.evolve(resource, **changes)


@pytest.mark.parametrize("prefix", ["", "/conveyor/api"])
@pytest.mark.parametrize("slash", ["", "/"])
async def test_base_url_with_or_without_slash_and_a_path_prefix(prefix: str, slash: str) -> None:
    async with (
        ConveyorAPIServer(prefix=prefix) as server,
        client_of(server.url + slash) as client,
    ):
        server.define("pipeline")
        await client.create_resource(Resource(name="app", type="pipeline"))
        assert (await client.get_resource("pipeline", "app")).name == "app"
        assert (await client.health())["status"] == "healthy"
    assert [r.path for r in server.requests] == ["/resources", "/resources/pipeline/app", "/health"]
    assert server.violations == []


async def test_a_name_stays_one_path_segment(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    with pytest.raises(NotFound):
        await client.get_resource("pipeline", "team/app x")
    assert server.requests[0].template == "/resources/{type}/{name}"
    assert server.requests[0].params == {"type": "pipeline", "name": "team/app x"}


async def test_empty_names_are_refused_before_sending(client: ConveyorClient) -> None:
    with pytest.raises(ValueError, match="name must not be empty"):
        await client.get_resource("pipeline", "")


# -- errors -----------------------------------------------------------------------------------


async def test_a_missing_resource_is_not_found_even_as_the_go_server_says_it(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    with pytest.raises(NotFound) as caught:
        await client.get_resource("pipeline", "ghost")
    error = caught.value
    assert (error.status, error.method, error.path) == (500, "GET", "/resources/pipeline/ghost")
    assert error.error == (
        "Failed to find resource: resource with name ghost and type pipeline not found"
    )


async def test_a_404_is_not_found(client: ConveyorClient) -> None:
    with pytest.raises(NotFound) as caught:
        await client.get_pipeline("nope")
    assert str(caught.value) == "GET /pipelines/nope answered 404: pipeline nope not found"


async def test_a_400_is_an_api_error_with_the_servers_text(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    with pytest.raises(ConveyorAPIError) as caught:
        await client.create_resource(Resource(name="app"))
    assert type(caught.value) is ConveyorAPIError
    assert str(caught.value) == "POST /resources answered 400: Resource type is required"
    assert caught.value.status == 400


async def test_a_500_on_a_write_is_not_mistaken_for_not_found(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    with pytest.raises(ConveyorAPIError) as caught:
        await client.delete_resource("pipeline", "ghost")
    assert type(caught.value) is ConveyorAPIError
    assert caught.value.status == 500


async def test_an_error_body_that_is_not_json_is_quoted(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.fail(502, body="upstream connect error", method="POST")
    with pytest.raises(ConveyorAPIError) as caught:
        await client.post_log(LogEntry(**log_line("x")))
    assert caught.value.error == "upstream connect error"
    assert caught.value.status == 502


async def test_an_answer_of_the_wrong_shape_is_an_api_error(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.fail(200, body=["not", "a", "pipeline"], method="GET")
    with pytest.raises(ConveyorAPIError, match=r"unexpected answer, not a Pipeline"):
        await client.get_pipeline("ci")


# -- retries and timeouts ---------------------------------------------------------------------


async def test_a_get_is_retried_on_503_until_it_succeeds(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.define("pipeline")
    server.fail(503, method="GET", times=2)
    assert (await client.get_resource_definition("pipeline")).name == "pipeline"
    assert len(server.calls("GET", "/resource-definitions/{name}")) == 3


async def test_a_get_gives_up_after_its_attempts(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.fail(503, method="GET", times=10, body={"error": "overloaded"})
    with pytest.raises(ConveyorAPIError) as caught:
        await client.get_pipeline("ci")
    assert (caught.value.status, caught.value.error) == (503, "overloaded")
    assert len(server.requests) == client.attempts == 3


@pytest.mark.parametrize("status", [502, 504])
async def test_put_and_delete_are_retried_on_gateway_errors(
    server: ConveyorAPIServer, client: ConveyorClient, status: int
) -> None:
    server.pipelines["ci"] = {"name": "ci", "resource": "pipeline"}
    server.fail(status, method="PUT")
    server.fail(status, method="DELETE")
    await client.update_pipeline(Pipeline(name="ci", resource="pipeline", version="2"))
    await client.delete_pipeline("ci")
    assert [(r.method, r.path) for r in server.requests] == [
        ("PUT", "/pipelines/ci"),
        ("PUT", "/pipelines/ci"),
        ("DELETE", "/pipelines/ci"),
        ("DELETE", "/pipelines/ci"),
    ]
    assert server.pipelines == {}


async def test_a_post_is_never_retried(server: ConveyorAPIServer, client: ConveyorClient) -> None:
    server.define("pipeline")
    server.fail(503, method="POST")
    with pytest.raises(ConveyorAPIError) as caught:
        await client.create_resource(Resource(name="app", type="pipeline"))
    assert caught.value.status == 503
    assert len(server.requests) == 1
    assert server.resources == {}


async def test_a_get_is_retried_after_the_connection_drops(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.define("pipeline")
    server.fail(drop=True, method="GET")
    assert (await client.get_resource_definition("pipeline")).name == "pipeline"
    assert len(server.requests) == 2


async def test_a_post_is_not_retried_after_the_connection_drops(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.fail(drop=True, method="POST")
    with pytest.raises(APIUnavailable) as caught:
        await client.post_log(LogEntry(**log_line("x")))
    assert caught.value.status == 0
    assert str(caught.value).startswith("POST /logs got no answer: ")
    assert len(server.requests) == 1


async def test_an_unreachable_server_is_api_unavailable() -> None:
    port = free_port()
    async with client_of(f"http://127.0.0.1:{port}", attempts=2) as client:
        with pytest.raises(APIUnavailable) as caught:
            await client.get_pipeline("ci")
    message = str(caught.value)
    assert message.startswith(
        f"GET /pipelines/ci got no answer: cannot connect to 127.0.0.1:{port}"
    )
    assert message.endswith("(2 attempts)")


async def test_a_slow_answer_times_out_and_a_get_is_tried_again(
    server: ConveyorAPIServer,
) -> None:
    server.fail(delay=5, method="GET", times=2)
    async with client_of(server.url, timeout=0.3, attempts=2) as client:
        with pytest.raises(APIUnavailable) as caught:
            await client.get_pipeline("ci")
    assert str(caught.value) == "GET /pipelines/ci got no answer: timed out after 0.3s (2 attempts)"
    assert len(server.requests) == 2


async def test_a_slow_post_times_out_once(server: ConveyorAPIServer) -> None:
    server.fail(delay=5, method="POST")
    async with client_of(server.url, timeout=0.3) as client:
        with pytest.raises(APIUnavailable, match=r"timed out after 0.3s$"):
            await client.post_log(LogEntry(**log_line("x")))
    assert len(server.requests) == 1


async def test_retries_are_logged(server: ConveyorAPIServer) -> None:
    recorder = LogRecorder()
    server.fail(503, method="GET", times=2)
    async with client_of(server.url, log=recorder.logger()) as client:
        with pytest.raises(NotFound):
            await client.get_pipeline("ci")
    retries = [e for e in recorder.entries if e["event"] == "api call failed; retrying"]
    assert [(e["attempt"], e["reason"], e["path"]) for e in retries] == [
        (1, "answered 503", "/pipelines/ci"),
        (2, "answered 503", "/pipelines/ci"),
    ]
    assert all(e["level"] == "warning" for e in retries)


# -- the log stream ---------------------------------------------------------------------------


async def test_stream_replays_then_follows_skipping_heartbeats_until_the_server_closes() -> None:
    async with ConveyorAPIServer(heartbeat=0.02) as server, client_of(server.url) as client:
        server.logs.append(log_line("stored"))
        received: list[LogEntry] = []

        async def follow() -> None:
            async for entry in client.stream_logs("run-1"):
                received.append(entry)

        task = asyncio.create_task(follow())
        await wait_until(lambda: received, what="the replayed line")
        await wait_until(lambda: server.heartbeats_sent >= 2, what="heartbeats")
        server.publish(log_line("live 1"))
        server.publish(log_line("other run", run="run-2"))
        server.publish(log_line("live 2", driver="deploy"))
        await wait_until(lambda: len(received) == 3, what="the live lines")
        heartbeats = server.heartbeats_sent
        await wait_until(lambda: server.heartbeats_sent > heartbeats + 1, what="more heartbeats")
        server.end_streams()
        await asyncio.wait_for(task, 10)
    assert received == [
        as_entry(log_line("stored")),
        as_entry(log_line("live 1")),
        as_entry(log_line("live 2", driver="deploy")),
    ]
    assert server.requests[0].template == "/logs/pipeline/{runid}"


async def test_a_driver_stream_uses_the_driver_route(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.logs += [log_line("mine"), log_line("theirs", driver="deploy")]
    received = [entry async for entry in _ended(server, client.stream_logs("run-1", "build"))]
    assert received == [as_entry(log_line("mine"))]
    assert server.requests[0].template == "/logs/streams/{drivername}/{runid}"
    assert server.requests[0].params == {"drivername": "build", "runid": "run-1"}


async def test_stream_reads_any_server_sent_events_framing(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    frames = [
        b": comment before anything\r\n\r\n",
        b'event: log\r\nid: 7\r\ndata: {"runid": "run-1", "driver": "build", "pipeline": "",'
        b' "timestamp": "t1", "message": "crlf"}\r\n\r\n',
        b'data:{"run_id": "run-1", "driver": "py", "message": "other runtime"}\n\n',
        b"data: not json\ndata: second line\n\n",
        b"retry: 1000\n\n",
        b'data: {"runid": "run-1", "message": "cut off by the end"}\n',
    ]

    async def send_frames() -> None:
        await wait_until(lambda: server.streams_open == 1, what="stream open")
        for frame in frames:
            server.push_raw("run-1", "build", frame)
        server.end_streams()

    sender = asyncio.create_task(send_frames())
    received = [entry async for entry in client.stream_logs("run-1")]
    await sender
    assert received == [
        LogEntry(runid="run-1", driver="build", pipeline="", timestamp="t1", message="crlf"),
        LogEntry(runid="run-1", driver="py", pipeline="", timestamp="", message="other runtime"),
        LogEntry(runid="", driver="", pipeline="", timestamp="", message="not json\nsecond line"),
    ]


@pytest.mark.parametrize("closing", ["break", "aclosing"])
async def test_a_caller_that_stops_closes_the_stream(closing: str) -> None:
    async with ConveyorAPIServer(heartbeat=0.02) as server, client_of(server.url) as client:
        server.logs += [log_line("one"), log_line("two")]
        first: list[LogEntry] = []
        if closing == "aclosing":
            generator = client.stream_logs("run-1")
            # Typed AsyncIterator; aclosing needs the async generator it is at run time.
            assert isinstance(generator, AsyncGenerator)
            async with contextlib.aclosing(generator) as stream:
                async for entry in stream:
                    first.append(entry)
                    break
        else:
            async for entry in client.stream_logs("run-1"):
                first.append(entry)
                break
        await wait_until(
            lambda: server.streams_closed_by_client == 1, what="the server seeing the close"
        )
        assert server.streams_open == 0
    assert first == [as_entry(log_line("one"))]


async def test_a_silent_stream_ends_with_a_clear_error() -> None:
    async with (
        ConveyorAPIServer(heartbeat=None) as server,
        client_of(server.url, stream_idle_timeout=0.3) as client,
    ):
        with pytest.raises(APIUnavailable) as caught:
            async for _entry in client.stream_logs("run-1"):
                pass
    assert str(caught.value) == (
        "GET /logs/pipeline/run-1 got no answer: nothing, not even a heartbeat, for 0.3s"
    )


async def test_a_refused_stream_raises_before_any_line(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.fail(500, method="GET", body={"error": "Error getting logs"}, times=5)
    with pytest.raises(ConveyorAPIError, match="answered 500: Error getting logs"):
        async for _entry in client.stream_logs("run-1"):
            pass


# -- the CLI ----------------------------------------------------------------------------------


async def test_cli_logs_prints_a_runs_lines_until_the_stream_ends(
    server: ConveyorAPIServer,
) -> None:
    server.logs.append(log_line("cloning"))
    command = asyncio.create_task(
        run_in_process("logs", "run-1", "--driver", "build", "--api-url", server.url + "/")
    )
    await wait_until(lambda: server.streams_open == 1, what="the CLI's stream")
    server.publish(log_line("built"))
    await wait_until(lambda: server.heartbeats_sent >= 1, what="a heartbeat after the line")
    server.end_streams()
    done = await command
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        "2025-01-02T03:04:05Z [build] cloning",
        "2025-01-02T03:04:05Z [build] built",
    ]


async def test_cli_logs_fails_with_one_line() -> None:
    port = free_port()
    done = await run_in_process("logs", "run-1", "--api-url", f"http://127.0.0.1:{port}")
    assert (done.returncode, done.stdout) == (1, "")
    assert len(done.stderr_lines) == 1
    assert done.stderr_lines[0].startswith(
        f"Error: GET /logs/pipeline/run-1 got no answer: cannot connect to 127.0.0.1:{port}"
    )


# -- the fake -----------------------------------------------------------------------------


def test_the_fake_overrides_every_method_with_the_same_signature() -> None:
    for name in [*API_METHODS, "close"]:
        assert name in FakeConveyorClient.__dict__, name
        real = inspect.signature(getattr(ConveyorClient, name))
        fake = inspect.signature(getattr(FakeConveyorClient, name))
        assert fake == real, name


async def _scenario(api: ConveyorClient) -> list[Any]:
    """The same calls against the fake and the real client: what each answered."""
    seen: list[Any] = []
    created = await api.create_resource(Resource(name="app", type="pipeline", spec={"n": 1}))
    seen.append((created.name, created.version))
    with pytest.raises(ConveyorAPIError) as duplicate:
        await api.create_resource(Resource(name="app", type="pipeline"))
    seen.append(duplicate.value.status)
    current = await api.get_resource("pipeline", "app")
    await api.update_resource(attrs_evolve(current, spec={"n": 2}))
    seen.append((await api.get_resource_version("pipeline", "app", "1")).spec)
    seen.append((await api.get_resource("pipeline", "app")).metadata)
    seen.append([r.name for r in await api.list_resources("pipeline")])
    for lookup in (
        api.get_resource("pipeline", "ghost"),
        api.get_resource_version("pipeline", "app", "9"),
        api.get_pipeline("ghost"),
    ):
        with pytest.raises(NotFound):
            await lookup
        seen.append("not found")
    await api.post_log(LogEntry(**log_line("hi")))
    seen.append(await api.get_logs(run_id="run-1"))
    await api.delete_resource("pipeline", "app")
    seen.append(await api.list_resources("pipeline"))
    return seen


async def test_the_fake_answers_as_the_server_does(
    server: ConveyorAPIServer, client: ConveyorClient
) -> None:
    server.define("pipeline")
    fake = FakeConveyorClient()
    assert await _scenario(fake) == await _scenario(client)
    assert server.violations == []


async def test_the_fake_records_calls_and_keeps_versions() -> None:
    api = FakeConveyorClient(resources=[Resource(name="app", type="pipeline", spec={"n": 1})])
    app = await api.get_resource("pipeline", "app")
    assert app.metadata == {"version": "1"} and app.id
    await api.update_resource(attrs_evolve(app, spec={"n": 2}))
    assert [r.spec for r in api.versions("pipeline", "app")] == [{"n": 1}, {"n": 2}]
    assert [(c.method, c.arguments) for c in api.calls] == [
        ("get_resource", {"type": "pipeline", "name": "app"}),
        ("update_resource", {"resource": attrs_evolve(app, spec={"n": 2})}),
    ]
    assert api.calls_to("update_resource")[0].arguments["resource"].spec == {"n": 2}
    with pytest.raises(NotFound):
        await api.get_resource_definition("pipeline")
    await api.post_log(LogEntry(**log_line("a")))
    await api.post_log(LogEntry(**log_line("b", driver="deploy")))
    assert [e.message async for e in api.stream_logs("run-1", "deploy")] == ["b"]


async def test_fake_context_hands_handlers_a_fake_client() -> None:
    seeded = FakeConveyorClient(resources=[Resource(name="base", type="image", spec="v1")])

    async def handler(ctx: FakeContext) -> str:
        return str((await ctx.api.get_resource("image", "base")).spec)

    default = FakeContext({"name": "app", "resource": "pipeline"})
    assert isinstance(default.api, FakeConveyorClient)
    assert await handler(FakeContext({"name": "app", "resource": "pipeline"}, api=seeded)) == "v1"
    assert [c.method for c in seeded.calls] == ["get_resource"]


def test_client_reprs_hide_passwords() -> None:
    client = ConveyorClient("http://user:secret@conveyor.example:8080/prefix/")
    assert repr(client) == "<ConveyorClient http://user@conveyor.example:8080/prefix>"


def test_a_url_that_is_not_http_is_a_configuration_error() -> None:
    from conveyor_driver.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="is not an http"):
        ConveyorClient("nats://localhost:4222")


def test_the_contract_copy_matches_the_shared_one() -> None:
    """The tests' copy of the server's OpenAPI file must not drift from the shared notes."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "conveyor" / "api-swagger.json"
    if not shared.is_file():
        pytest.skip("no shared/conveyor beside this clone")
    assert SWAGGER_FILE.read_bytes() == shared.read_bytes()


def test_api_errors_are_driver_errors_under_their_new_and_old_names() -> None:
    # The CLI prints a ConveyorDriverError as one line: an API error reads as one too.
    assert issubclass(ConveyorAPIError, ConveyorDriverError)
    assert (NotFound, APIUnavailable) == (NotFoundError, APIUnavailableError)
    assert issubclass(NotFoundError, ConveyorAPIError)
    assert issubclass(APIUnavailableError, ConveyorAPIError)
    error = APIUnavailableError("GET", "/health", "timed out after 1s")
    assert (str(error), error.status) == ("GET /health got no answer: timed out after 1s", 0)


def test_the_api_reads_go_nulls_without_changing_the_wire_converter() -> None:
    answer = {"name": "ci", "resource": "pipeline", "steps": None, "metadata": None}
    assert api_models.converter.structure(answer, Pipeline) == Pipeline("ci", "pipeline")
    # The shared converter keeps its own hooks: the API's leniency is the API's alone.
    with pytest.raises(ClassValidationError):
        models.converter.structure(answer, Pipeline)
