"""Typed specs: structured before the handler, refused at once when they do not fit, and
described by a JSON Schema that a validator reads the same way."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any, Literal

import attrs
import pytest
from _helpers import invoke
from _readme import README, parse
from jsonschema import Draft202012Validator

from conveyor_driver import ConfigurationError, Context, Driver, InvalidSpec, Result
from conveyor_driver.outcomes import Action, Kind
from conveyor_driver.specs import json_schema, structure, unstructure
from conveyor_driver.testing import FakeContext, dispatch

#: The page whose typed-spec example type checkers must understand.
TYPED_SPECS = README.parent / "docs" / "how-to" / "typed-specs.md"


@attrs.frozen
class BuildSpec:
    """What to build, and from where."""

    repo: str
    ref: str = "main"
    timeout_s: int = 600


class Arch(enum.Enum):
    AMD64 = "amd64"
    ARM64 = "arm64"


@dataclasses.dataclass(frozen=True)
class Cache:
    key: str
    size_mb: int | None = None


@attrs.frozen
class Step:
    name: str
    args: list[str] = attrs.field(factory=list)


@attrs.frozen
class RichSpec:
    image: str
    arch: Arch = Arch.AMD64
    mode: Literal["fast", "thorough"] = "fast"
    steps: list[Step] = attrs.field(factory=list)
    cache: Cache | None = None
    env: dict[str, str] = attrs.field(factory=dict)
    tags: tuple[str, ...] = ()
    ratio: float = 1.0
    retries: int | None = None
    extra: Any = None
    push: bool = False


def build_driver(calls: list[Any]) -> Driver:
    driver = Driver("builder")

    @driver.on("build", spec=BuildSpec)
    async def build(ctx: Context[BuildSpec]) -> Result:
        calls.append(ctx.spec)
        return Result.ok(f"built {ctx.spec.repo}@{ctx.spec.ref}")

    @driver.on("cleanup")
    async def cleanup(ctx: Context) -> None:
        calls.append(ctx.spec)

    return driver


def resource(spec: Any, resource_type: str = "build") -> dict[str, Any]:
    return {"name": "app", "resource": resource_type, "spec": spec}


# -- at the boundary: the handler sees a typed spec or is never called ------------------------


async def test_a_bad_spec_is_one_permanent_failure_naming_every_field() -> None:
    calls: list[Any] = []
    driver = build_driver(calls)
    report = await dispatch(driver, resource({"timeout_s": "ten"}), event="process")
    assert calls == []  # the handler is never called
    assert (report.kind, report.action, report.delay) == (Kind.FAILURE, Action.ACK, None)
    assert report.result is not None and not report.result.success
    assert report.result.message == (
        "invalid spec: spec.repo: required; spec.timeout_s: expected int, got 'ten'"
    )
    assert report.result.data == {
        "errors": ["spec.repo: required", "spec.timeout_s: expected int, got 'ten'"]
    }
    warning = [e for e in report.logs if e["event"] == "run failed: invalid spec"]
    assert warning and warning[0]["errors"] == report.result.data["errors"]


async def test_a_bad_spec_is_not_retried_on_an_early_attempt() -> None:
    calls: list[Any] = []
    report = await dispatch(build_driver(calls), resource("a string"), attempt=1)
    assert (report.kind, report.action) == (Kind.FAILURE, Action.ACK)
    assert report.result is not None
    assert report.result.message == "invalid spec: spec: expected object, got 'a string'"
    assert calls == []


async def test_a_good_spec_reaches_the_handler_typed_with_its_defaults() -> None:
    calls: list[Any] = []
    report = await dispatch(build_driver(calls), resource({"repo": "git://r", "timeout_s": 60}))
    assert calls == [BuildSpec(repo="git://r", timeout_s=60)]
    assert report.result == Result.ok("built git://r@main")


async def test_a_handler_without_spec_keeps_the_json_as_it_was() -> None:
    calls: list[Any] = []
    spec = {"anything": ["goes", 1], "timeout_s": "ten"}
    report = await dispatch(build_driver(calls), resource(spec, "cleanup"))
    assert report.kind == Kind.SUCCESS
    assert calls == [spec]


async def test_dispatch_takes_a_spec_object_and_checks_it_as_json() -> None:
    calls: list[Any] = []
    report = await dispatch(build_driver(calls), resource(BuildSpec(repo="r", ref="v1")))
    assert report.kind == Kind.SUCCESS and calls == [BuildSpec(repo="r", ref="v1")]
    # An object of the wrong class is checked like the JSON it becomes.
    report = await dispatch(build_driver(calls), resource(Step(name="x")))
    assert report.result is not None
    assert report.result.message == (
        "invalid spec: spec.repo: required; spec.args: unknown field; spec.name: unknown field"
    )


def test_fake_context_structures_and_refuses_as_the_runtime_does() -> None:
    ctx = FakeContext(resource({"repo": "r"}), spec=BuildSpec)
    assert ctx.spec == BuildSpec(repo="r")
    assert ctx.resource.spec == {"repo": "r"}
    typed = FakeContext(resource(BuildSpec(repo="r", timeout_s=5)))
    assert typed.spec == BuildSpec(repo="r", timeout_s=5)
    assert typed.resource.spec == {"repo": "r", "ref": "main", "timeout_s": 5}
    assert FakeContext(resource({"k": 1}, "cleanup")).spec == {"k": 1}
    with pytest.raises(InvalidSpec) as refused:
        FakeContext(resource({"timeout_s": "ten"}), spec=BuildSpec)
    assert refused.value.errors == [
        "spec.repo: required",
        "spec.timeout_s: expected int, got 'ten'",
    ]


# -- the error messages, one per kind of field ----------------------------------------------


@pytest.mark.parametrize(
    ("spec", "errors"),
    [
        ({"image": 3}, ["spec.image: expected str, got 3"]),
        ({"image": "i", "imgae": "typo"}, ["spec.imgae: unknown field"]),
        (
            {"image": "i", "arch": "s390x"},
            ["spec.arch: expected one of 'amd64', 'arm64', got 's390x'"],
        ),
        (
            {"image": "i", "mode": "slow"},
            ["spec.mode: expected one of 'fast', 'thorough', got 'slow'"],
        ),
        (
            {"image": "i", "steps": [{"args": "make"}, 3]},
            [
                "spec.steps[0].name: required",
                "spec.steps[0].args: expected array, got 'make'",
                "spec.steps[1]: expected object, got 3",
            ],
        ),
        (
            {"image": "i", "cache": {"key": 1, "size_mb": "5"}},
            [
                "spec.cache.key: expected str, got 1",
                "spec.cache.size_mb: expected int, got '5'",
            ],
        ),
        ({"image": "i", "env": {"A": 1}}, ["spec.env['A']: expected str, got 1"]),
        ({"image": "i", "env": ["A=1"]}, ["spec.env: expected object, got an array"]),
        ({"image": "i", "tags": "latest"}, ["spec.tags: expected array, got 'latest'"]),
        ({"image": "i", "ratio": "1.5"}, ["spec.ratio: expected number, got '1.5'"]),
        ({"image": "i", "retries": True}, ["spec.retries: expected int, got True"]),
        ({"image": "i", "retries": 2.5}, ["spec.retries: expected int, got 2.5"]),
        ({"image": "i", "push": 1}, ["spec.push: expected bool, got 1"]),
    ],
)
def test_every_bad_field_is_named_by_its_path(spec: dict[str, Any], errors: list[str]) -> None:
    with pytest.raises(InvalidSpec) as refused:
        structure(spec, RichSpec)
    assert refused.value.errors == errors


def test_json_shaped_values_structure_into_their_types() -> None:
    spec = structure(
        {
            "image": "i",
            "arch": "arm64",
            "steps": [{"name": "test", "args": ["-x"]}],
            "cache": {"key": "k"},
            "env": {"A": "1"},
            "tags": ["a", "b"],
            "ratio": 2,
            "retries": 3.0,  # JSON Schema's integer takes 3.0: so does the structuring
            "extra": {"free": ["form"]},
        },
        RichSpec,
    )
    assert spec == RichSpec(
        image="i",
        arch=Arch.ARM64,
        steps=[Step("test", ["-x"])],
        cache=Cache("k"),
        env={"A": "1"},
        tags=("a", "b"),
        ratio=2.0,
        retries=3,
        extra={"free": ["form"]},
    )
    assert structure(unstructure(spec), RichSpec) == spec


# -- registration ---------------------------------------------------------------------------


def test_a_spec_that_cannot_be_described_is_refused_at_registration() -> None:
    driver = Driver("d")

    @attrs.frozen
    class Odd:
        when: set[int]

    with pytest.raises(ConfigurationError, match=r"spec field .*Odd.when has type set\[int\]"):
        driver.on("build", spec=Odd)
    with pytest.raises(ConfigurationError, match="must be an attrs class or a dataclass"):
        driver.on("build", spec=dict)


def test_one_resource_type_cannot_have_two_spec_classes() -> None:
    driver = Driver("d")

    @driver.on("build", events=["create"], spec=BuildSpec)
    async def create(ctx: Context[BuildSpec]) -> None: ...

    @driver.on("build", events=["delete"])  # untyped: takes the JSON, no clash
    async def delete(ctx: Context) -> None: ...

    with pytest.raises(ConfigurationError, match="one resource type has one schema"):

        @driver.on("build", events=["process"], spec=RichSpec)
        async def process(ctx: Context[RichSpec]) -> None: ...


# -- the JSON Schema agrees with the structuring ----------------------------------------------


def test_the_schema_states_required_fields_defaults_and_types() -> None:
    assert json_schema(BuildSpec) == {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "BuildSpec",
        "type": "object",
        "description": "What to build, and from where.",
        "properties": {
            "repo": {"type": "string"},
            "ref": {"type": "string", "default": "main"},
            "timeout_s": {"type": "integer", "default": 600},
        },
        "required": ["repo"],
        "additionalProperties": False,
    }


def test_the_rich_schema_describes_enums_lists_nested_classes_and_optionals() -> None:
    schema = json_schema(RichSpec)
    Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    assert props["arch"] == {"enum": ["amd64", "arm64"], "default": "amd64"}
    assert props["mode"] == {"enum": ["fast", "thorough"], "default": "fast"}
    assert props["steps"] == {"type": "array", "items": {"$ref": "#/$defs/Step"}, "default": []}
    assert props["cache"] == {
        "anyOf": [{"$ref": "#/$defs/Cache"}, {"type": "null"}],
        "default": None,
    }
    assert props["retries"] == {"type": ["integer", "null"], "default": None}
    assert props["env"]["additionalProperties"] == {"type": "string"}
    assert props["extra"] == {"default": None}
    assert schema["$defs"]["Step"]["required"] == ["name"]
    assert schema["$defs"]["Cache"]["properties"]["size_mb"] == {
        "type": ["integer", "null"],
        "default": None,
    }


VALID = [
    {"image": "i"},
    {"image": "i", "arch": "arm64", "mode": "thorough", "push": True, "ratio": 0.5},
    {"image": "i", "steps": [{"name": "a"}, {"name": "b", "args": ["x"]}]},
    {"image": "i", "cache": None, "retries": None, "extra": [1, {"a": None}]},
    {"image": "i", "cache": {"key": "k", "size_mb": 10}, "env": {}, "tags": []},
    {"image": "i", "retries": 3.0, "ratio": 2},
]
INVALID = [
    {},
    {"image": None},
    {"image": "i", "unknown": 1},
    {"image": "i", "arch": "AMD64"},
    {"image": "i", "steps": [{"name": "a", "extra": 1}]},
    {"image": "i", "steps": {"name": "a"}},
    {"image": "i", "cache": {"size_mb": 1}},
    {"image": "i", "cache": {"key": "k", "size_mb": "1"}},
    {"image": "i", "env": {"A": None}},
    {"image": "i", "tags": "t"},
    {"image": "i", "retries": "3"},
    {"image": "i", "retries": 3.5},
    {"image": "i", "push": 0},
    {"image": "i", "ratio": False},
    "i",
    [],
    None,
]


@pytest.mark.parametrize("spec", VALID, ids=lambda s: json.dumps(s)[:60])
def test_what_the_schema_accepts_structures(spec: Any) -> None:
    Draft202012Validator(json_schema(RichSpec)).validate(spec)
    structure(spec, RichSpec)


@pytest.mark.parametrize("spec", INVALID, ids=lambda s: json.dumps(s)[:60])
def test_what_the_schema_refuses_is_refused_at_the_boundary(spec: Any) -> None:
    assert not Draft202012Validator(json_schema(RichSpec)).is_valid(spec)
    with pytest.raises(InvalidSpec):
        structure(spec, RichSpec)


def test_a_class_that_nests_itself_is_described_by_reference() -> None:
    @attrs.frozen
    class Node:
        name: str
        children: list[Node] = attrs.field(factory=list)

    attrs.resolve_types(Node, globals(), {"Node": Node})
    schema = json_schema(Node)
    assert schema["properties"]["children"]["items"] == {"$ref": "#"}
    validator = Draft202012Validator(schema)
    assert validator.is_valid({"name": "a", "children": [{"name": "b", "children": []}]})
    assert not validator.is_valid({"name": "a", "children": [{"children": []}]})


# -- conveyor-driver schema ---------------------------------------------------------------------


def test_the_schema_command_prints_one_schema_per_typed_resource_type() -> None:
    result = invoke("schema", "tests/apps/specs_app.py:driver")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert list(printed) == ["build"]  # cleanup takes no spec=: nothing to describe
    assert printed["build"] == json_schema(BuildSpec) | {"title": "BuildSpec"}
    validator = Draft202012Validator(printed["build"])
    assert validator.is_valid({"repo": "r", "timeout_s": 5})
    assert [e.message for e in validator.iter_errors({"timeout_s": "ten"})] == [
        "'ten' is not of type 'integer'",
        "'repo' is a required property",
    ]


# -- type checkers see ctx.spec's type ------------------------------------------------------------


def test_mypy_strict_accepts_the_documented_example_and_sees_the_spec_type(tmp_path: Path) -> None:
    from mypy import api

    (builder,) = [b for b in parse(TYPED_SPECS.read_text()) if b.file == "builder.py"]
    (tmp_path / "builder.py").write_text(builder.code)
    misuse = builder.code + (
        "\n\n@driver.on('deploy', spec=BuildSpec)\n"
        "async def deploy(ctx: Context[BuildSpec]) -> None:\n"
        "    ctx.spec.timeout_s.upper()\n"
        "\n\n@driver.on('cleanup')\n"
        "async def cleanup(ctx: Context) -> None:\n"
        "    ctx.spec['anything'].goes()\n"
    )
    (tmp_path / "misuse.py").write_text(misuse)
    options = ["--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"]
    out, err, status = api.run([*options, str(tmp_path / "builder.py")])
    assert status == 0, out + err
    out, err, status = api.run([*options, str(tmp_path / "misuse.py")])
    assert status == 1
    line = misuse.splitlines().index("    ctx.spec.timeout_s.upper()") + 1
    assert out.splitlines() == [
        f'{tmp_path / "misuse.py"}:{line}: error: "int" has no attribute "upper"  [attr-defined]'
    ]
