"""An example driver: run the shell command a resource's spec names, stream its output.

    conveyor-driver run examples/command_runner.py --embedded
    conveyor-driver emit command demo --spec '{"command": "echo hello"}' --wait

The resource spec: ``{"command": "make test", "timeout": 600}``. A command that exits
non-zero is a permanent failure (the build is red; retrying will not make it green); a
spec without a command is a permanent failure too; a command that outlives its timeout is
killed and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

from conveyor_driver import Context, Driver, Fail, Result

driver = Driver("command-runner", concurrency=4)

_OUTPUT_TAIL = 20


@driver.on("command", "pipeline")
async def run_command(ctx: Context) -> Result:
    spec: Any = ctx.resource.spec
    command = spec.get("command") if isinstance(spec, dict) else None
    if not isinstance(command, str) or not command.strip():
        raise Fail("spec.command is missing: nothing to run")
    timeout = float(spec.get("timeout", 600))
    ctx.log.info("running", command=command)
    process = await asyncio.create_subprocess_shell(
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    tail: list[str] = []
    try:
        await asyncio.wait_for(_stream(ctx, process, tail), timeout)
    except (TimeoutError, asyncio.CancelledError):
        _kill_group(process)
        await process.wait()
        if isinstance(asyncio.current_task(), asyncio.Task) and _cancelling():
            raise
        raise Fail(f"command timed out after {timeout:g}s", data={"output": tail}) from None
    code = process.returncode
    if code != 0:
        raise Fail(f"command exited with {code}", data={"exit_code": code, "output": tail})
    return Result.ok("command succeeded", data={"exit_code": 0, "output": tail})


async def _stream(ctx: Context, process: asyncio.subprocess.Process, tail: list[str]) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        ctx.log.info(line, stream="output")
        tail.append(line)
        del tail[:-_OUTPUT_TAIL]
    await process.wait()


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
