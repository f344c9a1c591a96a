"""attrs validators for settings classes, each refusing a value with one readable line.

Why a module of their own: ``Settings`` and ``LokiConfig`` share them, and keeping the rules
on the classes (not in the CLI, not in the environment reader) is what makes a value mean
the same whether it came from ``CONVEYOR_*``, a command-line option or Python. Each raises
:class:`~conveyor_driver.errors.InvalidSettingError` naming the field, which the reader turns
into the variable or option the user wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import urlsplit

import attrs

from .errors import InvalidSettingError

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def number(
    kind: type[int] | type[float], *, minimum: float | None = None, above: float | None = None
) -> Validator:
    """A whole number (``int``) or any number (``float``) within bounds; None passes."""
    what = "a whole number" if kind is int else "a number"

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise InvalidSettingError(f"must be {what}, not {value!r}", attribute.name)
        if minimum is not None and not value >= minimum:
            raise InvalidSettingError(
                f"must be at least {minimum:g}, not {value!r}", attribute.name
            )
        if above is not None and not value > above:
            raise InvalidSettingError(
                f"must be greater than {above:g}, not {value!r}", attribute.name
            )

    return check


def port() -> Validator:
    """A TCP port a server can listen on (1-65535); None (off) passes."""
    bounds = number(int, minimum=1)

    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        bounds(instance, attribute, value)
        if isinstance(value, int) and value > 65535:
            raise InvalidSettingError(
                f"must be a port from 1 to 65535, not {value}", attribute.name
            )

    return check


def one_of(allowed: Collection[str]) -> Validator:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in allowed:
            raise InvalidSettingError(
                f"must be one of {', '.join(allowed)}, not {value!r}", attribute.name
            )

    return check


def url(schemes: Collection[str], rule: str) -> Validator:
    """A URL with one of ``schemes`` and a host; ``rule`` is the sentence a user reads."""

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        values = value if isinstance(value, tuple) else (value,)
        if not values:
            raise InvalidSettingError(f"is empty: {rule}", attribute.name)
        for item in values:
            if not isinstance(item, str) or not is_url(item, schemes):
                raise InvalidSettingError(f"{item!r} is not usable: {rule}", attribute.name)

    return check


def is_url(value: str, schemes: Collection[str]) -> bool:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        return False
    return parts.scheme.lower() in schemes and bool(parts.hostname)


def non_empty(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidSettingError(f"must not be empty, not {value!r}", attribute.name)
