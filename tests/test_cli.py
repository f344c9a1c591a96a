"""The ``conveyor-driver`` command against a real nats-server.

Most tests call it in-process (``run_in_process``, click's CliRunner), so coverage measures
the CLI; the ``process`` ones run it as a real child where the process is the point: an
entry point, signals, a driver serving while another command talks to it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import orjson
import pytest
from _helpers import invoke, one_error_line, run_in_process
from apps.harness import (
    DriverProcess,
    app,
    clean_env,
    driver_process,
    parse_json_line,
)
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy

from conveyor_driver import Driver, telemetry
from conveyor_driver.embedded import EmbeddedNats, free_port
from conveyor_driver.errors import ConfigurationError
from conveyor_driver.testing.fixtures import running

WORKER = app("worker_app.py:driver")


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    return lines[0]


def _error_after_waiting(stderr: str) -> str:
    """Start-up waits out weather, saying so once per kind of wait, then gives up in one line."""
    *waits, last = stderr.splitlines()
    events = [json.loads(line)["event"] for line in waits]
    assert set(events) <= {"waiting for NATS", "start-up waiting"}, stderr
    assert len(events) == len(set(events)), stderr
    return _one_error_line(last)


# --- mistakes an operator can make: one line, non-zero, no traceback -----------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            "no_such_module_xyz:driver",
            "Error: cannot import 'no_such_module_xyz': no module named 'no_such_module_xyz'",
        ),
        (
            app("broken_app.py:driver"),
            f"Error: importing {app('broken_app.py')!r} failed: "
            "RuntimeError: settings file missing",
        ),
        (
            app("worker_app.py:nope"),
            f"Error: {app('worker_app.py')!r} has no attribute 'nope'",
        ),
        (
            app("shapes_app.py:not_a_driver"),
            f"Error: {app('shapes_app.py')}:not_a_driver is a dict, not a conveyor_driver.Driver",
        ),
        (
            app("shapes_app.py:empty"),
            "Error: driver 'empty' has no handler: register one with @driver.on(...)",
        ),
    ],
    ids=["unimportable", "import-raises", "missing-attribute", "not-a-driver", "no-handler"],
)
async def test_run_with_a_bad_app_prints_one_error_line(target: str, expected: str) -> None:
    # An unused port: the app must be refused before NATS is even tried.
    done = await run_in_process("run", target, "--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert _one_error_line(done.stderr) == expected
    assert done.stdout == ""


async def test_run_with_unreachable_nats_prints_one_error_line() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    done = await run_in_process("run", WORKER, "--nats-url", url, "--startup-timeout", "2")
    assert done.returncode == 1
    assert _error_after_waiting(done.stderr).startswith(f"Error: cannot reach NATS at {url}: ")
    assert "Traceback" not in done.stdout


@pytest.mark.nats
async def test_run_without_the_messages_stream_prints_one_error_line() -> None:
    async with EmbeddedNats(create_streams=False) as bare:
        done = await run_in_process("run", WORKER, "--nats-url", bare.url, "--startup-timeout", "1")
    assert done.returncode == 1
    assert _error_after_waiting(done.stderr) == (
        "Error: stream 'messages' does not exist on this NATS server: "
        "start the Conveyor server first, or run with --embedded"
    )


async def test_routes_with_a_bad_app_prints_one_error_line() -> None:
    done = await run_in_process("routes", app("worker_app.py:nope"))
    assert done.returncode == 1
    assert (
        _one_error_line(done.stderr) == f"Error: {app('worker_app.py')!r} has no attribute 'nope'"
    )


async def test_debug_log_level_shows_the_traceback_of_an_app_error() -> None:
    done = await run_in_process("run", app("broken_app.py"), "--log-level", "debug")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "conveyor_driver.errors.AppLoadError" in done.stderr
    assert lines[-1].startswith("Error: importing ")


@pytest.mark.nats
async def test_debug_log_level_shows_the_traceback_of_a_missing_stream() -> None:
    async with EmbeddedNats(create_streams=False) as bare:
        done = await run_in_process(
            "run", WORKER, "--nats-url", bare.url, "--log-level", "debug", "--startup-timeout", "1"
        )
    assert done.returncode == 1
    assert "Traceback (most recent call last):" in done.stderr
    assert "conveyor_driver.errors.StreamMissingError" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("Error: stream 'messages' does not exist")


# --- item 11: what used to be a traceback is one line ------------------------------------------


async def test_http_port_in_use_is_one_line(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --http-port asks for the SDK's Prometheus reader, which this process must not install.
    monkeypatch.setattr(telemetry, "configure_from_env", lambda *_a, **_k: None)
    monkeypatch.setattr(
        "conveyor_driver.cli.configure_from_env", lambda *_a, **_k: None, raising=False
    )
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ("run", WORKER, "--nats-url", nats_server.url, "--http-port", str(port))
        result = await asyncio.to_thread(invoke, *args)
    assert one_error_line(result) == (
        f"cannot serve the probes on 0.0.0.0:{port}: address already in use; "
        "choose another --http-port (CONVEYOR_HTTP_PORT) or --http-host"
    )


@pytest.mark.nats
@pytest.mark.parametrize("wait", [False, True], ids=["emit", "emit-wait"])
async def test_emit_without_the_messages_stream_is_one_line(wait: bool) -> None:
    async with EmbeddedNats(create_streams=False) as bare:
        args = ["emit", "job", "x", "--nats-url", bare.url, *(["--wait"] if wait else [])]
        result = await asyncio.to_thread(invoke, *args)
    assert one_error_line(result) == (
        "stream 'messages' does not exist on this NATS server, so nothing stores "
        "resources.job: start the Conveyor server first, or a driver with --embedded"
    )


def test_logs_with_an_api_url_that_is_not_a_url_is_one_line() -> None:
    assert one_error_line(invoke("logs", "run-1", "--api-url", "notaurl")) == (
        "--api-url 'notaurl' is not usable: the Conveyor API URL starts with http:// or https://"
    )


@pytest.mark.parametrize("command", [("run", WORKER), ("emit", "job", "x"), ("status", WORKER)])
async def test_a_nats_url_of_another_scheme_is_one_line(
    command: tuple[str, ...], nats_server: EmbeddedNats
) -> None:
    url = nats_server.url.replace("nats://", "http://")
    result = await asyncio.to_thread(invoke, *command, "--nats-url", url)
    assert one_error_line(result) == (
        f"--nats-url {url!r} is not usable: NATS URLs start with nats://, tls://, ws:// or wss://"
    )
    env = {"CONVEYOR_NATS_URL": url}
    line = one_error_line(await asyncio.to_thread(invoke, *command, env=env))
    assert line.startswith(f"CONVEYOR_NATS_URL {url!r} is not usable: NATS URLs start with")


# --- item 13: emit sends only what the server would send, and says when nobody listens --------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("job", ""),
            "resource name '' is not usable: the Conveyor server needs a non-empty name "
            "without '/' (it addresses resources as /resources/TYPE/NAME)",
        ),
        (("job", "a/b"), "resource name 'a/b' is not usable: "),
        (("", "x"), "resource type '' is not usable: it must be non-empty, "),
        (("a.b", "x"), "resource type 'a.b' is not usable: "),
        (("job", "x", "--driver", ""), "driver '' is not usable: "),
        (("job", "x", "--event", ""), "event must not be empty"),
        (("job", "x", "--pipeline", "a/b"), "pipeline 'a/b' is not usable: "),
    ],
    ids=[
        "empty-name",
        "slash-name",
        "empty-type",
        "dotted-type",
        "empty-driver",
        "empty-event",
        "slash-pipeline",
    ],
)
async def test_emit_refuses_names_the_server_would_refuse(
    args: tuple[str, ...], expected: str, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    published = await _collect(nats_client, ">")
    result = await asyncio.to_thread(invoke, "emit", *args, "--nats-url", nats_server.url)
    assert one_error_line(result).startswith(expected)
    await nats_client.flush()
    assert [m.subject for m in published if not m.subject.startswith("$")] == []


async def test_emit_event_refuses_an_empty_name_from_python(nats_client: Client) -> None:
    from conveyor_driver.emit import emit_event
    from conveyor_driver.models import Resource

    with pytest.raises(ConfigurationError, match="resource name '' is not usable"):
        await emit_event(nats_client, Resource(name="", type="job"))


@pytest.mark.parametrize(
    ("args", "subject"),
    [
        (("job", "x"), "resources.job"),
        (("job", "x", "--driver", "builder"), "drivers.builder.resources.job"),
    ],
    ids=["broadcast", "addressed"],
)
async def test_emit_wait_says_no_driver_consumes_the_subject(
    args: tuple[str, ...], subject: str, nats_server: EmbeddedNats
) -> None:
    # A consumer exists, for another resource type: still nobody wants this subject.
    other = Driver("other")
    other.on("image")(lambda ctx: None)
    async with running(other, nats_server.url):
        started = time.monotonic()
        command = ("emit", *args, "--wait", "--timeout", "20", "--nats-url", nats_server.url)
        result = await asyncio.to_thread(invoke, *command)
    assert one_error_line(result) == (
        f"no driver consumes {subject}: no consumer of stream 'messages' filters it, so the "
        "stream keeps nothing; start a driver that handles it, then emit again"
    )
    assert time.monotonic() - started < 15  # said at once, not after --timeout


def test_subject_matching_follows_nats_wildcards() -> None:
    from conveyor_driver.emit import subject_matches

    assert subject_matches("resources.job", "resources.job")
    assert subject_matches("resources.*", "resources.job")
    assert subject_matches("drivers.>", "drivers.b.resources.job")
    assert not subject_matches("drivers.>", "drivers")
    assert not subject_matches("resources.job", "resources.jobs")
    assert not subject_matches("resources.*", "resources.job.x")
    assert not subject_matches("drivers.worker.resources.job", "drivers.builder.resources.job")


# --- entry points ----------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("module", ["conveyor_driver.cli", "conveyor_driver"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: ")
    commands = re.findall(r"^  (\w+)\s", done.stdout.split("Commands:")[1], re.MULTILINE)
    assert {"emit", "routes", "run"} <= set(commands)


# --- routes ----------------------------------------------------------------------------------


async def test_routes_lists_handlers_types_events_and_subjects() -> None:
    done = await run_in_process("routes", app("shapes_app.py:routed"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        "driver router (consumer 'router' on stream 'messages')",
        "  build: resource types pipeline, build; events *",
        "    resources.build",
        "    drivers.router.resources.build",
        "    resources.pipeline",
        "    drivers.router.resources.pipeline",
        "  deploy: resource types deployment; events create, update",
        "    resources.deployment",
        "    drivers.router.resources.deployment",
    ]


# --- emit ------------------------------------------------------------------------------------


def _emitted_run_id(stderr: str, event: str, resource: str) -> str:
    match = re.fullmatch(rf"emitted {event} {re.escape(resource)} run_id=(\S+)", stderr.strip())
    assert match, stderr
    return match.group(1)


@pytest.mark.process
async def test_emit_wait_prints_the_result_of_a_running_driver(
    nats_server: EmbeddedNats,
) -> None:
    url = nats_server.url
    async with driver_process(WORKER, "--nats-url", url) as proc:
        await proc.started()
        done = await run_in_process(
            "emit",
            "job",
            "app-1",
            "--spec",
            '{"sleep": 0.1, "repo": "git@example.org:app.git"}',
            "--pipeline",
            "ci",
            "--wait",
            "--nats-url",
            url,
        )
    assert done.returncode == 0, done.stderr
    run_id = _emitted_run_id(done.stderr, "create", "job/app-1")
    assert orjson.loads(done.stdout) == {
        "event": "driver.result",
        "run_id": run_id,
        "resource": {
            "id": "",
            "name": "app-1",
            "resource": "job",
            "pipeline": "ci",
            "metadata": {},
            "spec": {"sleep": 0.1, "repo": "git@example.org:app.git"},
        },
        "driverresult": {
            "success": True,
            "message": "",
            "data": {"pid": proc.pid, "run_id": run_id, "attempt": 1},
            "driver": "worker",
        },
    }


@pytest.mark.process
async def test_environment_variable_sets_the_nats_url_of_run_and_emit(
    nats_server: EmbeddedNats,
) -> None:
    env = clean_env(CONVEYOR_NATS_URL=nats_server.url)
    # "worker_app.py" alone: the attribute `driver` is implied.
    async with driver_process(app("worker_app.py"), env=env) as proc:
        started = await proc.started()
        done = await run_in_process(
            "emit", "job", "from-env", "--wait", env={"CONVEYOR_NATS_URL": nats_server.url}
        )
    assert started["nats"] == nats_server.url
    assert done.returncode == 0, done.stderr
    event = orjson.loads(done.stdout)
    assert event["run_id"] == _emitted_run_id(done.stderr, "create", "job/from-env")
    assert event["driverresult"]["data"]["pid"] == proc.pid


async def _collect(nc: Client, subject: str) -> list[Msg]:
    seen: list[Msg] = []

    async def on_message(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    return seen


async def test_emit_to_a_driver_publishes_on_its_pipeline_subject(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    addressed = await _collect(nats_client, "drivers.builder.resources.job")
    broadcast = await _collect(nats_client, "resources.>")
    done = await run_in_process(
        "emit",
        "job",
        "step-1",
        "--spec",
        '{"image": "alpine"}',
        "--event",
        "process",
        "--driver",
        "builder",
        "--nats-url",
        nats_server.url,
    )
    assert done.returncode == 0, done.stderr
    run_id = _emitted_run_id(done.stderr, "process", "job/step-1")
    # emit awaited the stream's PubAck, so the server routed the message before it exited.
    await nats_client.flush()
    assert broadcast == []
    assert len(addressed) == 1
    body = orjson.loads(addressed[0].data)
    assert set(body) == {"event", "payload", "id", "run_id"}
    assert body["event"] == "process"
    assert body["run_id"] == run_id
    assert body["id"]
    # As the Go server sends it: the resource JSON-encoded into a string.
    assert isinstance(body["payload"], str)
    payload = orjson.loads(body["payload"])
    assert payload["name"] == "step-1"
    assert payload["resource"] == "job"
    assert payload["spec"] == {"image": "alpine"}


async def test_emit_refuses_a_spec_that_is_not_json(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    published = await _collect(nats_client, "resources.>")
    done = await run_in_process(
        "emit", "job", "x", "--spec", "{not json", "--nats-url", nats_server.url
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("Error: Invalid value for --spec: not JSON: ")
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    await nats_client.flush()
    assert published == []


# --- --embedded --------------------------------------------------------------------------------


async def _port_open(port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@pytest.mark.nats
@pytest.mark.process
async def test_embedded_starts_nats_with_the_conveyor_streams_and_stops_it(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    async with driver_process(
        WORKER, "--embedded", "--embedded-port", str(port), "--embedded-dir", str(tmp_path)
    ) as proc:
        started = await proc.started()
        assert started["nats"] == url
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            streams = {}
            for name in ("messages", "pipeline-engine", "logs-engine"):
                config = (await js.stream_info(name)).config
                streams[name] = (config.subjects, config.retention)
        finally:
            await nc.close()
        done = await run_in_process("emit", "job", "on-embedded", "--wait", "--nats-url", url)
        proc.send(signal.SIGTERM)
        code = await proc.wait()
    assert streams == {
        "messages": (["resources.>", "events.>", "drivers.>"], RetentionPolicy.INTEREST),
        "pipeline-engine": (["pipelines.>"], RetentionPolicy.WORK_QUEUE),
        "logs-engine": (["logs.>"], RetentionPolicy.WORK_QUEUE),
    }
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["driverresult"]["data"]["pid"] == proc.pid
    assert code == 0, proc.output
    assert not await _port_open(port)


# --- --log-format json -------------------------------------------------------------------------


async def _serve_one_run(proc: DriverProcess, url: str, spec: str) -> str:
    await proc.started()
    done = await run_in_process(
        "emit", "job", "logged", "--spec", spec, "--wait", "--nats-url", url
    )
    assert done.returncode == 0, done.stderr
    proc.send(signal.SIGTERM)
    assert await proc.wait() == 0, proc.output
    return str(orjson.loads(done.stdout)["run_id"])


@pytest.mark.process
async def test_json_log_format_writes_one_object_per_stderr_line(
    nats_server: EmbeddedNats,
) -> None:
    async with driver_process(
        WORKER, "--nats-url", nats_server.url, "--log-format", "json"
    ) as proc:
        run_id = await _serve_one_run(proc, nats_server.url, '{"stdlib": "from a library"}')
    lines = proc.stderr_lines
    assert lines
    records = [parse_json_line(line) for line in lines]
    assert None not in records, proc.output
    events = [r["event"] for r in proc.records]
    assert events[0] == "driver started"
    assert events[-1] == "driver stopped"
    run_records = [r for r in proc.records if r.get("run_id") == run_id]
    assert [r["event"] for r in run_records] == [
        "handler started",
        "from a library",
        "handler finished",
        "run succeeded",
    ]
    assert all(r["driver"] == "worker" and r["timestamp"] for r in proc.records)
    assert run_records[1]["logger"] == "worker.lib"
    assert run_records[1]["level"] == "warning"
