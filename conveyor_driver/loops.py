"""Which event loop serves a driver: uvloop when it is installed, else asyncio's own.

Why it matters: a driver's dispatch is mostly event-loop work (socket reads, callbacks,
futures), and uvloop does that work in C; ``make bench`` measures what it buys. Why a
choice at all: uvloop is a C extension that may be missing (Windows, PyPy, a platform
without a wheel), and an operator chasing a suspected loop bug wants the stock loop back
without a rebuild (``--loop asyncio``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .errors import ConfigurationError

T = TypeVar("T")

#: ``--loop`` / ``CONVEYOR_LOOP``: ``auto`` is uvloop when importable, else asyncio.
LOOPS = ("auto", "asyncio", "uvloop")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> LoopFactory | None:
    """What ``asyncio.Runner`` should build the loop with; None is asyncio's default loop.

    Asking for uvloop where it is not installed is a configuration error, not a silent
    fallback: the operator asked for something specific.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigurationError(
                "--loop uvloop, but uvloop is not installed (pip install uvloop, or --loop asyncio)"
            ) from None
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run(coroutine: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run(coroutine)`` on the loop ``choice`` names."""
    try:
        factory = loop_factory(choice)
    except BaseException:
        coroutine.close()  # never awaited: say nothing about it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which loop is running, for the start-up line."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
