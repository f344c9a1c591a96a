"""The async client of the Conveyor API server (``docs/protocol.md#the-api-server``), ``ctx.api``.

Each method says what to ask and how to read the answer; :mod:`.transport` sends the call
(one session, signing, tracing, retries) and :mod:`.sse` reads the live log stream.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from cattrs import ClassValidationError
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
from .errors import (
    APIUnavailableError,
    ConveyorAPIError,
    NotFoundError,
    unexpected_answer,
)
from .models import Pipeline, ResourceCreated, ResourceDefinition, converter, log_entry
from .retry import RetryPolicy
from .sse import event_data
from .transport import Transport

if TYPE_CHECKING:
    from ..settings import Settings
    from ..tls import TLSConfig
    from .auth import CertificateAuth

T = TypeVar("T")


class ConveyorClient:
    """Reads and changes Conveyor resources, definitions, pipelines and logs.

    ``base_url`` may end with a slash and carry a path prefix (a server behind a reverse
    proxy). ``auth`` signs every request when the server runs with authentication on;
    ``ssl`` verifies an ``https`` API server against the operator's CA. ``timeout`` bounds
    each attempt of a call; ``attempts`` is how often an idempotent call is tried.
    A live log stream has no total timeout, but ends with :class:`APIUnavailableError` when
    nothing (not even a heartbeat) arrives for ``stream_idle_timeout`` seconds.
    ``telemetry`` is the driver's, handed in by the runtime (see :class:`.Transport`).
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
        telemetry: Telemetry | None = None,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigurationError(f"API URL {url.with_password(None)} is not an http(s) URL")
        if attempts < 1:
            raise ConfigurationError(f"attempts must be at least 1, not {attempts!r}")
        self.base_url = str(url).rstrip("/")
        self._stream_idle_timeout = stream_idle_timeout
        self._transport = Transport(
            self.base_url,
            timeout=timeout,
            retry=RetryPolicy(attempts, backoff, backoff_cap),
            auth=auth,
            ssl=ssl,
            log=log,
            telemetry=telemetry,
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        tls: TLSConfig | None = None,
        *,
        log: FilteringBoundLogger | None = None,
        telemetry: Telemetry | None = None,
    ) -> ConveyorClient:
        """The client the runtime hands to handlers: signed requests when an identity is set."""
        auth = None
        if tls and tls.identity:
            from .auth import CertificateAuth

            auth = CertificateAuth(tls.identity)
        ssl_context = tls.ssl_context() if tls and settings.api_url.startswith("https") else None
        return cls(settings.api_url, auth=auth, ssl=ssl_context, log=log, telemetry=telemetry)

    def __repr__(self) -> str:
        return f"<ConveyorClient {URL(self.base_url).with_password(None)}>"

    @property
    def timeout(self) -> float:
        """Seconds each attempt of a call may take."""
        return self._transport.timeout

    @property
    def attempts(self) -> int:
        """How often an idempotent call is tried."""
        return self._transport.retry.attempts

    @property
    def auth(self) -> CertificateAuth | None:
        """What signs every request, when the server runs with authentication on."""
        return self._transport.auth

    async def close(self) -> None:
        await self._transport.close()

    # -- health --------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """``{"status": "healthy", "time": <unix>}`` from a live server."""
        answer = await self._transport.request("GET", "/health")
        return answer if isinstance(answer, dict) else {}

    # -- resources -----------------------------------------------------------------------

    async def create_resource(self, resource: Resource) -> ResourceCreated:
        """Store a new resource; the server validates it and publishes its ``create`` event."""
        answer = await self._transport.request(
            "POST", "/resources", body=converter.unstructure(resource)
        )
        return self._structure(answer, ResourceCreated, "POST", "/resources")

    async def list_resources(self, type: str) -> list[Resource]:
        path = f"/resources/{_segment(type, 'resource type')}"
        answer = await self._transport.request("GET", path)
        if answer is None:
            return []
        if not isinstance(answer, list):
            raise unexpected_answer("GET", path, answer, "a list of resources")
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
        answer = await self._transport.request("PUT", path, body=converter.unstructure(resource))
        return resource if answer is None else self._resource(answer, "PUT", path)

    async def delete_resource(self, type: str, name: str) -> None:
        path = f"/resources/{_segment(type, 'resource type')}/{_segment(name, 'name')}"
        await self._transport.request("DELETE", path)

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
        await self._transport.request("DELETE", f"/resource-definitions/{_segment(name, 'name')}")

    # -- pipelines -----------------------------------------------------------------------

    async def create_pipeline(self, p: Pipeline) -> Pipeline:
        return await self._send_pipeline("POST", "/pipelines", p)

    async def get_pipeline(self, name: str) -> Pipeline:
        path = f"/pipelines/{_segment(name, 'name')}"
        return self._structure(await self._get_one(path), Pipeline, "GET", path)

    async def update_pipeline(self, p: Pipeline) -> Pipeline:
        return await self._send_pipeline("PUT", f"/pipelines/{_segment(p.name, 'name')}", p)

    async def delete_pipeline(self, name: str) -> None:
        await self._transport.request("DELETE", f"/pipelines/{_segment(name, 'name')}")

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
        answer = await self._transport.request("GET", "/logs", params=query)
        if answer is None:
            return []
        if not isinstance(answer, list):
            raise unexpected_answer("GET", "/logs", answer, "a list of log lines")
        return [log_entry(item) for item in answer]

    async def post_log(self, log: LogEntry) -> None:
        await self._transport.request("POST", "/logs", body=converter.unstructure(log))

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
        response = await self._transport.open(
            "GET", path, timeout=timeout, accept="text/event-stream"
        )
        try:
            async for data in event_data(response.content):
                try:
                    value: Any = orjson.loads(data)
                except orjson.JSONDecodeError:
                    value = data
                yield log_entry(value)
        except TimeoutError:  # before ClientConnectionError: aiohttp's timeouts are both
            raise APIUnavailableError(
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
        answer = await self._transport.request(
            "POST", "/drivers/broadcast-message", body=orjson.loads(encode_driver_message(message))
        )
        return answer if isinstance(answer, dict) else {}

    # -- plumbing ------------------------------------------------------------------------

    async def _send_definition(
        self, method: str, path: str, d: ResourceDefinition
    ) -> ResourceDefinition:
        answer = await self._transport.request(method, path, body=converter.unstructure(d))
        return d if answer is None else self._structure(answer, ResourceDefinition, method, path)

    async def _send_pipeline(self, method: str, path: str, p: Pipeline) -> Pipeline:
        answer = await self._transport.request(method, path, body=converter.unstructure(p))
        return p if answer is None else self._structure(answer, Pipeline, method, path)

    async def _get_one(self, path: str) -> Any:
        answer = await self._transport.request("GET", path)
        if answer is None:  # Go marshals a missing object as null
            raise NotFoundError(200, "GET", path, "the server answered null")
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
            raise unexpected_answer(method, path, value, f"a {cls.__name__}") from None


def _segment(value: str | None, what: str) -> str:
    """One path segment, percent-encoded: a name with ``/`` stays one segment."""
    if not value:
        raise ValueError(f"{what} must not be empty")
    return quote(value, safe="")
