"""A driver whose handler blocks the event loop for ``spec["block"]`` seconds.

``time.sleep`` inside ``async def``: the mistake the loop watchdog exists to name.
"""

from __future__ import annotations

import time

from conveyor_driver import Context, Driver

driver = Driver("blocker", ack_wait=6.0)


@driver.on("job")
async def block(ctx: Context) -> str:
    time.sleep(float((ctx.resource.spec or {}).get("block", 0)))  # noqa: ASYNC251
    return "unblocked"
