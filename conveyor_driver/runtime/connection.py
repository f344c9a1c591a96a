"""Connecting to NATS: wait out a server that is not up yet, then reconnect forever."""

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

#: How long one-shot commands (emit, status) wait for NATS before they give up.
COMMAND_TIMEOUT = 5.0


async def connect(
    urls: Sequence[str],
    *,
    name: str,
    log: FilteringBoundLogger,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> Client:
    """Connect within ``timeout`` seconds, or raise NatsUnavailableError naming the URLs.

    A NATS that is not up yet is weather (pods start in any order; a rolling upgrade
    restarts nodes), so connecting is retried until ``timeout``, with the wait logged once;
    after that the operator gets one line naming the URLs and the last error. Once
    connected, the driver reconnects forever, and the runtime keeps consuming afterwards.

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
            reason = nats_tls_failure(exc, where, tls_configured=tls is not None)
            if reason is not None and not fatal.done():
                fatal.set_result(reason)
            elif not failures:
                log.warning("waiting for NATS", nats=where, error=str(exc) or type(exc).__name__)
            failures.append(exc)
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
            max_reconnect_attempts=-1,
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
        await asyncio.wait(racing, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
    if fatal.done():
        raise NatsUnavailableError(fatal.result())
    try:
        connecting.result()
    except BaseException as exc:
        last: BaseException = failures[-1] if failures else exc
        if isinstance(last, asyncio.CancelledError):
            last = TimeoutError(f"no answer within {timeout:g}s")
        reason = str(last) or type(last).__name__
        raise NatsUnavailableError(f"cannot reach NATS at {where}: {reason}") from None
    connected = True
    return nc
