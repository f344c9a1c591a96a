"""A driver run as a real process whose handler runs ``spec["cmd"]`` with ``ctx.run``.

What a driver leaves behind when it is killed mid-command is only visible from outside it.
"""

from __future__ import annotations

from typing import Any

from conveyor_driver import Context, Driver

driver = Driver("commander", grace_period=5.0)


@driver.on("job")
async def run(ctx: Context) -> dict[str, Any]:
    result = await ctx.run(str((ctx.resource.spec or {})["cmd"]))
    return {"exit_code": result.exit_code}
