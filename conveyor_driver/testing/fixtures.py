"""pytest fixtures for integration tests against a real nats-server.

Enable them in a ``conftest.py`` with ``pytest_plugins = ["conveyor_driver.testing.fixtures"]``
(needs ``pytest-asyncio`` and ``conveyor-driver[embedded]``). Each test gets its own server on
a free port, JetStream in a temporary directory, and the Conveyor streams.

:func:`running` lives in :mod:`conveyor_driver.testing.serve` (no pytest needed there) and
is still importable from here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest_asyncio
from nats.aio.client import Client

from ..embedded import EmbeddedNats
from .serve import running

__all__ = ["nats_client", "nats_server", "running"]


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
