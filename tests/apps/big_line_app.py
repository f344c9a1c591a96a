"""A driver run as a real process that logs what the resource spec asks for.

spec keys: ``chars`` (log one line of that many characters), ``lines`` (then log that many
numbered short lines). The result data names the process, so a test knows who handled it.
"""

from __future__ import annotations

import os
from typing import Any

from conveyor_driver import Context, Driver

driver = Driver("big-line", grace_period=5.0)


@driver.on("job")
async def work(ctx: Context) -> dict[str, Any]:
    spec = ctx.resource.spec or {}
    if "chars" in spec:
        ctx.log.info("x" * int(spec["chars"]))
    for n in range(int(spec.get("lines", 0))):
        ctx.log.info("line", n=n)
    return {"pid": os.getpid()}
