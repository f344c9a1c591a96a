"""Typed specs: a resource's ``spec`` structured into a class, and that class as a JSON Schema.

A handler registered with ``spec=BuildSpec`` gets ``ctx.spec`` as a ``BuildSpec``. The spec
is structured here, before the handler is called, so that a typo or a missing field is one
immediate, permanent failure naming every bad field by path (``spec.timeout_s: expected
int, got 'ten'``) instead of a ``KeyError`` deep in a build, retried with backoff.

Structuring is strict where cattrs is lenient by default (``"10"`` is not an int, ``"abc"``
is not a list, an unknown key is an error), so that it accepts exactly what the JSON Schema
of :func:`json_schema` accepts: the one the Conveyor server validates resources against.
Spec classes are attrs classes or dataclasses whose fields are JSON-shaped: ``str``,
``int``, ``float``, ``bool``, ``Any``, enums, ``Literal``, ``X | None``, ``list[X]``,
``tuple[X, ...]``, ``dict[str, X]`` and nested spec classes.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    list_structure_factory,
    mapping_structure_factory,
)
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from .errors import ConfigurationError
from .outcomes import Fail

T = TypeVar("T")

#: The draft the Conveyor server compiles definitions with (santhosh-tekuri/jsonschema v5's
#: default): stated, so that any validator reads the schema the same way.
DRAFT = "https://json-schema.org/draft/2020-12/schema"

_PRIMITIVES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_ARRAYS = (list, Sequence, MutableSequence)
_MAPPINGS = (dict, Mapping)


class InvalidSpec(Fail):
    """A spec that does not fit its class: a permanent failure, never retried.

    ``errors`` names every bad field by path, one string each (``spec.repo: required``).
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid spec: " + "; ".join(errors), {"errors": errors})
        self.errors = errors


class _WrongType(TypeError):
    """A JSON value of the wrong kind; its text is the whole problem."""


# -- structuring -----------------------------------------------------------------------------


def structure(value: Any, cls: type[T]) -> T:
    """``value`` (a resource's JSON spec) as a ``cls``, or :class:`InvalidSpec` naming why.

    A missing spec (``null``) is refused like any other non-object, as the schema refuses
    it: what passes here is what the server accepts, no more.
    """
    if isinstance(value, cls):
        return value
    try:
        return _converter.structure(value, cls)
    except Exception as exc:
        raise InvalidSpec(_problems(exc, "spec")) from None


def unstructure(spec: Any) -> Any:
    """A spec object as the JSON the server keeps; other values as they are."""
    return _converter.unstructure(spec) if is_spec_class(type(spec)) else spec


def is_spec_class(cls: Any) -> bool:
    return isinstance(cls, type) and (attrs.has(cls) or dataclasses.is_dataclass(cls))


def check(cls: Any) -> None:
    """Refuse, at registration, a spec class that could not be structured or described."""
    if not is_spec_class(cls):
        raise ConfigurationError(
            f"spec={cls!r} is not usable: it must be an attrs class or a dataclass"
        )
    json_schema(cls)


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _problems(exc: BaseException, path: str) -> list[str]:
    """One ``path: problem`` line per leaf error of cattrs' exception tree."""
    if isinstance(exc, ClassValidationError | IterableValidationError):
        found: list[str] = []
        with_notes, without_notes = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(note, AttributeValidationNote):
                found += _problems(sub, f"{path}.{note.name}")
            elif isinstance(note, IterableValidationNote):
                found += _problems(sub, f"{path}[{note.index!r}]")
            else:
                found += _problems(sub, path)
        for sub in without_notes:
            found += _problems(sub, path)
        return found
    if isinstance(exc, ForbiddenExtraKeysError):
        return [f"{path}.{key}: unknown field" for key in sorted(exc.extra_fields)]
    if isinstance(exc, KeyError):
        return [f"{path}: required"]
    return [f"{path}: {exc}"]


def _strict_primitive(kind: type) -> Callable[[Any, Any], Any]:
    name = {str: "str", int: "int", float: "number", bool: "bool"}[kind]

    def hook(value: Any, _type: Any) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)  # JSON Schema's "integer" takes 10.0, so the server does
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise _WrongType(f"expected {name}, got {_shown(value)}")
        return value

    return hook


def _strict_enum(cls: type[enum.Enum], _converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    members = {member.value: member for member in cls}

    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) or value not in members:
            choices = ", ".join(repr(v) for v in members)
            raise _WrongType(f"expected one of {choices}, got {_shown(value)}")
        return members[value]

    return hook


