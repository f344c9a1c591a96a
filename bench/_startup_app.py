"""The driver ``bench_startup.py`` launches: one handler that does nothing."""

from conveyor_driver import Context, Driver

driver = Driver("startup-bench")


@driver.on("pipeline")
async def noop(ctx: Context) -> None:
    return None
