"""Unit tests of the example driver: real shell commands, a FakeContext, no NATS."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from command_runner import driver, run_command

from conveyor_driver import Fail, Result
from conveyor_driver.testing import FakeContext, dispatch


def command(spec: Any, resource_type: str = "command") -> FakeContext:
    return FakeContext({"name": "demo", "resource": resource_type, "spec": spec})


def output_lines(ctx: FakeContext, stream: str = "stdout") -> list[str]:
    return [str(entry["event"]) for entry in ctx.logs if entry.get("stream") == stream]


def is_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_until_gone(pid: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not is_gone(pid):
        assert loop.time() < deadline, f"process {pid} survived"
        await asyncio.sleep(0.05)


async def test_success_returns_exit_code_zero_and_logs_each_line_in_order() -> None:
    ctx = command({"command": "echo one; echo two; echo three"})
    result = await run_command(ctx)
    assert result == Result.ok(
        "command succeeded", data={"exit_code": 0, "output": ["one", "two", "three"]}
    )
    events = [entry["event"] for entry in ctx.logs]
    assert events == ["command started", "one", "two", "three", "command finished"]
    assert ctx.logs[0]["command"] == "echo one; echo two; echo three"
    assert ctx.logs[-1]["exit_code"] == 0
    assert output_lines(ctx) == ["one", "two", "three"]
    assert all(entry["level"] == "info" for entry in ctx.logs)


async def test_stderr_lines_are_logged_but_not_part_of_the_output() -> None:
    ctx = command({"command": "echo out; echo warn-1 >&2; echo warn-2 >&2"})
    result = await run_command(ctx)
    assert result.data == {"exit_code": 0, "output": ["out"]}
    assert output_lines(ctx, "stderr") == ["warn-1", "warn-2"]
    assert output_lines(ctx) == ["out"]


async def test_result_keeps_only_the_tail_but_the_log_has_every_line() -> None:
    ctx = command({"command": "seq 1 25"})
    result = await run_command(ctx)
    assert result.data == {"exit_code": 0, "output": [str(n) for n in range(6, 26)]}
    assert output_lines(ctx) == [str(n) for n in range(1, 26)]


async def test_non_zero_exit_raises_fail_with_the_exit_code() -> None:
    ctx = command({"command": "echo compiling; exit 3"})
    with pytest.raises(Fail) as info:
        await run_command(ctx)
    assert info.value.message == "command exited with 3"
    assert info.value.data == {"exit_code": 3, "output": ["compiling"]}
    assert output_lines(ctx) == ["compiling"]
    assert ctx.logs[-1]["event"] == "command finished"
    assert ctx.logs[-1]["exit_code"] == 3


async def test_unknown_program_fails_with_the_shells_exit_code() -> None:
    ctx = command({"command": "conveyor-no-such-program-xyz"})
    with pytest.raises(Fail) as info:
        await run_command(ctx)
    assert info.value.message == "command exited with 127"
    assert info.value.data == {"exit_code": 127, "output": []}
    (complaint,) = output_lines(ctx, "stderr")
    assert "conveyor-no-such-program-xyz" in complaint


@pytest.mark.parametrize("spec", [{}, {"command": ""}, {"command": "   "}, {"command": 3}, None])
async def test_missing_command_raises_fail(spec: Any) -> None:
    ctx = command(spec)
    with pytest.raises(Fail) as info:
        await run_command(ctx)
    assert info.value.message == "spec.command is missing: nothing to run"
    assert ctx.logs == []


async def test_timeout_kills_the_command_and_raises_fail() -> None:
    # The shell prints the pid of its background sleep, so the test can check that the
    # whole process group died, not only the shell.
    ctx = command({"command": "sleep 30 & echo $!; wait", "timeout": 1})
    with pytest.raises(Fail) as info:
        await run_command(ctx)
    assert info.value.message == "command timed out after 1s"
    assert isinstance(info.value.data, dict)
    (pid_text,) = info.value.data["output"]
    assert info.value.data == {"exit_code": -signal.SIGTERM, "output": [pid_text]}
    warning = ctx.logs[-1]
    assert (warning["event"], warning["level"], warning["timeout"]) == (
        "command timed out; process group stopped",
        "warning",
        1.0,
    )
    await wait_until_gone(int(pid_text))


async def test_cancelled_handler_kills_the_command_and_stays_cancelled() -> None:
    ctx = command({"command": "sleep 30 & echo $!; wait"})
    task = asyncio.create_task(run_command(ctx))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not output_lines(ctx):
        assert loop.time() < deadline, "the command never started"
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_gone(int(output_lines(ctx)[0]))


async def test_dispatch_routes_both_resource_types_to_the_handler() -> None:
    for resource_type, event in (("command", "create"), ("pipeline", "process")):
        report = await dispatch(
            driver,
            {"name": "demo", "resource": resource_type, "spec": {"command": "echo hi"}},
            event=event,
        )
        assert report.result == Result.ok(
            "command succeeded", data={"exit_code": 0, "output": ["hi"]}
        )
        assert (report.action, report.kind) == ("ack", "success")
        assert [e["event"] for e in report.logs if e.get("stream") == "stdout"] == ["hi"]


async def test_dispatch_of_a_failing_command_is_a_failure_without_retry() -> None:
    report = await dispatch(
        driver, {"name": "demo", "resource": "command", "spec": {"command": "exit 2"}}
    )
    assert report.result == Result.fail(
        "command exited with 2", data={"exit_code": 2, "output": []}
    )
    assert (report.action, report.kind) == ("ack", "failure")


async def test_dispatch_of_another_resource_type_is_not_handled() -> None:
    report = await dispatch(driver, {"name": "demo", "resource": "deployment", "spec": {}})
    assert (report.result, report.action, report.kind) == (None, "ack", "skipped")


def test_example_driver_configuration() -> None:
    assert driver.name == "command-runner"
    assert driver.concurrency == 4
    assert driver.subjects == [
        "resources.command",
        "drivers.command-runner.resources.command",
        "resources.pipeline",
        "drivers.command-runner.resources.pipeline",
    ]
    (route,) = driver.routes
    assert route.handler is run_command
    assert route.events is None