def _strict_literal(cls: Any, _converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    allowed = get_args(cls)

    def hook(value: Any, _type: Any) -> Any:
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            choices = ", ".join(repr(v) for v in allowed)
            raise _WrongType(f"expected one of {choices}, got {_shown(value)}")
        return value

    return hook


def _checked(kind: type, what: str, inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def hook(value: Any, type_: Any) -> Any:
        if not isinstance(value, kind):
            raise _WrongType(f"expected {what}, got {_shown(value)}")
        return inner(value, type_)

    return hook


def _is_array(t: Any) -> bool:
    origin = get_origin(t)
    if origin is tuple:
        args = get_args(t)
        return len(args) == 2 and args[1] is Ellipsis
    return origin in _ARRAYS


def _array_factory(t: Any, converter: Any) -> Callable[[Any, Any], Any]:
    if get_origin(t) is tuple:
        return _checked(list, "array", homogenous_tuple_structure_factory(t, converter))
    return _checked(list, "array", list_structure_factory(t, converter))


def _is_literal(t: Any) -> bool:
    return get_origin(t) is Literal


def _is_mapping(t: Any) -> bool:
    return get_origin(t) in _MAPPINGS


def _mapping_factory(t: Any, converter: Any) -> Callable[[Any, Any], Any]:
    return _checked(dict, "object", mapping_structure_factory(t, converter))


def _class_factory(cls: Any, converter: Any) -> Callable[[Any, Any], Any]:
    inner = make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True)
    return _checked(dict, "object", inner)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    for kind in _PRIMITIVES:
        converter.register_structure_hook(kind, _strict_primitive(kind))
    converter.register_structure_hook_factory(
        lambda t: isinstance(t, type) and issubclass(t, enum.Enum), _strict_enum
    )
    converter.register_structure_hook_factory(_is_literal, _strict_literal)
    converter.register_structure_hook_factory(_is_array, _array_factory)
    converter.register_structure_hook_factory(_is_mapping, _mapping_factory)
    converter.register_structure_hook_factory(is_spec_class, _class_factory)
    return converter


_converter = _make_converter()


# -- JSON Schema --------------------------------------------------------------------------------


def json_schema(cls: type[Any]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a spec class: what :func:`structure` accepts.

    Fields without a default are ``required``; defaults are stated; nested spec classes
    are ``$defs``; no other keys are allowed (``additionalProperties: false``), as
    :func:`structure` refuses them. Raises :class:`ConfigurationError` for a field type
    that has no JSON form.
    """
    defs: dict[str, dict[str, Any]] = {}
    names: dict[type, str] = {cls: "#"}  # the root refers to itself as "#"
    root = _object_schema(cls, defs, names)
    schema: dict[str, Any] = {"$schema": DRAFT, **root}
    if defs:
        schema["$defs"] = defs
    return schema


def _object_schema(
    cls: type[Any], defs: dict[str, dict[str, Any]], names: dict[type, str]
) -> dict[str, Any]:
    name = cls.__name__ if cls.__name__ not in defs else f"{cls.__module__}.{cls.__qualname__}"
    if cls not in names:  # registered before the fields: a class that nests itself refers to it
        names[cls] = f"#/$defs/{name}"
        defs[name] = {}
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field_name, hint, default in _fields(cls):
        where = f"{cls.__qualname__}.{field_name}"
        prop = _type_schema(hint, defs, names, where)
        if default is _REQUIRED:
            required.append(field_name)
        elif default is not _UNSTATED:
            prop = {**prop, "default": _converter.unstructure(default)}
        properties[field_name] = prop
    schema: dict[str, Any] = {"title": cls.__name__, "type": "object"}
    doc = _summary(cls)
    if doc:
        schema["description"] = doc
    schema["properties"] = properties
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    if names[cls] != "#":
        defs[name] = schema
    return schema


_REQUIRED = object()
#: A default computed from the other fields (``Factory(takes_self=True)``): optional, unstated.
_UNSTATED = object()


def _fields(cls: type[Any]) -> list[tuple[str, Any, Any]]:
    """(name on the wire, type, default or _REQUIRED) of each field cattrs structures."""
    found: list[tuple[str, Any, Any]] = []
    if attrs.has(cls):
        attrs.resolve_types(cls)
        for a in attrs.fields(cls):
            if not a.init:
                continue
            default: Any = _REQUIRED
            if isinstance(a.default, attrs.Factory):  # type: ignore[arg-type]
                factory: Any = a.default
                default = _UNSTATED if factory.takes_self else factory.factory()
            elif a.default is not attrs.NOTHING:
                default = a.default
            found.append((a.alias or a.name, a.type, default))
        return found
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = _REQUIRED
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        found.append((f.name, hints[f.name], default))
    return found


def _type_schema(
    hint: Any, defs: dict[str, dict[str, Any]], names: dict[type, str], where: str
) -> dict[str, Any]:
    if hint is Any:
        return {}
    if hint is None or hint is types.NoneType:
        return {"type": "null"}
    if hint in _PRIMITIVES:
        return {"type": _PRIMITIVES[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [member.value for member in hint]}
    origin = get_origin(hint)
    if _is_literal(hint):
        return {"enum": list(get_args(hint))}
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(hint)
        others = [arg for arg in args if arg is not types.NoneType]
        if len(others) == 1 and len(args) == 2:
            inner = _type_schema(others[0], defs, names, where)
            if set(inner) == {"type"} and isinstance(inner["type"], str):
                return {"type": [inner["type"], "null"]}
            return {"anyOf": [inner, {"type": "null"}]}
    elif _is_array(hint):
        return {"type": "array", "items": _type_schema(get_args(hint)[0], defs, names, where)}
    elif _is_mapping(hint):
        key, value = get_args(hint) or (str, Any)
        if key is str:
            return {
                "type": "object",
                "additionalProperties": _type_schema(value, defs, names, where),
            }
    elif is_spec_class(hint):
        if hint not in names:
            _object_schema(hint, defs, names)
        return {"$ref": names[hint]}
    raise ConfigurationError(
        f"spec field {where} has type {_type_name(hint)}, which has no JSON form here: use "
        "str, int, float, bool, Any, an enum, Literal, X | None, list[X], tuple[X, ...], "
        "dict[str, X] or another attrs class or dataclass"
    )


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _summary(cls: type[Any]) -> str:
    """The first paragraph of the class's own docstring (not a generated one)."""
    doc = cls.__dict__.get("__doc__") or ""
    if dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())
