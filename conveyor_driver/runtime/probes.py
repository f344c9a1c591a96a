"""``/healthz``, ``/readyz`` and ``/metrics`` for orchestrators and Prometheus.

Health means *consuming*, not merely *running*: the most common complaint about reconcile
frameworks is a consumer that silently stopped while its health check stayed green. So
``/healthz`` fails when the pull loop has not iterated for a while (it iterates even when
idle), and ``/readyz`` fails while NATS is away, during start-up and during shutdown.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
from aiohttp import web

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from nats.aio.client import Client

    from .consumer import Consumer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The pull loop wakes at least every few seconds; this much silence means it is wedged.
STALL_AFTER = 30.0


@attrs.define
class DriverState:
    """What the probes read; the server fills it in as the driver starts and stops."""

    nc: Client | None = None
    consumer: Consumer | None = None
    stopping: bool = False
    stall_after: float = STALL_AFTER

    def health(self) -> tuple[bool, str]:
        consumer = self.consumer
        if consumer is None:
            return True, "starting"
        silent = time.monotonic() - consumer.last_loop
        if silent > self.stall_after:
            return False, f"consume loop has not iterated for {silent:.0f}s"
        return True, "consuming"

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if self.nc is None or self.consumer is None:
            return False, "starting"
        if not self.nc.is_connected:
            return False, "NATS connection lost; reconnecting"
        return True, "ready"


async def start_probes(state: DriverState, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    """Serve the probes on ``host:port``; the caller cleans the runner up."""
    app = web.Application()
    app.router.add_get("/healthz", _answer(state.health))
    app.router.add_get("/readyz", _answer(state.readiness))
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        # A port in use or an address this machine does not have is the operator's to
        # fix; one line naming it beats a traceback from deep inside asyncio.
        await runner.cleanup()
        # asyncio wraps the errno in its own sentence; the errno's is the one to show.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigurationError(
            f"cannot serve the probes on {host}:{port}: {reason.lower()}; "
            "choose another --http-port (CONVEYOR_HTTP_PORT) or --http-host"
        ) from None
    return runner


def _answer(check: Callable[[], tuple[bool, str]]) -> Handler:
    async def handler(_request: web.Request) -> web.Response:
        ok, reason = check()
        return web.json_response({"status": reason}, status=200 if ok else 503)

    return handler


async def _metrics(_request: web.Request) -> web.Response:
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
    except ImportError:
        return web.Response(
            status=501, text="metrics need the SDK: pip install 'conveyor-driver[otel]'\n"
        )
    response = web.Response(body=generate_latest(REGISTRY))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
