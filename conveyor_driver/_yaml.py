"""Block-style YAML for the manifests ``conveyor-driver manifest`` prints.

Kubernetes manifests are plain mappings, lists, strings, numbers and booleans, so a small
emitter does instead of a YAML library the driver itself would never use. The one subtlety
is a string that YAML would read as something else (``true``, ``1.0``, ``on``, ``null``, a
leading ``-`` or ``*``): such a string is single-quoted (where only ``'`` is escaped, as
``''``), or, when it holds a line break or another control character, double-quoted in
JSON's notation, which YAML's double-quoted style accepts as it is. Everything else stays
plain, as people write it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

# Text YAML 1.1 (what kubectl and PyYAML read) takes as a plain string: it starts with a
# letter or `/`, holds no space, quote or `#`, does not end in `:` (a key would), and is
# none of the words below. Numbers are ints only: a manifest has no floats.
_PLAIN = re.compile(r"[A-Za-z/][A-Za-z0-9_./=(){}\[\]$,:-]*\Z")
# As YAML 1.1 reads them, in any case: booleans and null.
_WORDS = frozenset(["y", "n", "yes", "no", "true", "false", "on", "off", "null"])
_INDENT = "  "


def dump_all(documents: Iterable[Mapping[str, Any]], header: str = "") -> str:
    """Documents separated by ``---``, after ``header`` as ``#`` comment lines."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for document in documents:
        lines.append("---")
        lines.extend(_mapping(document, 0))
    return "\n".join(lines) + "\n"


def _mapping(value: Mapping[str, Any], depth: int) -> list[str]:
    lines: list[str] = []
    pad = _INDENT * depth
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"a mapping key must be a string, not {key!r}")
        head = f"{pad}{_scalar(key)}:"
        if isinstance(item, Mapping) and item:
            lines.append(head)
            lines.extend(_mapping(item, depth + 1))
        elif _is_list(item) and item:
            lines.append(head)
            lines.extend(_sequence(item, depth + 1))
        else:
            lines.append(f"{head} {_scalar(item)}")
    return lines


def _sequence(value: Sequence[Any], depth: int) -> list[str]:
    lines: list[str] = []
    pad = _INDENT * depth
    for item in value:
        if isinstance(item, Mapping) and item:
            # The item's first key goes on the dash's line, the rest under it.
            first, *rest = _mapping(item, depth + 1)
            lines.append(f"{pad}- {first.lstrip()}")
            lines.extend(rest)
        elif _is_list(item) and item:
            first, *rest = _sequence(item, depth + 1)
            lines.append(f"{pad}- {first.lstrip()}")
            lines.extend(rest)
        else:
            lines.append(f"{pad}- {_scalar(item)}")
    return lines


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping):
        return "{}"
    if _is_list(value):
        return "[]"
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _WORDS and value[-1] != ":":
            return value
        if value.isprintable():
            return "'" + value.replace("'", "''") + "'"
        return orjson.dumps(value).decode()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as YAML")
