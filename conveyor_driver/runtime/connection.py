"""Connecting to NATS: a clear error when nothing answers, then reconnect forever."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from nats.aio.client import Client
from structlog.typing import FilteringBoundLogger

from ..errors import NatsUnavailableError

#: Tries per server before start-up gives up with a clear error (then it is forever).
_INITIAL_TRIES = 3


async def connect(
    urls: Sequence[str],
    *,
    name: str,
    log: FilteringBoundLogger,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> Client:
    """Connect, or raise NatsUnavailableError naming the URLs.

    Start-up fails fast because a wrong URL is a configuration mistake the operator should
    see at once; once connected, the driver reconnects forever, because a NATS restart is
    weather, and the runtime keeps consuming afterwards.
    """
    connected = False

    def closing() -> bool:
        return not connected or nc.is_closed or nc.is_draining

    async def error_cb(exc: Exception) -> None:
        if not closing():
            log.warning("nats error", error=str(exc) or type(exc).__name__)

    async def disconnected_cb() -> None:
        if not closing():
            log.warning("nats disconnected; reconnecting")

    async def reconnected_cb() -> None:
        log.info(
            "nats reconnected", server=str(nc.connected_url.netloc if nc.connected_url else "")
        )
        if on_reconnect is not None:
            await on_reconnect()

    nc = Client()
    try:
        await nc.connect(
            servers=list(urls),
            name=name,
            connect_timeout=2,
            reconnect_time_wait=1,
            max_reconnect_attempts=_INITIAL_TRIES,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
        )
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        raise NatsUnavailableError(f"cannot reach NATS at {', '.join(urls)}: {reason}") from None
    nc.options["max_reconnect_attempts"] = -1
    connected = True
    return nc
