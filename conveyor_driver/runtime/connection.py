"""Connecting to NATS: a clear error when nothing answers, then reconnect forever."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nats.aio.client import Client
from structlog.typing import FilteringBoundLogger

from ..errors import NatsUnavailableError
from ..tls import TLSOnlyClient, nats_tls_failure, quiet_tls_eof_warning

#: Tries per server before start-up gives up with a clear error (then it is forever).
_INITIAL_TRIES = 3


async def connect(
    urls: Sequence[str],
    *,
    name: str,
    log: FilteringBoundLogger,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Client:
    """Connect, or raise NatsUnavailableError naming the URLs.

    Start-up fails fast because a wrong URL is a configuration mistake the operator should
    see at once; once connected, the driver reconnects forever, because a NATS restart is
    weather, and the runtime keeps consuming afterwards.

    With ``tls``, the server must speak TLS (no plaintext fallback) and is verified with the
    context's CA; a TLS failure ends start-up at once with its reason, since no retry cures
    a wrong certificate.
    """
    quiet_tls_eof_warning()
    connected = False
    where = ", ".join(urls)
    failures: list[BaseException] = []
    fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def closing() -> bool:
        return not connected or nc.is_closed or nc.is_draining

    async def error_cb(exc: Exception) -> None:
        if not connected:
            failures.append(exc)
            reason = nats_tls_failure(exc, where, tls_configured=tls is not None)
            if reason is not None and not fatal.done():
                fatal.set_result(reason)
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

    nc = Client() if tls is None else TLSOnlyClient()
    connecting = asyncio.ensure_future(
        nc.connect(
            servers=list(urls),
            name=name,
            connect_timeout=2,
            reconnect_time_wait=1,
            max_reconnect_attempts=_INITIAL_TRIES,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            tls=tls,
        )
    )
    try:
        # nats-py can hang after a failed TLS handshake (it waits for the plaintext socket
        # it handed to TLS to close), so a fatal TLS error is not left to its retry loop.
        racing: set[asyncio.Future[Any]] = {connecting, fatal}
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
    if fatal.done():
        raise NatsUnavailableError(fatal.result())
    try:
        connecting.result()
    except Exception as exc:
        last = failures[-1] if failures else exc
        reason = str(last) or type(last).__name__
        raise NatsUnavailableError(f"cannot reach NATS at {where}: {reason}") from None
    nc.options["max_reconnect_attempts"] = -1
    connected = True
    return nc
