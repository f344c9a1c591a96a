"""When a serving process stops on its own: ``--max-runs`` runs done, or ``--exit-when-idle``.

A driver normally serves until a signal. A one-shot job (a Kubernetes Job, a KEDA
ScaledJob) or a draining instance instead ends once its work is done, through the same
graceful shutdown a signal starts, and so with exit status 0. What counts as a run, and why
such a process never takes a message it will not run, is in
docs/protocol.md#one-shot-and-draining-modes.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any

    from .consumer import Consumer


class RunBudget:
    """``--max-runs`` counted down: how many more messages the consumer may take.

    Every message the consumer holds or has asked for is reserved against it, so a process
    never pulls one it would not run; :attr:`spent` is set once the last run is counted.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self.spent = asyncio.Event()

    def left(self, reserved: int) -> int:
        """Runs still free besides the ``reserved`` messages (a large number: no limit)."""
        return sys.maxsize if self.limit is None else self.limit - self.used - reserved

    def count(self) -> None:
        """One more run decided."""
        self.used += 1
        if self.limit is not None and self.used >= self.limit:
            self.spent.set()


def concurrency_within(concurrency: int, max_runs: int | None) -> int:
    """No more handler slots than runs left: ``--max-runs 1`` runs one handler at a time."""
    return concurrency if max_runs is None else min(concurrency, max_runs)


async def until_stopped(stop: asyncio.Event, consumer: Consumer, idle: float | None) -> str:
    """Wait for the first reason to stop (a signal, the runs done, an idle spell); its name."""
    reasons: dict[str, Coroutine[Any, Any, object]] = {
        "signal": stop.wait(),
        "max runs reached": consumer.budget.spent.wait(),
    }
    if idle is not None:
        reasons["idle"] = _until_idle(consumer, idle)
    waiting = {asyncio.ensure_future(coroutine): reason for reason, coroutine in reasons.items()}
    try:
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    return next(reason for task, reason in waiting.items() if task in done)


async def _until_idle(consumer: Consumer, seconds: float) -> None:
    """Return once nothing ran and nothing was delivered for ``seconds``.

    A wake-up finding the consumer busy sleeps the whole spell again; one finding it idle
    sleeps what is left of it, so the stop comes ``seconds`` after the last activity.
    """
    while True:
        idle = consumer.idle_for()
        if idle >= seconds:
            return
        await asyncio.sleep(seconds - idle)
