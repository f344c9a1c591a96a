"""``/healthz``, ``/readyz`` and ``/metrics`` for orchestrators and Prometheus.

Health means *consuming*, not merely *running*: the most common complaint about reconcile
frameworks is a consumer that silently stopped while its health check stayed green. So
``/healthz`` fails when the pull loop has not iterated for a while (it iterates even when
idle) and when a handler has blocked the event loop for half of ``ack_wait`` (JetStream is
about to hand its run to another instance), and ``/readyz`` fails while NATS is away,
during start-up and during shutdown.

The probes are served from a thread of their own, not from the event loop: a probe that
does not answer while the loop is blocked is no health check at all.
"""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
import orjson

from .. import exposition
from ..errors import ConfigurationError

if TYPE_CHECKING:
    from nats.aio.client import Client

    from .watchdog import LoopWatchdog

#: The pull loop wakes at least every few seconds; this much silence means it is wedged.
STALL_AFTER = 30.0


class Looping(Protocol):
    """What health watches: the consumer's pull loop, or the ``lag`` mode's backlog watch."""

    @property
    def last_loop(self) -> float: ...


@attrs.define
class DriverState:
    """What the probes read; the server fills it in as the driver starts and stops."""

    nc: Client | None = None
    consumer: Looping | None = None
    watchdog: LoopWatchdog | None = None
    stopping: bool = False
    stall_after: float = STALL_AFTER
    #: A loop blocked this long makes the driver unhealthy (half of ``ack_wait``).
    blocked_after: float = 15.0
    #: What a healthy answer says the loop does (the ``lag`` mode watches, not consumes).
    doing: str = "consuming"

    def health(self) -> tuple[bool, str]:
        watchdog = self.watchdog
        blocked = watchdog.blocked_for() if watchdog is not None else 0.0
        if blocked > self.blocked_after:
            return False, f"event loop blocked for {blocked:.0f}s"
        consumer = self.consumer
        if consumer is None:
            return True, "starting"
        silent = time.monotonic() - consumer.last_loop
        if silent > self.stall_after and not blocked:
            return False, f"consume loop has not iterated for {silent:.0f}s"
        return True, self.doing

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if self.nc is None or self.consumer is None:
            return False, "starting"
        if not self.nc.is_connected:
            return False, "NATS connection lost; reconnecting"
        return True, "ready"


class Checks(Protocol):
    """What the probes answer from: one driver's state, or the workers' together."""

    def health(self) -> tuple[bool, str]: ...

    def readiness(self) -> tuple[bool, str]: ...


#: A route's answer: status, content type, body.
Answer = tuple[int, str, bytes]


class ProbeServer:
    """The probes' HTTP server and the thread it answers from."""

    def __init__(self, server: http.server.ThreadingHTTPServer) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="probes", daemon=True
        )
        self._thread.start()

    async def cleanup(self) -> None:
        """Stop answering (the port is closed when this returns)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


async def start_probes(
    state: Checks,
    port: int,
    host: str = "0.0.0.0",
    metrics: Callable[[], Answer] | None = None,
) -> ProbeServer:
    """Serve the probes on ``host:port``; the caller cleans the server up.

    ``metrics`` renders ``/metrics`` (default: this process's, :func:`exposition.render`).
    """
    routes: dict[str, Callable[[], Answer]] = {
        "/healthz": _answer(state.health),
        "/readyz": _answer(state.readiness),
        "/metrics": metrics or exposition.render,
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            status, content_type, body = route() if route else (404, "text/plain", b"")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes are polled every few seconds: no access log

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        # A port in use or an address this machine does not have is the operator's to
        # fix; one line naming it beats a traceback.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigurationError(
            f"cannot serve the probes on {host}:{port}: {reason.lower()}; "
            "choose another --http-port (CONVEYOR_HTTP_PORT) or --http-host"
        ) from None
    server.daemon_threads = True
    return ProbeServer(server)


def _answer(check: Callable[[], tuple[bool, str]]) -> Callable[[], Answer]:
    def answer() -> Answer:
        ok, reason = check()
        return 200 if ok else 503, "application/json", orjson.dumps({"status": reason})

    return answer
