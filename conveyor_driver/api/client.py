"""A thin async client of the Conveyor API server (PROTOCOL.md section 5).

One ``aiohttp.ClientSession`` per process, opened on first use and closed by the runtime on
shutdown: handlers share its connection pool instead of opening their own.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from ..models import Resource, converter


class ConveyorAPIError(Exception):
    """A non-2xx answer: the status, the request, and the server's ``error`` text."""

    def __init__(self, status: int, method: str, path: str, error: str) -> None:
        super().__init__(f"{method} {path} answered {status}: {error}")
        self.status = status
        self.method = method
        self.path = path
        self.error = error


class NotFound(ConveyorAPIError):
    """A 404: the resource (or definition, or pipeline) does not exist."""


class ConveyorClient:
    """Reads and changes Conveyor resources; every call has a timeout."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"<ConveyorClient {self.base_url}>"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def health(self) -> dict[str, Any]:
        answer = await self._request("GET", "/health")
        return answer if isinstance(answer, dict) else {}

    async def get_resource(self, resource_type: str, name: str) -> Resource:
        return converter.structure(
            await self._request("GET", f"/resources/{resource_type}/{name}"), Resource
        )

    async def list_resources(self, resource_type: str) -> list[Resource]:
        return converter.structure(
            await self._request("GET", f"/resources/{resource_type}"), list[Resource]
        )

    async def create_resource(self, resource: Resource) -> dict[str, Any]:
        answer = await self._request("POST", "/resources/", converter.unstructure(resource))
        return answer if isinstance(answer, dict) else {}

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        data = None if body is None else orjson.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else None
        async with self._session.request(
            method, self.base_url + path, data=data, headers=headers
        ) as response:
            raw = await response.read()
            if response.status >= 300:
                error_text = _error_text(raw) or response.reason or ""
                error_class = NotFound if response.status == 404 else ConveyorAPIError
                raise error_class(response.status, method, path, error_text)
            return orjson.loads(raw) if raw else None


def _error_text(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode(errors="replace").strip()
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return raw[:200].decode(errors="replace").strip()
