"""A driver whose handlers raise what the spec names: ``{"raise": "SystemExit"}``.

``BaseException`` subclasses raised by a handler must fail the run, never the process;
``sync: true`` raises from a sync handler, which runs in a thread.
"""

from __future__ import annotations

import os

from conveyor_driver import Context, Driver

driver = Driver("raiser", max_attempts=2, grace_period=5.0)

_RAISE: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
}


def _maybe_raise(ctx: Context) -> dict[str, object]:
    spec = ctx.resource.spec or {}
    if "raise" in spec:
        raise _RAISE[spec["raise"]]()
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@driver.on("async-job")
async def async_job(ctx: Context) -> dict[str, object]:
    return _maybe_raise(ctx)


@driver.on("sync-job")
def sync_job(ctx: Context) -> dict[str, object]:
    return _maybe_raise(ctx)
