"""A driver that reports how its process's garbage collector is set (tests/test_heap.py)."""

from __future__ import annotations

import gc
from typing import Any

from conveyor_driver import Context, Driver

driver = Driver("heap")


@driver.on("job")
async def report(ctx: Context) -> dict[str, Any]:
    return {"young": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}
