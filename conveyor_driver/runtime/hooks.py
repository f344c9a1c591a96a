"""Running a driver's lifecycle hooks: the runtime's job, not the registry's.

:meth:`~conveyor_driver.Driver.on_startup` and :meth:`~conveyor_driver.Driver.on_shutdown`
only record functions; the server calls them at the right moments. Keeping the calling
here means :mod:`conveyor_driver.app` never needs the runtime, and the runtime needs the
app only for its types.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..app import Hook


async def call_hook(hook: Hook) -> None:
    """Run a lifecycle hook whether it is a coroutine function or a plain one."""
    outcome = hook()
    if isinstance(outcome, Awaitable):
        await outcome
