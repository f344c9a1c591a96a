"""Serving a driver: wire the parts together, consume until a signal, shut down cleanly.

Start-up order matters: the run ledger and then the consumer are set up before anything
else can fail late, so that events published while the driver starts are kept (the
``messages`` stream drops what no consumer is interested in) and recorded. Shutdown runs
in reverse: stop pulling, let handlers finish, flush logs, run shutdown hooks, close the
API session, drain NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING

from .. import protocol
from ..api import ConveyorClient
from ..definitions import apply_definitions
from ..errors import (
    ConfigurationError,
    ConsumerSetupError,
    ConveyorDriverError,
    StreamMissingError,
)
from ..logs.chain import build_logger
from ..logs.loki import LokiSink
from ..logs.nats import NatsLogSink
from ..logs.stdlib import bridged
from ..loops import loop_name
from ..settings import Settings
from ..telemetry import Telemetry
from ..workspace import sweep
from .backlog import BacklogWatch
from .connection import connect
from .consumer import Consumer, ensure_consumer, ensuring_what
from .dispatcher import HandlerThreads, Services
from .heap import settle_for_serving
from .hooks import call_hook
from .ledger import RunLedger
from .lifetime import concurrency_within, until_stopped
from .probes import DriverState, start_probes
from .publisher import Publisher
from .secrets import driver_redactor, warn_too_short, watch_tokens
from .startup import until_ready
from .supervisor import watch_supervisor
from .watchdog import LoopWatchdog

if TYPE_CHECKING:
    from nats.aio.client import Client
    from structlog.typing import FilteringBoundLogger

    from ..app import Driver
    from ..logs.sink import LogSink
    from ..tls import TLSConfig


async def serve(driver: Driver, settings: Settings | None = None) -> None:
    """Run ``driver`` until SIGINT/SIGTERM, ``max_runs`` or ``exit_when_idle`` (see
    :mod:`.lifetime`), or until this coroutine is cancelled.

    Under ``Driver.run()`` (hence ``conveyor-driver run``) the process is the driver's, and
    its garbage collector is set for serving once started (:mod:`.heap`).
    """
    settings = settings or Settings.from_env()
    driver.check()
    if settings.workers > 1:
        raise ConfigurationError(
            f"{settings.workers} workers need `conveyor-driver run APP --workers N`, which "
            "starts each worker from the app's path; driver.run() and serve() are one process"
        )
    if settings.reload:
        raise ConfigurationError(
            "--reload needs `conveyor-driver run APP --reload`, which restarts the driver "
            "from the app's path; driver.run() and serve() cannot reload themselves"
        )
    # Certificates are checked before anything starts: a wrong file is a one-line error.
    tls = _load_tls(settings)
    nats_tls = tls.ssl_context() if tls is not None else None
    concurrency = concurrency_within(settings.concurrency or driver.concurrency, settings.max_runs)
    telemetry = Telemetry()
    redactor, too_short = driver_redactor(driver, settings)
    # The sinks report their own trouble here, outside the chain they feed.
    console = build_logger(level=settings.log_level, fmt=settings.log_format, redactor=redactor)
    sink = NatsLogSink(driver.name, on_lines=telemetry.line_counter("nats"), console=console)
    sinks: list[LogSink] = [sink]
    loki: LokiSink | None = None
    if settings.loki is not None:
        loki = LokiSink(
            settings.loki,
            service_name=driver.name,
            console=console,
            on_lines=telemetry.line_counter("loki"),
        )
        sinks.append(loki)
    log = build_logger(
        level=settings.log_level,
        fmt=settings.log_format,
        sinks=sinks,
        redactor=redactor,
        trace_ids=telemetry.enabled(),
    ).bind(driver=driver.name)
    if settings.worker_index is not None:
        log = log.bind(worker=settings.worker_index)
    warn_too_short(log, too_short)
    state = DriverState(blocked_after=driver.ack_wait / 2)
    async with contextlib.AsyncExitStack() as stack:
        if settings.http_port is not None:
            runner = await start_probes(state, settings.http_port, settings.http_host)
            stack.push_async_callback(runner.cleanup)
            log.info("probes listening", host=settings.http_host, port=settings.http_port)
        if loki is not None:
            loki.start()
            stack.push_async_callback(loki.close)
        stack.enter_context(
            bridged(log, logging.getLevelNamesMapping()[settings.log_level.upper()])
        )
        urls = settings.nats_urls
        if settings.embedded:
            from ..embedded import EmbeddedNats

            server = EmbeddedNats(port=settings.embedded_port, store_dir=settings.embedded_dir)
            await stack.enter_async_context(server)
            urls = (server.url,)
            log.info("embedded nats-server started", url=server.url)

        consumer: Consumer | None = None

        async def on_reconnect() -> None:
            if consumer is not None:
                consumer.connection_restored()

        deadline = asyncio.get_running_loop().time() + settings.startup_timeout
        nc = await connect(
            urls,
            name=f"conveyor-driver:{driver.name}",
            log=log,
            on_reconnect=on_reconnect,
            tls=nats_tls,
            timeout=settings.startup_timeout,
        )
        stack.push_async_callback(_close, nc)
        # The ledger first: once the consumer exists (what tests and operators watch for),
        # every delivery can be recorded.
        ledger = await _open_ledger(nc, driver, settings, deadline, log)
        await until_ready(
            lambda: ensure_consumer(nc, driver),
            ensuring_what(driver),
            nc=nc,
            deadline=deadline,
            log=log,
        )
        publisher = Publisher(nc)
        if ledger is not None:
            ledger.publisher = publisher
        state.nc = nc
        api = ConveyorClient.from_settings(settings, tls, log=log, telemetry=telemetry)
        stack.push_async_callback(api.close)
        if driver.apply_definitions or settings.apply_definitions:
            await apply_definitions(driver, api, log)
        if api.auth is not None:
            watch_tokens(api.auth, redactor)
        executor = HandlerThreads(max_workers=concurrency, thread_name_prefix=driver.name)
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)

        consumer = Consumer(
            nc,
            driver,
            Services(
                log=log,
                api=api,
                executor=executor,
                telemetry=telemetry,
                timeout=settings.timeout,
                redactor=redactor,
                workspace_root=settings.workspace_root,
                keep_failed_workspaces=settings.keep_failed_workspaces,
            ),
            concurrency=concurrency,
            log=log,
            ledger=ledger,
            publisher=publisher,
            max_runs=settings.max_runs,
        )
        # The sink is closed once: here if start-up fails, else after the shutdown hooks
        # (their lines are shipped) and before "driver stopped" (which counts them).
        sink.start(publisher)
        try:
            await _sweep_workspaces(driver, settings, log)
            for hook in driver.startup_hooks:
                await call_hook(hook)
            stop = asyncio.Event()
            _install_signal_handlers(stop)
            if settings.worker_index is not None:
                stack.callback(watch_supervisor(stop, log).cancel)
            settle_for_serving()
            await consumer.start()
            state.consumer = consumer
            watchdog = LoopWatchdog(
                asyncio.get_running_loop(),
                log,
                threshold=settings.block_threshold,
                describe=consumer.describe,
                on_block=telemetry.loop_blocked.record,
            )
            watchdog.start()
            stack.callback(watchdog.stop)
            state.watchdog = watchdog
            if settings.http_port is not None or telemetry.sdk_metrics:
                backlog = BacklogWatch(nc, driver.name, settings.lag_interval, log)
                backlog.start()
                stack.push_async_callback(backlog.stop)
        except BaseException:
            await sink.close()
            raise
        log.info(
            "driver started",
            subjects=driver.subjects,
            concurrency=concurrency,
            nats=", ".join(urls),
            **_lifetime(settings),
            loop=loop_name(asyncio.get_running_loop()),
        )
        try:
            _raise_if_cancelled()
            reason = await until_stopped(stop, consumer, settings.exit_when_idle)
            log.info("shutting down", reason=reason)
        finally:
            try:
                state.stopping = True
                _remove_signal_handlers()
                await consumer.stop(driver.grace_period)
                for hook in driver.shutdown_hooks:
                    try:
                        await call_hook(hook)
                    except Exception:
                        log.exception(
                            "shutdown hook failed", hook=getattr(hook, "__qualname__", hook)
                        )
            finally:
                await sink.close()
            budget = consumer.budget
            runs = {"runs": budget.used} if budget.limit is not None else {}
            log.info("driver stopped", handled=consumer.handled, **runs, log_lines_sent=sink.sent)


async def _sweep_workspaces(driver: Driver, settings: Settings, log: FilteringBoundLogger) -> None:
    """Remove what an earlier process of this driver, killed mid-run, left on disk."""
    removed, failed = await asyncio.to_thread(sweep, settings.workspace_root, driver.name)
    if removed:
        log.info(
            "stale workspaces removed",
            count=len(removed),
            workspaces=[str(path) for path in removed],
        )
    for problem in failed:
        log.warning("stale workspace not removed", reason=problem)


def _lifetime(settings: Settings) -> dict[str, float]:
    """The one-shot and draining settings in force, for the start-up line."""
    given = {"max_runs": settings.max_runs, "exit_when_idle": settings.exit_when_idle}
    return {key: value for key, value in given.items() if value is not None}


async def _open_ledger(
    nc: Client, driver: Driver, settings: Settings, deadline: float, log: FilteringBoundLogger
) -> RunLedger | None:
    """The run ledger, unless this driver or its operator turned it off.

    JetStream refusing the bucket is a configuration matter (account limits, say), said in
    one line with the way out, rather than a driver that silently loses its guarantees.
    """
    if not (driver.ledger and settings.ledger):
        log.info("run ledger off: a late redelivery may run a finished build again")
        return None
    js = nc.jetstream()
    bucket = protocol.ledger_bucket(driver.name)
    instance = f"{socket.gethostname()}:{os.getpid()}"
    try:
        return await until_ready(
            lambda: RunLedger.open(js, driver.name, log, settings.ledger_ttl, instance),
            f"open the run ledger {bucket!r}",
            nc=nc,
            deadline=deadline,
            log=log,
        )
    except StreamMissingError:
        raise  # the driver could not consume either: that, not the ledger, is the news
    except ConveyorDriverError as exc:
        raise ConsumerSetupError(f"{exc} (or run with --no-ledger to go without it)") from None


def _load_tls(settings: Settings) -> TLSConfig | None:
    """The TLS identity, if any; imported only then (``cryptography`` costs start-up time)."""
    if settings.tls_cert is None and settings.tls_key is None and settings.tls_ca is None:
        return None
    from ..tls import load_tls

    return load_tls(settings.tls_cert, settings.tls_key, settings.tls_ca)


def _raise_if_cancelled() -> None:
    """Honour a cancellation that arrived during start-up and was lost on the way.

    On Python 3.11, ``asyncio.wait_for`` (which nats-py uses for every request) drops a
    cancellation that lands as its answer arrives; the task's cancel count still shows it.
    Without this, a serve task cancelled in that instant would serve on forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _close(nc: object) -> None:
    from nats.aio.client import Client

    assert isinstance(nc, Client)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.drain(), 10)
    if not nc.is_closed:
        # With NATS away, nats-py's close still writes what it holds to a dead transport:
        # asyncio says ConnectionResetError, uvloop RuntimeError. Either way it is closed.
        with contextlib.suppress(ConnectionError, RuntimeError):
            await nc.close()


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    """Ask for a graceful stop on SIGINT/SIGTERM where this loop may own signals.

    The handlers are removed as soon as the stop begins, so a second Ctrl-C falls through
    to Python's default and forces the exit.
    """
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(sig)
