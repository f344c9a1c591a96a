"""``ctx.run`` against real processes: streamed lines, exit codes, bounded capture, kills."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from apps.harness import app, driver_process
from nats.aio.client import Client
from nats.aio.msg import Msg

from conveyor_driver import Context, Driver, Fail, Resource, Result
from conveyor_driver._reaper import REAPER, Reaper
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.process import CAPTURE_LIMIT, run_command
from conveyor_driver.testing import FakeContext
from conveyor_driver.testing.fixtures import running

TIMEOUT = 30.0


def fake() -> FakeContext:
    return FakeContext(resource={"name": "app", "resource": "pipeline"})


def streamed(ctx: FakeContext, stream: str) -> list[str]:
    return [entry["event"] for entry in ctx.logs if entry.get("stream") == stream]


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (PID 1 in a container may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_dead(pid: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while alive(pid):
        assert loop.time() < deadline, f"process {pid} is still running"
        await asyncio.sleep(0.05)


def written_pid(path: Path) -> int | None:
    """The pid a command wrote into ``path``, once its line is complete."""
    text = path.read_text() if path.exists() else ""
    return int(text) if text.endswith("\n") else None


async def read_pid(path: Path) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while (pid := written_pid(path)) is None:
        assert loop.time() < deadline, f"{path} was never written"
        await asyncio.sleep(0.02)
    return pid


async def test_shell_string_streams_each_line_with_its_stream_and_returns_the_exit_code() -> None:
    ctx = fake()
    result = await ctx.run("echo one; echo two >&2; echo three; exit 3")

    assert result.exit_code == 3
    assert not result.ok and not result.timed_out
    assert result.args == "echo one; echo two >&2; echo three; exit 3"
    assert (result.stdout, result.stderr) == ("one\nthree\n", "two\n")
    assert streamed(ctx, "stdout") == ["one", "three"]
    assert streamed(ctx, "stderr") == ["two"]
    first, last = ctx.logs[0], ctx.logs[-1]
    assert (first["event"], first["command"]) == ("command started", result.args)
    assert (last["event"], last["exit_code"]) == ("command finished", 3)
    # Output lines are the run's lines: they carry its context like any ctx.log call.
    assert {entry["run_id"] for entry in ctx.logs} == {ctx.run_id}
    assert all(entry["level"] == "info" for entry in ctx.logs)


@pytest.mark.process
async def test_argv_list_is_not_split_by_a_shell_and_order_is_kept_per_stream() -> None:
    ctx = fake()
    script = (
        "import sys\n"
        "print(sys.argv[1], flush=True)\n"
        "for i in range(200):\n"
        "    print(f'out {i}', flush=True)\n"
        "    print(f'err {i}', file=sys.stderr, flush=True)\n"
    )
    result = await ctx.run([sys.executable, "-c", script, "a b; echo no"])

    assert result.exit_code == 0 and result.ok
    assert result.args == (sys.executable, "-c", script, "a b; echo no")
    assert streamed(ctx, "stdout") == ["a b; echo no", *(f"out {i}" for i in range(200))]
    assert streamed(ctx, "stderr") == [f"err {i}" for i in range(200)]


async def test_a_last_line_without_newline_is_still_logged() -> None:
    ctx = fake()
    result = await ctx.run("printf 'first\\nlast'")

    assert streamed(ctx, "stdout") == ["first", "last"]
    assert result.stdout == "first\nlast\n"


@pytest.mark.process
async def test_captured_output_keeps_only_the_tail_but_every_line_is_logged() -> None:
    ctx = fake()
    count = 20_000
    lines = [f"line-{i:05d}" for i in range(count)]
    assert sum(len(line) + 1 for line in lines) > 3 * CAPTURE_LIMIT
    script = f"for i in range({count}): print(f'line-{{i:05d}}')"
    result = await ctx.run([sys.executable, "-c", script])

    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        if size + len(line) + 1 > CAPTURE_LIMIT:
            break
        kept.insert(0, line)
        size += len(line) + 1
    assert result.stdout == "".join(line + "\n" for line in kept)
    assert result.stdout.endswith("line-19999\n")
    assert streamed(ctx, "stdout") == lines


@pytest.mark.process
async def test_a_line_longer_than_the_reader_limit_is_split_without_losing_text() -> None:
    ctx = fake()
    script = "import sys; sys.stdout.write('x' * 200_000 + '\\nafter\\n' + 'y' * 70_000 + '\\n')"
    result = await ctx.run([sys.executable, "-c", script])

    pieces = streamed(ctx, "stdout")
    assert result.exit_code == 0
    assert pieces[-1] == "y" * (70_000 - 64 * 1024)
    assert "after" in pieces
    split = pieces.index("after")
    assert "".join(pieces[:split]) == "x" * 200_000
    assert "".join(pieces[split + 1 :]) == "y" * 70_000
    assert all(0 < len(piece) <= 64 * 1024 for piece in pieces)


async def test_check_raises_fail_on_a_non_zero_exit() -> None:
    ctx = fake()
    with pytest.raises(Fail) as failure:
        await ctx.run("echo broken >&2; exit 4", check=True)
    assert failure.value.message == "command exited with 4"
    assert failure.value.data == {"exit_code": 4, "stderr": "broken\n"}

    assert (await ctx.run("true", check=True)).exit_code == 0


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    ctx = fake()
    child = tmp_path / "child.pid"
    result = await ctx.run(f"sleep 300 & echo $! > {child}; echo waiting; wait", timeout=2.0)

    assert result.timed_out and not result.ok
    # SIGTERM first: a build tool gets its chance to clean up (SIGKILL follows if need be).
    assert result.exit_code == -signal.SIGTERM
    assert streamed(ctx, "stdout") == ["waiting"]
    await wait_dead(await read_pid(child))
    last = ctx.logs[-1]
    assert (last["event"], last["level"], last["timeout"]) == (
        "command timed out; process group stopped",
        "warning",
        2.0,
    )


@pytest.mark.process
async def test_timeout_with_check_raises_fail() -> None:
    ctx = fake()
    with pytest.raises(Fail) as failure:
        await ctx.run(
            [sys.executable, "-c", "import time; time.sleep(300)"], timeout=0.5, check=True
        )
    assert failure.value.message == "command timed out after 0.5s"
    assert failure.value.data == {"exit_code": -signal.SIGTERM, "stderr": ""}


async def test_cancelling_the_handler_kills_the_process_group(tmp_path: Path) -> None:
    ctx = fake()
    shell, child = tmp_path / "shell.pid", tmp_path / "child.pid"

    async def handler(ctx: Context) -> Result:
        await ctx.run(f"echo $$ > {shell}; sleep 300 & echo $! > {child}; wait")
        return Result.ok("never")

    task = asyncio.create_task(handler(ctx))
    shell_pid, child_pid = await read_pid(shell), await read_pid(child)
    assert alive(child_pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_dead(shell_pid)
    await wait_dead(child_pid)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.mark.process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper is Linux-only")
async def test_a_sigkilled_driver_takes_the_commands_process_group_with_it(
    nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    shell, child = tmp_path / "shell.pid", tmp_path / "child.pid"
    # Longer than any deadline below: only a kill ends it within the test.
    cmd = f"echo $$ > {shell}; sleep 300 & echo $! > {child}; wait"
    shell_pid: int | None = None
    try:
        async with driver_process(
            app("commands_app.py:driver"), "--nats-url", nats_server.url
        ) as proc:
            await proc.started()
            await emit_event(nats_client, Resource("orphans", "job", spec={"cmd": cmd}))
            shell_pid, child_pid = await read_pid(shell), await read_pid(child)
            assert alive(shell_pid) and alive(child_pid)
            proc.send(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
        await wait_dead(shell_pid)
        await wait_dead(child_pid)
    finally:
        if shell_pid is not None:  # the command's group, whatever the outcome
            _kill_group(shell_pid)


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


async def _reaped(process: subprocess.Popen[bytes]) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), TIMEOUT)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper is Linux-only")
async def test_the_reaper_kills_the_groups_still_registered_when_its_pipe_closes() -> None:
    kept, finished = _sleeper(), _sleeper()
    try:
        reaper = Reaper()
        reaper.register(kept.pid)
        reaper.register(finished.pid)
        reaper.unregister(finished.pid)
        reaper.close()  # what the kernel does to the pipe when the driver dies
        assert await _reaped(kept) == -signal.SIGKILL
        assert finished.poll() is None
    finally:
        for process in (kept, finished):
            _kill_group(process.pid)
            process.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper is Linux-only")
async def test_a_killed_reaper_is_replaced_and_told_every_running_group() -> None:
    first, second = _sleeper(), _sleeper()
    try:
        reaper = Reaper()
        reaper.register(first.pid)
        helper = reaper._helper
        assert helper is not None
        helper.kill()
        helper.wait()
        reaper.register(second.pid)
        assert reaper._helper is not None and reaper._helper.pid != helper.pid
        reaper.close()
        assert await _reaped(first) == -signal.SIGKILL
        assert await _reaped(second) == -signal.SIGKILL
    finally:
        for process in (first, second):
            _kill_group(process.pid)
            process.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper is Linux-only")
def test_a_forked_child_does_not_hold_the_reapers_pipe_open() -> None:
    """Or the helper would not see EOF when the driver dies while the child lives on."""
    sleeper = _sleeper()
    try:
        REAPER.register(sleeper.pid)
        write_fd = REAPER._write_fd
        assert write_fd is not None
        pid = os.fork()
        if pid == 0:  # the child: report whether the descriptor is still open, and go
            try:
                os.fstat(write_fd)
            except OSError:
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert REAPER._write_fd == write_fd  # the parent's end is untouched
    finally:
        REAPER.unregister(sleeper.pid)
        _kill_group(sleeper.pid)
        sleeper.wait()


async def test_env_is_added_to_the_environment_and_path_is_kept() -> None:
    ctx = fake()
    result = await ctx.run(
        'echo "$CONVEYOR_TEST_VAR"; echo "$PATH"', env={"CONVEYOR_TEST_VAR": "v 1"}
    )

    assert result.stdout == f"v 1\n{os.environ['PATH']}\n"


@pytest.mark.process
async def test_cwd_is_honoured(tmp_path: Path) -> None:
    ctx = fake()
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = await ctx.run([sys.executable, "-c", "import os; print(os.getcwd())"], cwd=workdir)

    # getcwd() reports the physical path; tmp_path may sit behind a symlink.
    assert result.stdout == f"{workdir.resolve()}\n"


async def test_ctx_run_through_the_runtime_streams_to_nats(
    nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("runner")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        result = await ctx.run(["sh", "-c", "echo built; echo careful >&2; exit 2"])
        return Result.ok("ran", data={"exit_code": result.exit_code, "stdout": result.stdout})

    entries: list[dict[str, Any]] = []

    async def collect(msg: Msg) -> None:
        entries.append(json.loads(msg.data))

    await nats_client.subscribe("logs.>", cb=collect)
    async with running(driver, nats_server.url), watch_results(nats_client) as watch:
        message = await emit_event(nats_client, Resource(name="app", type="pipeline"))
        event = await watch.wait(message.run_id, timeout=TIMEOUT)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while not any(e["message"].startswith("run succeeded") for e in entries):
            assert loop.time() < deadline, "run lines did not reach NATS"
            await asyncio.sleep(0.02)

    assert event.driverresult.data == {"exit_code": 2, "stdout": "built\n"}
    messages = [e["message"] for e in entries if e["runid"] == message.run_id]
    assert len(messages) == 5
    assert messages[0] == "command started command=sh -c echo built; echo careful >&2; exit 2"
    assert sorted(messages[1:3]) == ["built stream=stdout", "careful stream=stderr"]
    assert messages[3].startswith("command finished exit_code=2 duration=")
    assert messages[4] == "run succeeded result=ran"


async def test_a_command_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    ctx = fake()
    child = tmp_path / "child.pid"
    started = time.monotonic()
    result = await run_command(
        ctx.log,
        f"trap '' TERM; sleep 300 & echo $! > {child}; wait; wait",
        timeout=0.5,
        kill_grace=1.0,
    )
    assert result.timed_out
    assert result.exit_code == -signal.SIGKILL
    assert 1.4 < time.monotonic() - started < 20
    await wait_dead(await read_pid(child))
