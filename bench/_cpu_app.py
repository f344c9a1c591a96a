"""The driver ``bench_workers.py`` serves: each run burns a fixed amount of pure-Python CPU.

A plain ``def`` handler, as CPU-bound work should be written (it runs in a thread, so the
event loop keeps turning), yet one process still computes on one core at a time: the GIL.
"""

from __future__ import annotations

from conveyor_driver import Context, Driver

# Two handler slots per process keep its core busy while a result and an ack travel.
driver = Driver("cpu-bench", concurrency=2, ack_wait=120.0)


@driver.on("pipeline")
def burn(ctx: Context) -> None:
    total = 0
    for i in range(int(ctx.resource.spec["loops"])):
        total += i * i
