"""pytest fixtures for integration tests against a real nats-server.

Enable them in a ``conftest.py`` with ``pytest_plugins = ["conveyor_driver.testing.fixtures"]``
(needs ``pytest-asyncio`` and ``conveyor-driver[embedded]``). Each test gets its own server on
a free port, JetStream in a temporary directory, and the Conveyor streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest_asyncio
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from .. import protocol
from ..app import Driver
from ..embedded import EmbeddedNats
from ..settings import Settings


@pytest_asyncio.fixture
async def nats_server() -> AsyncIterator[EmbeddedNats]:
    """A fresh nats-server with the three Conveyor streams."""
    async with EmbeddedNats() as server:
        yield server


@pytest_asyncio.fixture
async def nats_client(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    """A plain client of :func:`nats_server`, for publishing events and reading results."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running(
    driver: Driver, url: str, *, timeout: float = 20.0, **settings: object
) -> AsyncIterator[asyncio.Task[None]]:
    """Serve ``driver`` in a task until the block ends; yields once its consumer exists.

    The ``messages`` stream drops events no consumer is interested in, so tests must not
    publish before the consumer is there: this waits for it.
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
