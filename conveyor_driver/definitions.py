"""A driver's typed specs as Conveyor ResourceDefinitions: their schemas, and applying them.

The server validates every resource against its type's definition, so the schema a driver
structures specs with (:mod:`.specs`) is worth publishing as that definition: then a bad
resource is refused when it is created, before any driver sees it. Applying is idempotent:
a definition already equal to the driver's is left alone, and each change is logged.

Resource definitions are the server's, shared by every driver: applying replaces the
schema another driver may have applied for the same resource type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from structlog.typing import FilteringBoundLogger

from . import specs
from .api.errors import NotFoundError
from .api.models import ResourceDefinition

if TYPE_CHECKING:
    from .api import ConveyorClient
    from .app import Driver
    from .settings import Settings


@attrs.frozen
class Change:
    """What applying did to one definition: ``created``, ``updated`` or ``unchanged``.

    ``fields`` names what differed (``schema``, ``description``); ``added``, ``removed``
    and ``changed`` name the top-level spec fields whose schema did.
    """

    name: str
    action: str
    fields: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def describe(self) -> str:
        """``updated build: schema (added ref; removed branch)``: one line for the CLI."""
        text = f"{self.action} {self.name}"
        if self.fields:
            parts = [
                f"{label} {', '.join(names)}"
                for label, names in (
                    ("added", self.added),
                    ("removed", self.removed),
                    ("changed", self.changed),
                )
                if names
            ]
            detail = f" ({'; '.join(parts)})" if parts else ""
            text += f": {', '.join(self.fields)}{detail}"
        return text


def spec_classes(driver: Driver) -> dict[str, type[Any]]:
    """Each resource type the driver types, with its spec class, sorted by type."""
    found: dict[str, type[Any]] = {}
    for route in driver.routes:
        if route.spec is not None:
            for resource_type in route.resource_types:
                found[resource_type] = route.spec
    return dict(sorted(found.items()))


def schemas(driver: Driver) -> dict[str, dict[str, Any]]:
    """The JSON Schema of each typed resource type: what ``conveyor-driver schema`` prints."""
    return {name: specs.json_schema(cls) for name, cls in spec_classes(driver).items()}


def resource_definitions(driver: Driver) -> list[ResourceDefinition]:
    """The ResourceDefinitions the driver's specs describe (description: the class's doc)."""
    return [
        ResourceDefinition(name=name, description=schema.get("description", ""), schema=schema)
        for name, schema in schemas(driver).items()
    ]


async def apply_definitions(
    driver: Driver, client: ConveyorClient, log: FilteringBoundLogger
) -> list[Change]:
    """Create or update the definitions of the driver's typed specs; leave equal ones alone.

    A definition that exists keeps its id and version, and its description when the spec
    class has none. Each change is logged at info, an unchanged definition at debug.
    """
    changes: list[Change] = []
    for wanted in resource_definitions(driver):
        try:
            existing: ResourceDefinition | None = await client.get_resource_definition(wanted.name)
        except NotFoundError:
            existing = None
        if existing is None:
            await client.apply_resource_definition(wanted)
            change = Change(wanted.name, "created")
            log.info("resource definition created", definition=wanted.name)
            changes.append(change)
            continue
        merged = attrs.evolve(
            wanted,
            id=existing.id,
            version=existing.version,
            description=wanted.description or existing.description,
        )
        fields = tuple(
            name
            for name in ("schema", "description")
            if getattr(merged, name) != getattr(existing, name)
        )
        if not fields:
            log.debug("resource definition unchanged", definition=wanted.name)
            changes.append(Change(wanted.name, "unchanged"))
            continue
        await client.apply_resource_definition(merged)
        added, removed, changed = _property_diff(existing.schema, merged.schema)
        change = Change(wanted.name, "updated", fields, added, removed, changed)
        log.info(
            "resource definition updated",
            definition=wanted.name,
            fields=list(fields),
            **{
                key: list(value)
                for key, value in (("added", added), ("removed", removed), ("changed", changed))
                if value
            },
        )
        changes.append(change)
    return changes


async def apply_on_server(driver: Driver, settings: Settings) -> list[str]:
    """``conveyor-driver apply``: apply through a client of ``settings``; one line a type."""
    from .api import ConveyorClient
    from .logs.chain import build_logger
    from .tls import load_tls

    if not spec_classes(driver):
        return [f"nothing to apply: no handler of driver {driver.name!r} has a spec= class"]
    tls = load_tls(settings.tls_cert, settings.tls_key, settings.tls_ca)
    # The lines returned say what changed; retries stay quiet, a failure is one Error: line.
    log = build_logger(level="error", fmt=settings.log_format)
    client = ConveyorClient.from_settings(settings, tls, log=log)
    try:
        changes = await apply_definitions(driver, client, log)
    finally:
        await client.close()
    return [change.describe() for change in changes]


def _property_diff(old: Any, new: Any) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The top-level properties added, removed and changed between two object schemas."""
    before = _properties(old)
    after = _properties(new)
    return (
        tuple(sorted(after.keys() - before.keys())),
        tuple(sorted(before.keys() - after.keys())),
        tuple(sorted(k for k in after.keys() & before.keys() if after[k] != before[k])),
    )


def _properties(schema: Any) -> dict[str, Any]:
    if isinstance(schema, dict) and isinstance(schema.get("properties"), dict):
        return dict(schema["properties"])
    return {}
