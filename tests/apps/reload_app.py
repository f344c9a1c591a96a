"""A driver the ``--reload`` tests copy to a directory of their own and edit while it runs.

The result says which code ran it: :data:`VERSION` is what the tests rewrite. ``sleep``
in the spec makes a run that is still going when the code changes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from conveyor_driver import Context, Driver

VERSION = "v1"

driver = Driver("reloading", grace_period=30.0)


@driver.on("job")
async def work(ctx: Context) -> dict[str, Any]:
    ctx.log.info("handler started", version=VERSION)
    await asyncio.sleep(float((ctx.resource.spec or {}).get("sleep", 0)))
    return {"version": VERSION, "pid": os.getpid()}
