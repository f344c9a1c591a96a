"""FakeConveyorClient: ``ctx.api`` in memory, for testing handlers without a server.

It has every method of :class:`~conveyor_driver.api.ConveyorClient` and answers the way the
server does: a created resource is version 1 and every update adds a version, an unknown
name raises :class:`~conveyor_driver.api.NotFoundError`, a duplicate create fails. Each call is
recorded in ``calls``, so a test can assert what a handler asked for.

api = FakeConveyorClient(resources=[Resource(name="app", type="pipeline", spec={...})])
ctx = FakeContext(resource, api=api)
await handler(ctx)
assert api.calls_to("update_resource")[0].arguments["resource"].spec["built"]
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import attrs

from ..api.client import ConveyorClient
from ..api.errors import ConveyorAPIError, NotFoundError
from ..api.models import Pipeline, ResourceCreated, ResourceDefinition
from ..models import DriverMessage, LogEntry, Resource


@attrs.frozen
class Call:
    """One method call: its name and its arguments by parameter name."""

    method: str
    arguments: dict[str, Any]


class FakeConveyorClient(ConveyorClient):
    """An in-memory Conveyor API with the client's methods and a record of the calls."""

    def __init__(
        self,
        *,
        resources: Iterable[Resource] = (),
        definitions: Iterable[ResourceDefinition] = (),
        pipelines: Iterable[Pipeline] = (),
        logs: Iterable[LogEntry] = (),
    ) -> None:
        super().__init__("http://fake-conveyor.invalid")
        self.calls: list[Call] = []
        self._versions: dict[tuple[str, str], list[Resource]] = {}
        self.definitions: dict[str, ResourceDefinition] = {d.name: d for d in definitions}
        self.pipelines: dict[str, Pipeline] = {p.name: p for p in pipelines}
        self.logs: list[LogEntry] = list(logs)
        self.messages: list[DriverMessage] = []
        for resource in resources:
            self.add_resource(resource)

    def __repr__(self) -> str:
        return f"<FakeConveyorClient resources={len(self._versions)} calls={len(self.calls)}>"

    # -- for tests ------------------------------------------------------------------------

    def add_resource(self, resource: Resource) -> Resource:
        """Store a resource as a new version without recording a call (test set-up)."""
        key = (resource.type, resource.name)
        versions = self._versions.setdefault(key, [])
        stored = attrs.evolve(
            resource,
            id=resource.id or (versions[-1].id if versions else str(uuid.uuid4())),
            metadata={**resource.metadata, "version": str(len(versions) + 1)},
        )
        versions.append(stored)
        return stored

    @property
    def resources(self) -> dict[tuple[str, str], Resource]:
        """The latest version of every resource, by (type, name)."""
        return {key: versions[-1] for key, versions in self._versions.items()}

    def versions(self, type: str, name: str) -> list[Resource]:
        return list(self._versions.get((type, name), []))

    def calls_to(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    def _record(self, method: str, **arguments: Any) -> None:
        self.calls.append(Call(method, arguments))

    # -- the client's methods -------------------------------------------------------------

    async def close(self) -> None:
        return None

    async def health(self) -> dict[str, Any]:
        self._record("health")
        return {"status": "healthy", "time": int(time.time())}

    async def create_resource(self, resource: Resource) -> ResourceCreated:
        self._record("create_resource", resource=resource)
        if (resource.type, resource.name) in self._versions:
            raise ConveyorAPIError(
                500,
                "POST",
                "/resources",
                f"resource with name {resource.name} and type {resource.type} already exists",
            )
        # The server replaces the metadata of a new resource.
        stored = self.add_resource(attrs.evolve(resource, id="", metadata={}))
        return ResourceCreated(
            name=stored.name,
            runid=str(uuid.uuid4()),
            version=stored.metadata["version"],
            message="Resource created successfully",
        )

    async def list_resources(self, type: str) -> list[Resource]:
        self._record("list_resources", type=type)
        return [versions[-1] for (kind, _), versions in self._versions.items() if kind == type]

    async def get_resource(self, type: str, name: str) -> Resource:
        self._record("get_resource", type=type, name=name)
        return self._latest(type, name, "GET")

    async def get_resource_version(self, type: str, name: str, version: str | int) -> Resource:
        self._record("get_resource_version", type=type, name=name, version=version)
        for resource in self._versions.get((type, name), []):
            if resource.metadata.get("version") == str(version):
                return resource
        raise NotFoundError(
            404,
            "GET",
            f"/resources/{type}/{name}/{version}",
            f"resource {type}/{name} has no version {version}",
        )

    async def update_resource(self, resource: Resource) -> Resource:
        self._record("update_resource", resource=resource)
        self._latest(resource.type, resource.name, "PUT")
        return self.add_resource(resource)

    async def delete_resource(self, type: str, name: str) -> None:
        self._record("delete_resource", type=type, name=name)
        self._latest(type, name, "DELETE")
        del self._versions[(type, name)]

    async def create_resource_definition(self, d: ResourceDefinition) -> ResourceDefinition:
        self._record("create_resource_definition", d=d)
        if d.name in self.definitions:
            raise ConveyorAPIError(
                500,
                "POST",
                "/resource-definitions",
                f"resource definition {d.name} already exists",
            )
        return self._store_definition(d)

    async def apply_resource_definition(self, d: ResourceDefinition) -> ResourceDefinition:
        self._record("apply_resource_definition", d=d)
        return self._store_definition(d)

    async def get_resource_definition(self, name: str) -> ResourceDefinition:
        self._record("get_resource_definition", name=name)
        return self._definition(name, "GET")

    async def update_resource_definition(self, d: ResourceDefinition) -> ResourceDefinition:
        self._record("update_resource_definition", d=d)
        self._definition(d.name, "PUT")
        return self._store_definition(d)

    async def delete_resource_definition(self, name: str) -> None:
        self._record("delete_resource_definition", name=name)
        self._definition(name, "DELETE")
        del self.definitions[name]

    async def create_pipeline(self, p: Pipeline) -> Pipeline:
        self._record("create_pipeline", p=p)
        if p.name in self.pipelines:
            raise ConveyorAPIError(500, "POST", "/pipelines", f"pipeline {p.name} already exists")
        self.pipelines[p.name] = p
        return p

    async def get_pipeline(self, name: str) -> Pipeline:
        self._record("get_pipeline", name=name)
        return self._pipeline(name, "GET")

    async def update_pipeline(self, p: Pipeline) -> Pipeline:
        self._record("update_pipeline", p=p)
        self._pipeline(p.name, "PUT")
        self.pipelines[p.name] = p
        return p

    async def delete_pipeline(self, name: str) -> None:
        self._record("delete_pipeline", name=name)
        self._pipeline(name, "DELETE")
        del self.pipelines[name]

    async def get_logs(
        self,
        pipeline: str | None = None,
        driver: str | None = None,
        run_id: str | None = None,
    ) -> list[LogEntry]:
        self._record("get_logs", pipeline=pipeline, driver=driver, run_id=run_id)
        return [
            entry
            for entry in self.logs
            if (pipeline is None or entry.pipeline == pipeline)
            and (driver is None or entry.driver == driver)
            and (run_id is None or entry.runid == run_id)
        ]

    async def post_log(self, log: LogEntry) -> None:
        self._record("post_log", log=log)
        self.logs.append(log)

    async def stream_logs(self, run_id: str, driver: str | None = None) -> AsyncIterator[LogEntry]:
        """The stored lines of the run, then the end (a server that closed the stream)."""
        self._record("stream_logs", run_id=run_id, driver=driver)
        for entry in list(self.logs):
            if entry.runid == run_id and (driver is None or entry.driver == driver):
                yield entry

    async def broadcast_message(self, message: DriverMessage) -> dict[str, Any]:
        self._record("broadcast_message", message=message)
        self.messages.append(message)
        return {"message": "message published"}

    # -- lookups ---------------------------------------------------------------------------

    def _latest(self, type: str, name: str, method: str) -> Resource:
        versions = self._versions.get((type, name))
        if not versions:
            raise NotFoundError(
                404,
                method,
                f"/resources/{type}/{name}",
                f"resource with name {name} and type {type} not found",
            )
        return versions[-1]

    def _store_definition(self, d: ResourceDefinition) -> ResourceDefinition:
        stored = attrs.evolve(d, id=d.id or str(uuid.uuid4()))
        self.definitions[d.name] = stored
        return stored

    def _definition(self, name: str, method: str) -> ResourceDefinition:
        if name not in self.definitions:
            raise NotFoundError(
                404,
                method,
                f"/resource-definitions/{name}",
                f"resource definition {name} not found",
            )
        return self.definitions[name]

    def _pipeline(self, name: str, method: str) -> Pipeline:
        if name not in self.pipelines:
            raise NotFoundError(404, method, f"/pipelines/{name}", f"pipeline {name} not found")
        return self.pipelines[name]

    async def _request(self, method: str, path: str, **_: Any) -> Any:
        raise AssertionError(f"FakeConveyorClient made a real request: {method} {path}")
