"""The Driver: validation, handler registration, routing and lifecycle hooks."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor_driver import ConfigurationError, Context, Driver
from conveyor_driver.runtime.hooks import call_hook


async def noop(ctx: Context) -> None:
    return None


async def other(ctx: Context) -> None:
    return None


async def third(ctx: Context) -> None:
    return None


@pytest.mark.parametrize("name", ["", " ", "my driver", "a\tb", "a.b", "a*", ">", "runner.>"])
def test_driver_name_must_be_a_subject_token(name: str) -> None:
    with pytest.raises(ConfigurationError, match=r"driver name .* is not usable"):
        Driver(name)


@pytest.mark.parametrize("name", ["command-runner", "k8s_deployer", "A1"])
def test_valid_driver_names(name: str) -> None:
    driver = Driver(name)
    assert driver.name == name


def test_driver_defaults() -> None:
    driver = Driver("d")
    assert (driver.concurrency, driver.max_attempts, driver.ack_wait, driver.grace_period) == (
        1,
        3,
        30.0,
        30.0,
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"concurrency": 0}, "concurrency must be at least 1, not 0"),
        ({"concurrency": -3}, "concurrency must be at least 1, not -3"),
        ({"concurrency": 1.5}, "concurrency must be at least 1, not 1.5"),
        ({"max_attempts": 0}, "max_attempts must be at least 1, not 0"),
        ({"ack_wait": 0}, "ack_wait must be positive, not 0"),
        ({"ack_wait": -1.0}, "ack_wait must be positive, not -1.0"),
        ({"grace_period": -1}, "grace_period must be >= 0, not -1"),
    ],
)
def test_driver_settings_are_validated(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Driver("d", **options)


def test_zero_grace_period_is_allowed() -> None:
    assert Driver("d", grace_period=0).grace_period == 0.0


def test_on_registers_a_route_and_returns_the_function_unchanged() -> None:
    driver = Driver("d")
    decorated = driver.on("pipeline", "command", events=["create"])(noop)
    assert decorated is noop
    (route,) = driver.routes
    assert route.handler is noop
    assert route.resource_types == ("pipeline", "command")
    assert route.events == frozenset({"create"})
    assert route.is_async


def test_on_accepts_a_single_event_name_as_a_string() -> None:
    driver = Driver("d")
    driver.on("pipeline", events="create")(noop)
    assert driver.routes[0].events == frozenset({"create"})


def test_sync_handler_is_not_async() -> None:
    driver = Driver("d")

    @driver.on("pipeline")
    def sync(ctx: Context) -> None:
        return None

    assert not driver.routes[0].is_async


@pytest.mark.parametrize(
    ("types", "events", "match"),
    [
        ((), None, "needs at least one resource type"),
        (("",), None, "resource type '' is not usable"),
        (("a.b",), None, "resource type 'a.b' is not usable"),
        (("a",), [], "events must be a non-empty list"),
        (("a",), [""], "events must be a non-empty list"),
    ],
)
def test_on_validates_its_arguments(types: tuple[str, ...], events: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Driver("d").on(*types, events=events)


def test_on_refuses_a_non_callable() -> None:
    with pytest.raises(ConfigurationError, match="decorates a function"):
        Driver("d").on("pipeline")("not a function")  # type: ignore[type-var]


def test_same_type_without_events_twice_is_refused() -> None:
    driver = Driver("d")
    driver.on("pipeline")(noop)
    with pytest.raises(ConfigurationError) as info:
        driver.on("pipeline")(other)
    assert str(info.value) == (
        "handler other clashes with noop: both would handle every event of resource type pipeline"
    )
    assert len(driver.routes) == 1


def test_every_event_clashes_with_a_filtered_handler() -> None:
    driver = Driver("d")
    driver.on("pipeline")(noop)
    with pytest.raises(ConfigurationError) as info:
        driver.on("pipeline", events=["create"])(other)
    assert str(info.value) == (
        "handler other clashes with noop: both would handle event create of resource type pipeline"
    )


def test_filtered_then_unfiltered_handler_is_refused() -> None:
    driver = Driver("d")
    driver.on("pipeline", events=["create", "update"])(noop)
    with pytest.raises(ConfigurationError, match="both would handle event create, update"):
        driver.on("pipeline")(other)


def test_intersecting_events_are_refused_naming_the_shared_ones() -> None:
    driver = Driver("d")
    driver.on("pipeline", "command", events=["create", "update"])(noop)
    with pytest.raises(ConfigurationError) as info:
        driver.on("command", events=["update", "delete"])(other)
    assert str(info.value) == (
        "handler other clashes with noop: both would handle event update of resource type command"
    )


def test_disjoint_events_of_one_type_are_allowed() -> None:
    driver = Driver("d")
    driver.on("pipeline", events=["create"])(noop)
    driver.on("pipeline", events=["process", "update"])(other)
    assert len(driver.routes) == 2


def test_different_types_are_allowed() -> None:
    driver = Driver("d")
    driver.on("pipeline")(noop)
    driver.on("command")(other)
    assert [r.handler for r in driver.routes] == [noop, other]
    assert driver.resource_types == ["command", "pipeline"]


def test_route_for_follows_event_filters() -> None:
    driver = Driver("d")
    driver.on("pipeline", events=["create"])(noop)
    driver.on("pipeline", events=["process"])(other)
    driver.on("command")(third)
    create = driver.route_for("pipeline", "create")
    process = driver.route_for("pipeline", "process")
    assert create is not None and create.handler is noop
    assert process is not None and process.handler is other
    assert driver.route_for("pipeline", "delete") is None
    assert driver.route_for("unknown", "create") is None
    any_event = driver.route_for("command", "delete")
    assert any_event is not None and any_event.handler is third


def test_driver_without_a_handler_refuses_to_start() -> None:
    driver = Driver("lonely")
    with pytest.raises(ConfigurationError, match="driver 'lonely' has no handler"):
        driver.check()
    driver.on("pipeline")(noop)
    driver.check()


def test_subjects_list_both_subjects_per_type() -> None:
    driver = Driver("runner")
    driver.on("pipeline", "command")(noop)
    driver.on("deployment", events=["create"])(other)
    assert driver.subjects == [
        "resources.command",
        "drivers.runner.resources.command",
        "resources.deployment",
        "drivers.runner.resources.deployment",
        "resources.pipeline",
        "drivers.runner.resources.pipeline",
    ]


async def test_startup_and_shutdown_hooks_sync_and_async() -> None:
    driver = Driver("d")
    calls: list[str] = []

    @driver.on_startup
    def sync_start() -> None:
        calls.append("sync start")

    @driver.on_startup
    async def async_start() -> None:
        calls.append("async start")

    @driver.on_shutdown
    async def async_stop() -> None:
        calls.append("async stop")

    @driver.on_shutdown
    def sync_stop() -> None:
        calls.append("sync stop")

    assert driver.startup_hooks == [sync_start, async_start]
    assert driver.shutdown_hooks == [async_stop, sync_stop]
    for hook in [*driver.startup_hooks, *driver.shutdown_hooks]:
        await call_hook(hook)
    assert calls == ["sync start", "async start", "async stop", "sync stop"]


def test_the_public_surface_names_the_route_and_what_ctx_run_returns() -> None:
    import typing

    import conveyor_driver
    from conveyor_driver.app import Route

    assert conveyor_driver.Route is Route
    assert typing.get_type_hints(Context.run)["return"] is conveyor_driver.CommandResult
    assert {"Route", "CommandResult"} <= set(conveyor_driver.__all__)
