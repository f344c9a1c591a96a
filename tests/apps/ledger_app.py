"""A driver for the run-ledger tests: each handler start is appended to ``spec["calls"]``
(a file; ``<pid> <run id> <attempt> <unix time>`` a line), so a test counts real runs
across processes; ``spec["sleep"]`` makes it slow.

``CONVEYOR_TEST_ACK_WAIT`` (seconds, default 2) gives it a longer ``ack_wait``: the
cluster test's elections take longer than 2 s.

With ``CONVEYOR_TEST_DIE_AFTER_PUBLISH=1`` in its environment, the process kills itself
(SIGKILL) right after a result's PubAck and before the ack: the crash point that must
neither lose the result nor publish it twice. With ``CONVEYOR_TEST_STOP_AFTER_DECIDE=1``
it stops itself (SIGSTOP) right after recording its first decision in the ledger, before
publishing the result; the test lets it go on (SIGCONT).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from conveyor_driver import Context, Driver
from conveyor_driver.runtime.ledger import RunLedger, RunRecord
from conveyor_driver.runtime.settlement import Admission, Settlement

driver = Driver(
    "ledgered",
    ack_wait=float(os.environ.get("CONVEYOR_TEST_ACK_WAIT", "2")),
    grace_period=1.0,
)


@driver.on("job")
async def job(ctx: Context) -> dict[str, Any]:
    spec = ctx.resource.spec or {}
    line = f"{os.getpid()} {ctx.run_id} {ctx.attempt} {time.time():.3f}\n"
    await asyncio.to_thread(_note_call, Path(spec["calls"]), line)
    await asyncio.sleep(float(spec.get("sleep", 0)))
    ctx.log.info("handler finished", pid=os.getpid())
    return {"pid": os.getpid()}


def _note_call(calls: Path, line: str) -> None:
    with calls.open("a") as file:
        file.write(line)


if os.environ.get("CONVEYOR_TEST_DIE_AFTER_PUBLISH"):
    _publish = Settlement.publish_result

    async def _publish_then_die(self: Settlement, *args: Any, **kwargs: Any) -> Admission | None:
        published = await _publish(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return published

    Settlement.publish_result = _publish_then_die  # type: ignore[method-assign]


if os.environ.get("CONVEYOR_TEST_STOP_AFTER_DECIDE"):
    _decide = RunLedger.decide
    _stopped: list[bool] = []

    async def _decide_then_stop(self: RunLedger, *args: Any, **kwargs: Any) -> RunRecord:
        decided = await _decide(self, *args, **kwargs)
        if not _stopped:
            _stopped.append(True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return decided

    RunLedger.decide = _decide_then_stop  # type: ignore[method-assign]
