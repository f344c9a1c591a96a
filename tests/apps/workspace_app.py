"""A driver whose handler makes its workspace, works in it, says where, then may hang.

spec keys: ``report`` (a file the handler writes the workspace's path to), ``hang`` (wait
for ever after that, until the process is killed).
"""

from __future__ import annotations

import asyncio

from conveyor_driver import Context, Driver

# A long ack_wait: the killed run is not redelivered to the next process mid-test.
driver = Driver("workspaced", ack_wait=600.0, grace_period=1.0)


@driver.on("job")
async def build(ctx: Context) -> str:
    spec = ctx.resource.spec or {}
    assert ctx.workspace.is_dir()  # made here; ctx.run then runs in it
    report = spec["report"]
    # Written whole at once (mv): the test polls for it.
    await ctx.run(f'echo sources > checkout.txt && printf %s "$PWD" > {report}.tmp')
    await ctx.run(["mv", f"{report}.tmp", report], check=True)
    if spec.get("hang"):
        await asyncio.sleep(3600)
    return "built"
