"""A driver run as a real process by the CLI tests; the resource spec says what it does.

spec keys: ``sleep`` (seconds the handler takes), ``stdlib`` (a line to log through the
standard ``logging`` module as well). The result data names the process and the delivery,
so a test can tell which instance handled which run, and on which attempt.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from conveyor_driver import Context, Driver

driver = Driver("worker", grace_period=30.0)
# The same driver name, hence the same durable consumer, with a grace period too short for
# a slow run: what a shutdown does to a run it cannot wait for.
impatient = Driver("worker", grace_period=0.5)
# A short ack_wait: the run of a worker killed mid-run comes back within seconds.
nimble = Driver("nimble", ack_wait=3.0, grace_period=30.0)
# Every process of it dies at start: what a supervisor must not restart forever.
doomed = Driver("doomed")


@doomed.on_startup
def _refuse() -> None:
    raise RuntimeError("the cache this driver needs is unreachable")


async def work(ctx: Context) -> dict[str, Any]:
    spec = ctx.resource.spec or {}
    ctx.log.info("handler started", pid=os.getpid(), attempt=ctx.attempt)
    if "stdlib" in spec:
        logging.getLogger("worker.lib").warning(spec["stdlib"])
    await asyncio.sleep(float(spec.get("sleep", 0)))
    ctx.log.info("handler finished")
    return {"pid": os.getpid(), "run_id": ctx.run_id, "attempt": ctx.attempt}


for instance in (driver, impatient, nimble, doomed):
    instance.on("job")(work)
