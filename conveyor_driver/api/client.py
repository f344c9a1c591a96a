"""The async client of the Conveyor API server (PROTOCOL.md section 5), ``ctx.api``.

One ``aiohttp.ClientSession`` per client, opened on first use and closed by the runtime on
shutdown: handlers share its connection pool instead of opening their own. Every request
has a timeout. Calls that can be repeated without changing the outcome (GET, PUT, DELETE)
are retried with jittered backoff when the connection fails or a proxy answers 502, 503
or 504; a POST is sent once, because a create that timed out may still have happened.
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from cattrs import ClassValidationError
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode
from structlog.typing import FilteringBoundLogger
from yarl import URL

from ..errors import ConfigurationError
from ..models import (
    DecodeError,
    DriverMessage,
    LogEntry,
    Resource,
    encode_driver_message,
    resource_from_json,
)
from ..telemetry import Telemetry
from .auth import CertificateAuth
from .models import Pipeline, ResourceCreated, ResourceDefinition, converter, log_entry

if TYPE_CHECKING:
    from ..settings import Settings
    from ..tls import TLSConfig

T = TypeVar("T")

#: Methods whose repetition leaves the server as one request would.
IDEMPOTENT = frozenset({"GET", "PUT", "DELETE", "HEAD", "OPTIONS"})
#: Answers of a proxy or a server in trouble, worth another try of an idempotent call.
RETRY_STATUSES = frozenset({502, 503, 504})

_TEXT_LIMIT = 300
_SSE_LINE_LIMIT = 1024 * 1024
# The Go server answers 500 "... not found" where it means 404 (a missing etcd key).
_NOT_FOUND_TEXT = re.compile(r"\bnot found\b", re.IGNORECASE)


class ConveyorAPIError(Exception):
    """A non-2xx answer: the status, the request, and the server's ``error`` text."""

    def __init__(self, status: int, method: str, path: str, error: str) -> None:
        super().__init__(f"{method} {path} answered {status}: {error}")
        self.status = status
        self.method = method
        self.path = path
        self.error = error


class NotFound(ConveyorAPIError):
    """The resource (or definition, or pipeline) does not exist."""


class APIUnavailable(ConveyorAPIError):
    """No answer at all: the connection failed or timed out (``status`` is 0)."""

    def __init__(self, method: str, path: str, error: str) -> None:
        Exception.__init__(self, f"{method} {path} got no answer: {error}")
        self.status = 0
        self.method = method
        self.path = path
        self.error = error


