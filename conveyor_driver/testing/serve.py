"""Serve a driver for the length of a block, in the running event loop.

No pytest here: a script (``examples/demo.py``) or a benchmark uses :func:`running` with
only the library installed; the pytest fixtures live in :mod:`.fixtures`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
from nats.js.errors import NotFoundError

from .. import protocol
from ..app import Driver
from ..settings import Settings


@contextlib.asynccontextmanager
async def running(
    driver: Driver, url: str, *, timeout: float = 20.0, **settings: object
) -> AsyncIterator[asyncio.Task[None]]:
    """Serve ``driver`` in a task until the block ends; yields once its consumer exists.

    ``settings`` are :class:`~conveyor_driver.Settings` fields (``log_format`` is ``json``
    unless given). The ``messages`` stream drops events no consumer is interested in, so
    tests must not publish before the consumer is there: this waits for it.
    """
    options: dict[str, object] = {"log_format": "json", **settings}
    task = asyncio.create_task(driver.serve(Settings(nats_urls=url, **options)))  # type: ignore[arg-type]
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if task.done():
                task.result()
                raise RuntimeError("driver stopped before its consumer existed")
            with contextlib.suppress(NotFoundError):
                await js.consumer_info(protocol.MESSAGES_STREAM, driver.name)
                break
            if loop.time() > deadline:
                raise TimeoutError(f"consumer {driver.name!r} not created in {timeout}s")
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
