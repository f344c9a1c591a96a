"""``--workers N``: one parent starts N worker processes of a driver, watches and drains them.

One process runs one event loop, and a CPU-bound handler (or simply a busy driver) keeps
one core busy at most. So, as uvicorn and FastStream do, the parent starts N workers, each
a whole ``conveyor-driver run`` with its own NATS connection and event loop, all sharing
the driver's durable consumer, which hands each message to one of them.

- **Spawned, not forked.** Each worker is a fresh ``python -m conveyor_driver run APP``: a
  fork would copy a process whose threads (nats-py's, the probe server's, handler threads)
  hold locks mid-state. The worker reads its settings as any ``run`` does, from the
  parent's environment plus the options the parent was given, written as their
  ``CONVEYOR_*`` variables (:func:`~conveyor_driver.variables.as_environment`), with
  ``CONVEYOR_WORKERS=1`` and ``CONVEYOR_WORKER_INDEX`` added.
- **Signals.** The workers run in a process group of their own, so a Ctrl-C at a terminal
  reaches the parent only, which asks every worker to stop (SIGTERM) and waits for each
  graceful shutdown (handlers finish within ``grace_period``, logs flush). A second signal
  kills them. A worker whose parent is gone (killed with SIGKILL, so it forwarded nothing)
  stops by itself (:func:`watch_supervisor`).
- **Restarts.** A worker that dies is started again, after a capped exponential backoff
  while it keeps dying young. One that exits 0 unasked has finished (``--max-runs``,
  ``--exit-when-idle``, each counted per worker) and is not; once all have, so has the
  parent. One that keeps dying before it could have finished starting
  (a configuration the workers refuse, a start-up hook that raises) ends the parent with
  one line and exit status 1, instead of a restart loop; the Kubernetes way of retrying
  (a restarted pod) then takes over.
- **One embedded server.** With ``--embedded`` the parent starts the nats-server, and the
  workers connect to it.
- **Probes.** With ``--http-port`` the parent answers for all the workers
  (:mod:`.fleet_probes`); each worker serves its own on a free loopback port the parent
  picks at each start.
- **Reloads.** ``--reload`` (:mod:`conveyor_driver.reload`) is this parent with one worker
  and a watcher: :meth:`Supervisor.reload` drains the workers as a stop does and starts
  them again at once, on the new code. A worker that keeps dying at start then waits for
  the next reload rather than ending the parent: in a dev loop, the fix is one save away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from ..embedded import free_port
from ..errors import ConveyorDriverError
from ..logs.chain import build_logger
from ..variables import as_environment
from .fleet_probes import FleetProbes
from .probes import start_probes

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from ..app import Driver
    from ..settings import Settings

#: The first restart's delay; it doubles with each death in a row at start, up to the cap.
RESTART_BASE = 0.5
RESTART_CAP = 10.0
#: Deaths in a row at start after which the parent gives up.
GIVE_UP_AFTER = 5
#: A worker that exits sooner than start-up may take (``--startup-timeout``) plus this
#: has died at start.
START_MARGIN = 10.0
#: How often a worker looks for its parent.
_PARENT_POLL = 1.0


class WorkersFailedError(ConveyorDriverError):
    """The workers keep dying at start: the parent gave up."""


#: A task the supervisor runs beside its workers until it stops (the ``--reload`` watcher).
Companion = Callable[["Supervisor"], Coroutine[Any, Any, None]]


def supervise(
    driver: Driver,
    app: str,
    settings: Settings,
    given: Mapping[str, str],
    companion: Companion | None = None,
) -> int:
    """Serve ``driver`` (loaded from ``app``) with ``settings.workers`` processes.

    ``given`` is the options given to the parent, as ``CONVEYOR_*`` variables. Returns
    the exit status once every worker has stopped: 0 when all of them drained cleanly.
    """
    driver.check()
    return asyncio.run(Supervisor(driver.name, app, settings, given, companion).run())


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


class Supervisor:
    def __init__(
        self,
        name: str,
        app: str,
        settings: Settings,
        given: Mapping[str, str],
        companion: Companion | None = None,
    ) -> None:
        self.app = app
        self.companion = companion
        self.settings = settings
        self.env = {**os.environ, **given}
        self.log: FilteringBoundLogger = build_logger(
            level=settings.log_level, fmt=settings.log_format
        ).bind(driver=name, supervisor=os.getpid())
        self.procs: list[asyncio.subprocess.Process | None] = [None] * settings.workers
        self.failure: str | None = None
        self.finished = 0
        self.fleet: FleetProbes | None = None
        self.start_window = settings.startup_timeout + START_MARGIN
        #: Set per worker by :meth:`reload`: its exit is a restart on new code, at once.
        self.reloading = [False] * settings.workers
        self.reloaded = [asyncio.Event() for _ in range(settings.workers)]

    async def run(self) -> int:
        self.stop = asyncio.Event()
        self.signals = 0
        settings = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        common: dict[str, Any] = {"workers": 1, "reload": False}
        async with contextlib.AsyncExitStack() as stack:
            if settings.embedded:
                from ..embedded import EmbeddedNats

                server = EmbeddedNats(port=settings.embedded_port, store_dir=settings.embedded_dir)
                await stack.enter_async_context(server)
                common.update(embedded=False, nats_urls=server.url)
                self.log.info("embedded nats-server started", url=server.url)
            if settings.http_port is not None:
                self.fleet = await self._start_probes(stack)
            slots = [
                asyncio.create_task(self._keep(index, common)) for index in range(settings.workers)
            ]
            self.log.info("supervising workers", workers=settings.workers, app=self.app)
            if self.companion is not None:
                companion = asyncio.create_task(self.companion(self), name="companion")
            await self.stop.wait()
            if self.companion is not None:
                companion.cancel()  # an import check under way is not worth waiting for
            if self.fleet is not None:
                self.fleet.stopping = True
            self.log.info("stopping workers")
            self._signal_all(signal.SIGTERM)
            codes = await asyncio.gather(*slots)
            if self.companion is not None:
                await asyncio.gather(companion, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if self.failure is not None:
            raise WorkersFailedError(self.failure)
        clean = (0, -signal.SIGTERM)  # SIGTERM before its handlers: stopped while starting
        unclean = {
            f"worker {index}": describe_exit(code)
            for index, code in enumerate(codes)
            if code not in clean
        }
        if unclean:
            self.log.error("workers did not stop cleanly", workers=unclean)
            return 1
        self.log.info("workers stopped", workers=len(codes))
        return 0

    async def _start_probes(self, stack: contextlib.AsyncExitStack) -> FleetProbes:
        settings = self.settings
        assert settings.http_port is not None
        fleet = FleetProbes([0] * settings.workers)  # each worker's port: set as it starts
        runner = await start_probes(fleet, settings.http_port, settings.http_host, fleet.metrics)
        stack.push_async_callback(runner.cleanup)
        self.log.info("probes listening", host=settings.http_host, port=settings.http_port)
        return fleet

    async def _keep(self, index: int, common: Mapping[str, Any]) -> int:
        """Run worker ``index`` until the parent stops; its last exit status."""
        own: dict[str, Any] = {**common, "worker_index": index}
        loop = asyncio.get_running_loop()
        deaths = 0  # in a row, each at start
        while True:
            if self.fleet is not None:
                # A port free now, rather than a fixed one: ports next to --http-port may be
                # anyone's (the local end of some connection), and a taken port would make
                # the worker die at start. A port taken in between costs one restart.
                self.fleet.ports[index] = free_port()
                own.update(http_port=self.fleet.ports[index], http_host=self.fleet.host)
            env = {**self.env, **as_environment(own)}
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "conveyor_driver",
                "run",
                self.app,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                process_group=0,
            )
            self.procs[index] = proc
            self.reloading[index] = False  # a reload asked during the spawn: it reads new code
            self.log.info("worker started", worker=index, pid=proc.pid, **_probe(own))
            if self.stop.is_set():
                _send(proc, signal.SIGTERM)  # the stop came while it was being started
            code = await proc.wait()
            self.procs[index] = None
            if self.reloading[index] and not self.stop.is_set():
                self.reloading[index] = False
                self.log.info("worker stopped for a reload", worker=index, pid=proc.pid)
                deaths = 0
                continue
            if self.stop.is_set():
                self.log.info(
                    "worker stopped", worker=index, pid=proc.pid, exit=describe_exit(code)
                )
                return code
            if code == 0:
                # Ended by itself, unasked: its job is done (--max-runs, --exit-when-idle).
                self.log.info("worker finished", worker=index, pid=proc.pid)
                self.finished += 1
                if self.finished == len(self.procs):
                    self.stop.set()
                return code
            lived = loop.time() - started
            deaths = deaths + 1 if lived < self.start_window else 0
            if deaths >= GIVE_UP_AFTER and self.companion is not None:
                self.log.error(
                    "worker keeps exiting at start; waiting for the next change",
                    worker=index,
                    exit=describe_exit(code),
                )
                deaths = 0
                await self._pause(index, None)
                if self.stop.is_set():
                    return 0
                continue
            if deaths >= GIVE_UP_AFTER:
                self.failure = (
                    f"worker {index} exited at start {deaths} times in a row "
                    f"(last: {describe_exit(code)}); giving up, see its error above"
                )
                self.stop.set()
                return code
            delay = min(RESTART_CAP, RESTART_BASE * 2 ** max(deaths - 1, 0))
            self.log.warning(
                "worker exited; restarting it",
                worker=index,
                pid=proc.pid,
                exit=describe_exit(code),
                ran_for=round(lived, 1),
                restart_in=delay,
            )
            await self._pause(index, delay)
            if self.stop.is_set():
                return 0  # nothing was running here to drain; its death is logged above

    async def _pause(self, index: int, seconds: float | None) -> None:
        """Wait ``seconds`` (None: for ever) or less: until the stop or a reload of ``index``."""
        self.reloaded[index].clear()
        waits = [asyncio.ensure_future(self.stop.wait())]
        waits.append(asyncio.ensure_future(self.reloaded[index].wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self.reloading[index] = False

    def reload(self) -> None:
        """Restart every worker on the code as it is now, each after its graceful stop.

        A worker asked already is not signalled again: its second SIGTERM would kill it
        mid-drain. One waiting to be restarted is started at once.
        """
        if self.stop.is_set():
            return
        for index, proc in enumerate(self.procs):
            if self.reloading[index]:
                continue
            self.reloading[index] = True
            if proc is None:
                self.reloaded[index].set()
            else:
                _send(proc, signal.SIGTERM)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signals += 1
        if self.signals == 1:
            self.log.info("stop requested; draining workers", signal=sig.name)
            self.stop.set()
        else:
            self.log.warning("second stop signal: killing the workers", signal=sig.name)
            self._signal_all(signal.SIGKILL)

    def _signal_all(self, sig: signal.Signals) -> None:
        for proc in self.procs:
            if proc is not None:
                _send(proc, sig)


def _probe(own: Mapping[str, Any]) -> dict[str, Any]:
    return {"probe_port": own["http_port"]} if "http_port" in own else {}


def _send(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def watch_supervisor(stop: asyncio.Event, log: FilteringBoundLogger) -> asyncio.Task[None]:
    """In a worker: stop gracefully once the parent is gone (it forwards no signal then)."""
    parent = os.getppid()

    async def watch() -> None:
        while os.getppid() == parent:  # noqa: ASYNC110 (no event says "the parent died")
            await asyncio.sleep(_PARENT_POLL)
        log.warning("supervisor gone; stopping", supervisor=parent)
        stop.set()

    return asyncio.create_task(watch(), name="watch-supervisor")