class ConveyorClient:
    """Reads and changes Conveyor resources, definitions, pipelines and logs.

    ``base_url`` may end with a slash and carry a path prefix (a server behind a reverse
    proxy). ``auth`` signs every request when the server runs with authentication on;
    ``ssl`` verifies an ``https`` API server against the operator's CA. ``timeout`` bounds
    each attempt of a call; ``attempts`` is how often an idempotent call is tried.
    A live log stream has no total timeout, but ends with :class:`APIUnavailable` when
    nothing (not even a heartbeat) arrives for ``stream_idle_timeout`` seconds.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff: float = 0.25,
        backoff_cap: float = 5.0,
        auth: CertificateAuth | None = None,
        ssl: ssl.SSLContext | None = None,
        stream_idle_timeout: float = 60.0,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigurationError(f"API URL {url.with_password(None)} is not an http(s) URL")
        if attempts < 1:
            raise ConfigurationError(f"attempts must be at least 1, not {attempts!r}")
        self.base_url = str(url).rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self.auth = auth
        self._backoff = backoff
        self._backoff_cap = backoff_cap
        self._ssl = ssl
        self._stream_idle_timeout = stream_idle_timeout
        self._log = log
        self._session: aiohttp.ClientSession | None = None
        self._telemetry: Telemetry | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        tls: TLSConfig | None = None,
        *,
        log: FilteringBoundLogger | None = None,
    ) -> ConveyorClient:
        """The client the runtime hands to handlers: signed requests when an identity is set."""
        auth = CertificateAuth(tls.identity) if tls and tls.identity else None
        ssl_context = tls.ssl_context() if tls and settings.api_url.startswith("https") else None
        return cls(settings.api_url, auth=auth, ssl=ssl_context, log=log)

    def __repr__(self) -> str:
        return f"<ConveyorClient {URL(self.base_url).with_password(None)}>"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- health --------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """``{"status": "healthy", "time": <unix>}`` from a live server."""
        answer = await self._request("GET", "/health")
        return answer if isinstance(answer, dict) else {}

    # -- resources -----------------------------------------------------------------------

    async def create_resource(self, resource: Resource) -> ResourceCreated:
        """Store a new resource; the server validates it and publishes its ``create`` event."""
        answer = await self._request("POST", "/resources", body=converter.unstructure(resource))
        return self._structure(answer, ResourceCreated, "POST", "/resources")

    async def list_resources(self, type: str) -> list[Resource]:
        path = f"/resources/{_segment(type, 'resource type')}"
        answer = await self._request("GET", path)
        if answer is None:
            return []
        if not isinstance(answer, list):
            raise _unexpected("GET", path, answer, "a list of resources")
        return [self._resource(item, "GET", path) for item in answer]

    async def get_resource(self, type: str, name: str) -> Resource:
        path = f"/resources/{_segment(type, 'resource type')}/{_segment(name, 'name')}"
        return self._resource(await self._get_one(path), "GET", path)

    async def get_resource_version(self, type: str, name: str, version: str | int) -> Resource:
        path = (
            f"/resources/{_segment(type, 'resource type')}/{_segment(name, 'name')}"
            f"/{_segment(str(version), 'version')}"
        )
        return self._resource(await self._get_one(path), "GET", path)

    async def update_resource(self, resource: Resource) -> Resource:
        """Replace the resource named by ``resource.type`` and ``resource.name``."""
        path = (
            f"/resources/{_segment(resource.type, 'resource type')}"
            f"/{_segment(resource.name, 'name')}"
        )
        answer = await self._request("PUT", path, body=converter.unstructure(resource))
        return resource if answer is None else self._resource(answer, "PUT", path)

    async def delete_resource(self, type: str, name: str) -> None:
        path = f"/resources/{_segment(type, 'resource type')}/{_segment(name, 'name')}"
        await self._request("DELETE", path)

    # -- resource definitions ------------------------------------------------------------

    async def create_resource_definition(self, d: ResourceDefinition) -> ResourceDefinition:
        return await self._send_definition("POST", "/resource-definitions", d)

    async def apply_resource_definition(self, d: ResourceDefinition) -> ResourceDefinition:
        """Create the definition, or update the one with the same name."""
        return await self._send_definition("POST", "/resource-definitions/apply", d)

    async def get_resource_definition(self, name: str) -> ResourceDefinition:
        path = f"/resource-definitions/{_segment(name, 'name')}"
        return self._structure(await self._get_one(path), ResourceDefinition, "GET", path)

    async def update_resource_definition(self, d: ResourceDefinition) -> ResourceDefinition:
        return await self._send_definition(
            "PUT", f"/resource-definitions/{_segment(d.name, 'name')}", d
        )

    async def delete_resource_definition(self, name: str) -> None:
        await self._request("DELETE", f"/resource-definitions/{_segment(name, 'name')}")

    # -- pipelines -----------------------------------------------------------------------

    async def create_pipeline(self, p: Pipeline) -> Pipeline:
        return await self._send_pipeline("POST", "/pipelines", p)

    async def get_pipeline(self, name: str) -> Pipeline:
        path = f"/pipelines/{_segment(name, 'name')}"
        return self._structure(await self._get_one(path), Pipeline, "GET", path)

    async def update_pipeline(self, p: Pipeline) -> Pipeline:
        return await self._send_pipeline("PUT", f"/pipelines/{_segment(p.name, 'name')}", p)

    async def delete_pipeline(self, name: str) -> None:
        await self._request("DELETE", f"/pipelines/{_segment(name, 'name')}")

    # -- logs and messages ---------------------------------------------------------------

    async def get_logs(
        self,
        pipeline: str | None = None,
        driver: str | None = None,
        run_id: str | None = None,
    ) -> list[LogEntry]:
        """The stored log lines matching every filter given."""
        query = {
            key: value
            for key, value in (("pipeline", pipeline), ("driver", driver), ("runid", run_id))
            if value is not None
        }
        answer = await self._request("GET", "/logs", params=query)
        if answer is None:
            return []
        if not isinstance(answer, list):
            raise _unexpected("GET", "/logs", answer, "a list of log lines")
        return [log_entry(item) for item in answer]

    async def post_log(self, log: LogEntry) -> None:
        await self._request("POST", "/logs", body=converter.unstructure(log))

    async def stream_logs(self, run_id: str, driver: str | None = None) -> AsyncIterator[LogEntry]:
        """Follow a run's log lines as the server relays them (Server-Sent Events).

        Without ``driver``, every driver's lines of the run; the server first replays what
        it has stored. Heartbeats are skipped. The iteration ends when the server closes
        the stream; a caller that stops early (``break``) closes the connection, at once
        with ``contextlib.aclosing(client.stream_logs(...))``.
        """
        run = _segment(run_id, "run id")
        path = (
            f"/logs/streams/{_segment(driver, 'driver')}/{run}"
            if driver is not None
            else f"/logs/pipeline/{run}"
        )
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout, sock_read=self._stream_idle_timeout
        )
        response = await self._open("GET", path, timeout=timeout, accept="text/event-stream")
        try:
            async for data in _sse_data(response.content):
                try:
                    value: Any = orjson.loads(data)
                except orjson.JSONDecodeError:
                    value = data
                yield log_entry(value)
        except TimeoutError:  # before ClientConnectionError: aiohttp's timeouts are both
            raise APIUnavailable(
                "GET",
                path,
                f"nothing, not even a heartbeat, for {self._stream_idle_timeout:g}s",
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            return  # the server went away mid-stream: the stream is over
        finally:
            response.close()

    async def broadcast_message(self, message: DriverMessage) -> dict[str, Any]:
        """Hand a DriverMessage to the server to publish to drivers."""
        answer = await self._request(
            "POST", "/drivers/broadcast-message", body=orjson.loads(encode_driver_message(message))
        )
        return answer if isinstance(answer, dict) else {}

    # -- plumbing ------------------------------------------------------------------------

    async def _send_definition(
        self, method: str, path: str, d: ResourceDefinition
    ) -> ResourceDefinition:
        answer = await self._request(method, path, body=converter.unstructure(d))
        return d if answer is None else self._structure(answer, ResourceDefinition, method, path)

    async def _send_pipeline(self, method: str, path: str, p: Pipeline) -> Pipeline:
        answer = await self._request(method, path, body=converter.unstructure(p))
        return p if answer is None else self._structure(answer, Pipeline, method, path)

    async def _get_one(self, path: str) -> Any:
        answer = await self._request("GET", path)
        if answer is None:  # Go marshals a missing object as null
            raise NotFound(200, "GET", path, "the server answered null")
        return answer

    def _resource(self, value: Any, method: str, path: str) -> Resource:
        try:
            return resource_from_json(value)
        except DecodeError as exc:
            raise ConveyorAPIError(200, method, path, f"unexpected answer: {exc}") from None

    def _structure(self, value: Any, cls: type[T], method: str, path: str) -> T:
        try:
            return converter.structure(value, cls)
        except (ClassValidationError, TypeError, ValueError):
            raise _unexpected(method, path, value, f"a {cls.__name__}") from None

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

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One call: the decoded JSON answer (None for an empty or non-JSON body)."""
        response = await self._open(method, path, body=body, params=params)
        try:
            raw = await response.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise APIUnavailable(method, path, _describe(exc, self.timeout)) from None
        finally:
            response.release()
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None  # e.g. Fiber's "Created" after POST /logs

    async def _open(
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
        telemetry = self._telemetry or Telemetry()
        self._telemetry = telemetry
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
        tries = self.attempts if method in IDEMPOTENT else 1
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
                reason = _describe(exc, self.timeout)
                # A certificate that fails verification fails the same way next time.
                if attempt < tries and not isinstance(exc, aiohttp.ClientSSLError):
                    await self._pause(method, path, attempt, reason)
                    continue
                raise APIUnavailable(method, path, _after(reason, attempt)) from None
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
            if response.status in RETRY_STATUSES and attempt < tries:
                await self._pause(method, path, attempt, f"answered {response.status}")
                continue
            raise self._error(response, raw, method, path)

    def _error(
        self, response: aiohttp.ClientResponse, raw: bytes, method: str, path: str
    ) -> ConveyorAPIError:
        text = _error_text(raw) or response.reason or ""
        if response.status == 401 and self.auth is None:
            text += " (the server requires authentication: configure --tls-cert and --tls-key)"
        not_found = response.status == 404 or (
            method == "GET" and response.status == 500 and _NOT_FOUND_TEXT.search(text)
        )
        error_class = NotFound if not_found else ConveyorAPIError
        return error_class(response.status, method, path, text)

    async def _pause(self, method: str, path: str, attempt: int, reason: str) -> None:
        # Half fixed, half random: spread the retries of many drivers, but never retry at once.
        ceiling = min(self._backoff_cap, self._backoff * 2 ** (attempt - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if self._log is not None:
            self._log.warning(
                "api call failed; retrying",
                method=method,
                path=path,
                reason=reason,
                attempt=attempt,
                delay=round(delay, 3),
            )
        await asyncio.sleep(delay)


def _traced(headers: dict[str, str]) -> dict[str, str]:
    """Headers with the current trace context (the call's CLIENT span) injected."""
    propagate.inject(headers)
    return headers


def _segment(value: str | None, what: str) -> str:
    """One path segment, percent-encoded: a name with ``/`` stays one segment."""
    if not value:
        raise ValueError(f"{what} must not be empty")
    return quote(value, safe="")


def _unexpected(method: str, path: str, value: Any, wanted: str) -> ConveyorAPIError:
    excerpt = orjson.dumps(value)[:_TEXT_LIMIT].decode(errors="replace")
    return ConveyorAPIError(200, method, path, f"unexpected answer, not {wanted}: {excerpt}")


def _error_text(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:_TEXT_LIMIT].decode(errors="replace").strip()
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return raw[:_TEXT_LIMIT].decode(errors="replace").strip()


async def _read_quietly(response: aiohttp.ClientResponse) -> bytes:
    try:
        return await response.read()
    except (aiohttp.ClientError, TimeoutError):
        return b""
    finally:
        response.release()


def _describe(exc: BaseException, timeout: float | None = None) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s" if timeout else "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__


def _after(reason: str, attempts: int) -> str:
    return reason if attempts == 1 else f"{reason} ({attempts} attempts)"


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The ``data`` of each Server-Sent Event; comments (heartbeats) and other fields skipped.

    An event ends at an empty line; one cut off by the end of the stream is dropped, as the
    SSE specification says.
    """
    buffer = bytearray()
    data: list[str] = []
    async for chunk in content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).rstrip(b"\r")
            del buffer[: end + 1]
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
                continue
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                data.append(value.removeprefix(b" ").decode("utf-8", errors="replace"))
        if len(buffer) > _SSE_LINE_LIMIT:
            raise aiohttp.ClientPayloadError("a Server-Sent Events line is too long")
