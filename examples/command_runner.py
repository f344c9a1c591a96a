"""An example driver: run the shell command a resource's spec names, stream its output.

    conveyor-driver run examples/command_runner.py --embedded --embedded-port 4222
    conveyor-driver emit command demo --spec '{"command": "echo hello"}' --wait

The resource spec: ``{"command": "make test", "timeout": 600}``. A command that exits
non-zero is a permanent failure (the build is red; retrying will not make it green), and so
is a spec without a command; a command that outlives its timeout is killed, with everything
it started, and reported as failed.
"""

from __future__ import annotations

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
    result = await ctx.run(command, timeout=timeout)
    output = result.stdout.splitlines()[-_OUTPUT_TAIL:]
    data = {"exit_code": result.exit_code, "output": output}
    if result.timed_out:
        raise Fail(f"command timed out after {timeout:g}s", data=data)
    if result.exit_code != 0:
        raise Fail(f"command exited with {result.exit_code}", data=data)
    return Result.ok("command succeeded", data=data)
