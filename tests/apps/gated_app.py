"""A driver whose handler waits for a gate file and leaves a mark: backlog tests.

spec keys: ``gate`` (the handler waits until this file exists), ``mark`` (a file the
handler creates before it returns, the side effect a test looks for).
"""

from __future__ import annotations

import time
from pathlib import Path

from conveyor_driver import Context, Driver

driver = Driver("gated", concurrency=1)


@driver.on("job")
def work(ctx: Context) -> str:  # a plain function, in a thread: it may poll
    spec = ctx.resource.spec or {}
    if "gate" in spec:
        while not Path(spec["gate"]).exists():
            time.sleep(0.05)
    if "mark" in spec:
        Path(spec["mark"]).touch()
    return "done"
