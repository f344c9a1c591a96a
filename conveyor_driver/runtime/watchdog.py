"""A thread that notices when the event loop stops turning, and says who is holding it.

A handler that blocks the loop (``time.sleep`` in an ``async def``, a CPU-bound step)
stops everything else in the process with it: in-progress acks, log shipping, other runs,
the health probes. Past ``ack_wait`` JetStream hands the run to another instance while
this one goes on, and nothing in the logs says why. So a thread outside the loop watches
a heartbeat the loop sets every fraction of the threshold: when it goes stale, the thread
logs one warning with the stack of the code holding the loop and the run it belongs to,
and the probes, which answer from their own thread, can report the driver unhealthy.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping

from structlog.typing import FilteringBoundLogger

DEFAULT_THRESHOLD = 1.0
_STACK_FRAMES = 12

#: What the watchdog learns about the task that holds the loop: run id, handler, ...
Describe = Callable[["asyncio.Task[object] | None"], Mapping[str, object]]


class LoopWatchdog:
    """Watches one event loop from a daemon thread; :meth:`blocked_for` is thread-safe."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        log: FilteringBoundLogger,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        describe: Describe | None = None,
        on_block: Callable[[float], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self._loop = loop
        self._log = log
        self._describe = describe
        self._on_block = on_block
        self._interval = min(threshold / 4, 0.25)
        self._last_tick = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.blocks = 0

    def start(self) -> None:
        """Begin watching; call from the loop's own thread."""
        self._loop_thread = threading.get_ident()
        self._tick()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def blocked_for(self) -> float:
        """Seconds the loop has not turned, once that exceeds the threshold; else 0."""
        lag = time.monotonic() - self._last_tick
        return lag if lag > self.threshold else 0.0

    def _tick(self) -> None:
        self._last_tick = time.monotonic()
        self._handle = self._loop.call_later(self._interval, self._tick)

    def _watch(self) -> None:
        reported_at = 0.0  # the heartbeat of the block already reported
        while not self._stop.wait(self._interval):
            last = self._last_tick
            lag = time.monotonic() - last
            if lag > self.threshold and reported_at != last:
                reported_at = last
                self.blocks += 1
                self._report(lag)
            elif reported_at and reported_at != last:
                # The loop turned again: the block that was reported is over.
                if self._on_block is not None:
                    self._on_block(last - reported_at)
                reported_at = 0.0

    def _report(self, lag: float) -> None:
        frame = sys._current_frames().get(self._loop_thread)
        stack = "".join(traceback.format_stack(frame, limit=_STACK_FRAMES)) if frame else ""
        run: Mapping[str, object] = {}
        if self._describe is not None:
            try:
                task = asyncio.current_task(self._loop)
            except RuntimeError:
                task = None
            run = self._describe(task)
        self._log.warning(
            "event loop blocked: a handler is holding it (use await, or a sync handler)",
            blocked_for=round(lag, 1),
            threshold=self.threshold,
            stack=stack,
            **run,
        )
