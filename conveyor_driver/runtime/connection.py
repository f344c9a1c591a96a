"""Connecting to NATS: wait out a server that is not up yet, then reconnect forever.

With TLS configured, the connection is hardened here too: a server that does not require
TLS is refused (nats-py would fall back to plaintext), a TLS failure becomes one line that
says what to fix, and asyncio's harmless warning about closed TLS streams is kept out of
the log. Loading and checking the certificates themselves is :mod:`conveyor_driver.tls`'s
job. The client itself (:class:`DriverClient`) hands the consumer's deliveries and the
publisher's replies over straight from its parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from structlog.typing import FilteringBoundLogger

from ..errors import NatsUnavailableError

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

    nc = DriverClient() if tls is None else TLSOnlyClient()
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


class DriverClient(Client):
    """nats-py's client, with a subscription's plain messages handed over as they are read.

    nats-py puts every message it reads on its subscription's queue, for the subscription's
    task to build a ``Msg`` and await the callback: two event-loop turns and a dataclass per
    message. Every run brings the pull consumer's delivery, the result's PubAck and, with
    the run ledger, a write's PubAck and the ack's confirmation: that machinery was a good
    part of what a run cost. :meth:`read_directly` hands such a subscription's messages to
    a plain function instead, as the parser reads them. A message with headers (a status
    such as "no responders" or "request timeout") still goes nats-py's way, to the
    subscription's callback, which must handle every message too: the subscription keeps
    working if a future nats-py stops calling ``_process_msg``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, Callable[[bytes, bytes, bytes], None]] = {}

    def read_directly(self, sid: int, handler: Callable[[bytes, bytes, bytes], None]) -> None:
        """Hand subscription ``sid``'s messages without headers to ``handler(subject, reply,
        data)`` until it is unsubscribed. ``handler`` runs inside the read loop, so it must
        not block; what it raises goes to the connection's error callback."""
        self._direct[sid] = handler

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handler = self._direct.get(sid)
        if handler is not None and sid not in self._subs:  # unsubscribed: dropped as before
            del self._direct[sid]
            handler = None
        if handler is None or headers:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        try:
            handler(subject, reply, data)
        except Exception as exc:  # the read loop must go on: the error callback hears it
            await self._error_cb(exc)


# -- TLS on the NATS connection ---------------------------------------------------------


class PlaintextServerError(NatsError):
    """The server does not require TLS although the driver was configured for it.

    ``optional`` when it offers TLS beside plaintext (``allow_non_tls``): nats-py has no
    way to ask for it, so such a server is refused too.
    """

    def __init__(self, optional: bool = False) -> None:
        super().__init__()
        self.optional = optional

    def __str__(self) -> str:
        return (
            "the server offers TLS only as an option"
            if self.optional
            else ("the server does not use TLS")
        )


class TLSOnlyClient(DriverClient):
    """A NATS client that refuses a server which does not require TLS.

    nats-py upgrades to TLS only when the server's INFO says ``tls_required`` and otherwise
    carries on in plaintext, even with an SSL context: a misconfigured or impostor server
    would then receive the driver's results and logs unencrypted. The check runs on the
    INFO of every connection and reconnection, before the client sends anything.
    """

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = self._current_server
        websocket_tls = server is not None and server.uri.scheme == "wss"
        if initial_connection and not info.get("tls_required") and not websocket_tls:
            raise PlaintextServerError(optional=bool(info.get("tls_available")))
        await super()._process_info(info, initial_connection)


class _QuietTLSEOF(logging.Filter):
    """Drops asyncio's warning about nats-py's stream protocol over TLS.

    nats-py reads through an ``asyncio.StreamReaderProtocol`` upgraded with ``start_tls``;
    when a TLS peer closes, asyncio warns that the protocol's wish to stay half-open has
    no effect. Nothing is wrong, and the line would otherwise follow every closed TLS
    connection into the driver's log and the CLI's one-line errors.
    """

    MESSAGE = "returning true from eof_received() has no effect when using ssl"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.MESSAGE


def quiet_tls_eof_warning() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(existing, _QuietTLSEOF) for existing in logger.filters):
        logger.addFilter(_QuietTLSEOF())


def nats_tls_failure(exc: BaseException, urls: str, *, tls_configured: bool) -> str | None:
    """A one-line explanation when ``exc`` is a TLS failure that retrying cannot cure.

    None for anything else (a refused connection, a timeout), which start-up retries.
    """
    from ..tls import ssl_reason  # here: tls loads cryptography, which most starts skip

    if isinstance(exc, PlaintextServerError):
        if exc.optional:
            return (
                f"NATS at {urls} accepts plaintext beside TLS (allow_non_tls), and this client "
                "cannot insist on TLS there: configure the server to require TLS"
            )
        return (
            f"NATS at {urls} does not use TLS, but a TLS identity or CA is configured: "
            "refusing to connect in plaintext"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or ssl_reason(exc)
        if not tls_configured:
            return (
                f"NATS at {urls} requires TLS and its certificate is not trusted ({reason}): "
                "give the operator's CA with --tls-ca (and --tls-cert/--tls-key if it "
                "verifies clients)"
            )
        return (
            f"cannot verify the TLS certificate of NATS at {urls} against the configured CA: "
            f"{reason}"
        )
    if isinstance(exc, ssl.SSLError):
        reason = ssl_reason(exc)
        if "certificate required" in reason:
            return f"NATS at {urls} requires a client certificate: give --tls-cert and --tls-key"
        if "alert" in reason:
            return f"NATS at {urls} rejected the client certificate ({reason})"
        return f"TLS with NATS at {urls} failed: {reason}"
    return None
