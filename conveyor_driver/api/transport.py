"""How a call travels to the Conveyor API server: session, signing, tracing, retries.

The client (:mod:`.client`) says what to ask and how to read the answer; the transport
sends it. One ``aiohttp.ClientSession``, opened on first use and closed by the runtime on
shutdown, so handlers share its connection pool instead of opening their own. Every
request has a timeout; which failed calls go again, and when, is :mod:`.retry`'s to say.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode
from structlog.typing import FilteringBoundLogger
from yarl import URL

from ..telemetry import Telemetry
from .errors import (
    APIUnavailableError,
    ConveyorAPIError,
    after_attempts,
    answered,
    failure_reason,
)
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .auth import CertificateAuth


class Transport:
    """Sends calls to one API server and hands back the 2xx answers.

    ``telemetry`` is the driver's, handed in by the runtime; a transport made without one
    (a client used on its own, in a script or a test) builds its own on its first call.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        retry: RetryPolicy,
        auth: CertificateAuth | None,
        ssl: ssl.SSLContext | None,
        log: FilteringBoundLogger | None,
        telemetry: Telemetry | None,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.retry = retry
        self.auth = auth
        self._ssl = ssl
        self._log = log
        self._telemetry = telemetry
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_for_use(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    def _headers(self, *, body: bool, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        if body:
            headers["Content-Type"] = "application/json"
        if self.auth is not None:
            headers.update(self.auth.headers())
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One call: the decoded JSON answer (None for an empty or non-JSON body)."""
        response = await self.open(method, path, body=body, params=params)
        try:
            raw = await response.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise APIUnavailableError(method, path, failure_reason(exc, self.timeout)) from None
        finally:
            response.release()
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None  # e.g. Fiber's "Created" after POST /logs

    async def open(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        accept: str = "application/json",
    ) -> aiohttp.ClientResponse:
        """Send with retries; the 2xx response with its body still unread.

        The call, retries included, is one CLIENT span whose context travels in the request
        headers, so the server's work joins the run's trace.
        """
        telemetry = self._telemetry
        if telemetry is None:
            telemetry = self._telemetry = Telemetry()
        url = URL(self.base_url + path, encoded=True)
        labels: dict[str, str | int] = {
            "http.request.method": method,
            "server.address": url.host or "",
        }
        if url.port is not None:
            labels["server.port"] = url.port
        started = time.perf_counter()
        status = 0
        with telemetry.tracer.start_as_current_span(
            method,
            kind=SpanKind.CLIENT,
            attributes={**labels, "url.full": str(url)},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                response = await self._send(
                    method, path, url, body=body, params=params, timeout=timeout, accept=accept
                )
                status = response.status
                return response
            except ConveyorAPIError as exc:
                status = exc.status
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            finally:
                if status:
                    labels["http.response.status_code"] = status
                    span.set_attribute("http.response.status_code", status)
                telemetry.api_duration.record(time.perf_counter() - started, labels)

    async def _send(
        self,
        method: str,
        path: str,
        url: URL,
        *,
        body: Any,
        params: Mapping[str, str] | None,
        timeout: aiohttp.ClientTimeout | None,
        accept: str,
    ) -> aiohttp.ClientResponse:
        session = self._session_for_use()
        data = None if body is None else orjson.dumps(body)
        tries = self.retry.tries(method)
        signed_anew = False
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await session.request(
                    method,
                    url,
                    data=data,
                    params=params,
                    headers=_traced(self._headers(body=data is not None, accept=accept)),
                    timeout=timeout or aiohttp.ClientTimeout(total=self.timeout),
                )
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                reason = failure_reason(exc, self.timeout)
                if attempt < tries and self.retry.retries_failure(exc):
                    await self.retry.pause(
                        attempt, self._log, method=method, path=path, reason=reason
                    )
                    continue
                raise APIUnavailableError(method, path, after_attempts(reason, attempt)) from None
            if response.status < 300:
                return response
            raw = await _read_quietly(response)
            if response.status == 401 and self.auth is not None and not signed_anew:
                # A token refused for its age or our clock: sign a fresh one, once. The server
                # rejected the request before acting on it, so even a POST may go again.
                self.auth.invalidate()
                signed_anew = True
                attempt -= 1
                continue
            if attempt < tries and self.retry.retries_status(response.status):
                await self.retry.pause(
                    attempt,
                    self._log,
                    method=method,
                    path=path,
                    reason=f"answered {response.status}",
                )
                continue
            raise answered(
                response.status, response.reason, raw, method, path, signed=self.auth is not None
            )


def _traced(headers: dict[str, str]) -> dict[str, str]:
    """Headers with the current trace context (the call's CLIENT span) injected."""
    propagate.inject(headers)
    return headers


async def _read_quietly(response: aiohttp.ClientResponse) -> bytes:
    try:
        return await response.read()
    except (aiohttp.ClientError, TimeoutError):
        return b""
    finally:
        response.release()
