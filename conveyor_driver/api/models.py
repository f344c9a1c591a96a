"""The shapes only the API server speaks (``pkg/types`` of the Go server).

``Resource``, ``DriverMessage`` and the log line (``LogEntry``) travel over NATS too and
live in :mod:`conveyor_driver.models`. The API reads its answers with a converter of its
own, a copy of the wire converter with the hooks below added: importing this module leaves
the wire converter as it was.
"""

from __future__ import annotations

from typing import Any

import attrs
from cattrs.gen import make_dict_structure_fn

from ..models import LogEntry
from ..models import converter as _wire_converter


@attrs.frozen
class ResourceDefinition:
    """A resource type: its name and the JSON schema the server validates specs with."""

    name: str = ""
    id: str = ""
    description: str = ""
    version: str = ""
    schema: Any = None


@attrs.frozen
class Step:
    """One step of a pipeline: the driver that handles it."""

    name: str = ""
    driver: str = ""
    id: str = ""


@attrs.frozen
class Pipeline:
    """An ordered list of driver steps for one resource type."""

    name: str = ""
    resource: str = ""
    steps: list[Step] = attrs.field(factory=list)
    description: str = ""
    version: str = ""
    metadata: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class ResourceCreated:
    """The server's answer to ``POST /resources``: the run its ``create`` event started."""

    name: str
    runid: str
    version: str = ""
    message: str = ""


#: The wire converter's hooks plus the API's own: what the client structures answers with.
converter = _wire_converter.copy()


def _without_nulls(cls: type[Any]) -> None:
    """Go encodes an empty map or slice as ``null``: read it as the field's default."""
    structure = make_dict_structure_fn(cls, converter)

    def hook(value: Any, _type: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"a JSON {type(value).__name__}, not an object")
        return structure({key: item for key, item in value.items() if item is not None}, cls)

    converter.register_structure_hook(cls, hook)


for _cls in (ResourceDefinition, Step, Pipeline, ResourceCreated):
    _without_nulls(_cls)


def log_entry(value: Any) -> LogEntry:
    """A log line from the server, read leniently.

    Lines on the live stream are whatever drivers published, and not every runtime spells
    the keys the way the server does (``run_id`` for ``runid``), so missing keys read as
    empty and a line that is not a JSON object becomes the message.
    """
    if not isinstance(value, dict):
        return LogEntry(runid="", driver="", pipeline="", timestamp="", message=str(value))

    def text(*keys: str) -> str:
        for key in keys:
            item = value.get(key)
            if item is not None:
                return item if isinstance(item, str) else str(item)
        return ""

    return LogEntry(
        runid=text("runid", "run_id"),
        driver=text("driver"),
        pipeline=text("pipeline"),
        timestamp=text("timestamp"),
        message=text("message"),
    )
