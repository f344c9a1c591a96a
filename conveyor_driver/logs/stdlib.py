"""Bring records of the standard ``logging`` module into the driver's chain.

Libraries a handler calls (an HTTP client, a cloud SDK) log through ``logging``. While a
handler runs, their records should belong to that run: carry its ``run_id`` and reach the
same sinks (console, NATS, Loki). The run's logger is kept in a context variable, which
asyncio tasks and the worker threads of sync handlers inherit, so the bridge finds it
without any global registry.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

from structlog.typing import FilteringBoundLogger

_run_logger: contextvars.ContextVar[FilteringBoundLogger | None] = contextvars.ContextVar(
    "conveyor_run_logger", default=None
)
_silenced: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "conveyor_bridge_silenced", default=False
)


def run_scope(log: FilteringBoundLogger) -> contextlib.AbstractContextManager[None]:
    """Within this block, bridged records belong to the run ``log`` is bound to."""
    return _RunScope(log)


class _RunScope:
    """:func:`run_scope` as a plain class: entered once per run, it stays cheap."""

    __slots__ = ("_log", "_token")

    def __init__(self, log: FilteringBoundLogger) -> None:
        self._log = log

    def __enter__(self) -> None:
        self._token = _run_logger.set(self._log)

    def __exit__(self, *exc_info: object) -> None:
        _run_logger.reset(self._token)


def silence_bridge() -> None:
    """Keep records from the calling task out of the chain (sinks' own I/O must not loop)."""
    _silenced.set(True)


class StdlibBridge(logging.Handler):
    """A ``logging`` handler that re-emits each record through the structlog chain."""

    def __init__(self, driver_log: FilteringBoundLogger, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._driver_log = driver_log

    def emit(self, record: logging.LogRecord) -> None:
        if _silenced.get():
            return
        log = _run_logger.get() or self._driver_log
        try:
            log.log(
                record.levelno,
                record.getMessage(),
                logger=record.name,
                exc_info=record.exc_info or False,
            )
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def bridged(driver_log: FilteringBoundLogger, level: int) -> Iterator[StdlibBridge]:
    """Install the bridge on the root logger for the life of the block.

    The root level is lowered to ``level`` only when the application has not configured
    logging itself (no root handlers): an application's own set-up wins.
    """
    root = logging.getLogger()
    bridge = StdlibBridge(driver_log, level)
    configured = bool(root.handlers)
    previous_level = root.level
    if not configured:
        root.setLevel(level)
    root.addHandler(bridge)
    try:
        yield bridge
    finally:
        root.removeHandler(bridge)
        if not configured:
            root.setLevel(previous_level)
