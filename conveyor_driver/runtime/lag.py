"""``conveyor-driver lag``: a driver's backlog on ``/metrics``, and nothing else.

An autoscaler can scale a driver from zero only if something reports the backlog while no
instance runs. This process connects, makes sure the driver's consumer exists, reads its
backlog every ``--lag-interval`` seconds and serves ``/healthz``, ``/readyz`` and
``/metrics``. It runs no handler and never pulls: it takes no deliveries, so the ack
pending it reports are the workers'.

It creates the durable consumer when it is missing, and never changes one that exists:

- The ``messages`` stream has interest retention: an event that no consumer's filter
  matches is not kept at all. A driver deployed at zero instances, before its consumer
  ever existed, would lose every event, report a backlog of 0 for ever and never be
  scaled up. Creating the consumer with the configuration the driver itself would create
  is what makes scaling from zero safe.
- An existing consumer is left as it is: during a rolling upgrade this process and the
  workers may run different versions of the app, and two writers of one configuration
  would flip it back and forth. The consuming instances stay the ones that update it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

from nats.js.errors import NotFoundError
from structlog.typing import FilteringBoundLogger

from .. import protocol
from ..errors import ConfigurationError
from ..logs.chain import build_logger
from ..settings import Settings
from ..tls import load_tls
from .backlog import BacklogWatch
from .connection import connect
from .consumer import ensure_consumer, ensuring_what
from .probes import STALL_AFTER, DriverState, start_probes
from .startup import until_ready

if TYPE_CHECKING:
    from nats.aio.client import Client

    from ..app import Driver

#: The stream-not-found code: start-up waits for the stream rather than create anything.
_STREAM_NOT_FOUND = 10059


async def serve_lag(driver: Driver, settings: Settings) -> None:
    """Export ``driver``'s backlog until SIGINT/SIGTERM or until cancelled."""
    if settings.http_port is None:
        raise ConfigurationError(
            "conveyor-driver lag serves the backlog on /metrics: give it --http-port "
            "(or CONVEYOR_HTTP_PORT)"
        )
    driver.check()  # the consumer it may create filters the handlers' subjects
    tls = load_tls(settings.tls_cert, settings.tls_key, settings.tls_ca)
    log = build_logger(level=settings.log_level, fmt=settings.log_format).bind(driver=driver.name)
    state = DriverState(
        stall_after=max(STALL_AFTER, 3 * settings.lag_interval), doing="watching the backlog"
    )
    async with contextlib.AsyncExitStack() as stack:
        probes = await start_probes(state, settings.http_port, settings.http_host)
        stack.push_async_callback(probes.cleanup)
        deadline = asyncio.get_running_loop().time() + settings.startup_timeout
        nc = await connect(
            settings.nats_urls,
            name=f"conveyor-driver-lag:{driver.name}",
            log=log,
            tls=tls.ssl_context() if tls is not None else None,
            timeout=settings.startup_timeout,
        )
        stack.push_async_callback(nc.close)
        restore = functools.partial(_create_if_missing, nc, driver, log)
        await until_ready(restore, ensuring_what(driver), nc=nc, deadline=deadline, log=log)
        watch = BacklogWatch(nc, driver.name, settings.lag_interval, log, restore=restore)
        stop = asyncio.Event()
        with _stopped_by_signals(stop):
            watch.start()
            stack.push_async_callback(watch.stop)
            state.nc = nc
            state.consumer = watch
            log.info(
                "backlog exporter started",
                consumer=driver.name,
                interval=settings.lag_interval,
                port=settings.http_port,
            )
            await stop.wait()
            state.stopping = True
            log.info("shutting down")
    log.info("backlog exporter stopped")


async def _create_if_missing(nc: Client, driver: Driver, log: FilteringBoundLogger) -> None:
    """Create the consumer if it does not exist; leave an existing one untouched."""
    try:
        await nc.jetstream().consumer_info(protocol.MESSAGES_STREAM, driver.name)
        return
    except NotFoundError as exc:
        if exc.err_code == _STREAM_NOT_FOUND:
            raise
    await ensure_consumer(nc, driver)
    log.info("consumer was missing: created it, so that events are kept", consumer=driver.name)


@contextlib.contextmanager
def _stopped_by_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop``; a second one, after the handlers go, forces the exit."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
