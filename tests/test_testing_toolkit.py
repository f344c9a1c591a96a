"""conveyor_driver.testing: FakeContext for direct calls, dispatch() for the real routing."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest

from conveyor_driver import Context, Driver, Fail, Resource, Result, Retry, outcomes
from conveyor_driver.testing import DispatchReport, FakeContext, dispatch

RESOURCE: dict[str, Any] = {
    "id": "r-1",
    "name": "app",
    "pipeline": "ci",
    "resource": "pipeline",
    "metadata": {"version": "2"},
    "spec": {"repo": "https://example.com/app.git"},
}

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


def without_ids(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries minus the generated message id, so they compare exactly."""
    return [{k: v for k, v in entry.items() if k != "message_id"} for entry in entries]


def test_fake_context_from_a_dict_shaped_like_the_server_json() -> None:
    ctx = FakeContext(RESOURCE, event="process", run_id="run-1", attempt=2)
    assert isinstance(ctx, Context)
    assert ctx.resource == Resource(
        id="r-1",
        name="app",
        pipeline="ci",
        type="pipeline",
        metadata={"version": "2"},
        spec={"repo": "https://example.com/app.git"},
    )
    assert (ctx.event, ctx.run_id, ctx.attempt, ctx.driver) == (
        "process",
        "run-1",
        2,
        "test-driver",
    )
    assert ctx.subject == "resources.pipeline"
    assert ctx.message_id
    assert ctx.logs == []


def test_fake_context_from_a_resource() -> None:
    resource = Resource(name="web", type="deployment", spec={"replicas": 2})
    ctx = FakeContext(resource, driver="deployer")
    assert ctx.resource is resource
    assert ctx.event == "create"
    assert ctx.attempt == 1
    assert ctx.driver == "deployer"
    assert ctx.subject == "resources.deployment"


def test_fake_contexts_get_distinct_run_ids_by_default() -> None:
    assert FakeContext(RESOURCE).run_id != FakeContext(RESOURCE).run_id


def test_fake_context_logs_hold_event_level_and_bound_keys() -> None:
    ctx = FakeContext(RESOURCE, run_id="run-1")
    ctx.log.info("cloning", repo="x")
    ctx.log.bind(step=2).warning("slow")
    ctx.log.debug("detail")
    bound = {
        "driver": "test-driver",
        "run_id": "run-1",
        "event_name": "create",
        "resource_type": "pipeline",
        "resource_name": "app",
    }
    assert ctx.logs == [
        {**bound, "event": "cloning", "level": "info", "repo": "x"},
        {**bound, "event": "slow", "level": "warning", "step": 2},
        {**bound, "event": "detail", "level": "debug"},
    ]


async def test_handler_called_directly_with_a_fake_context() -> None:
    async def build(ctx: Context) -> Result:
        ctx.log.info("cloning", repo=ctx.resource.spec["repo"])
        return Result.ok("built", data={"image": f"{ctx.resource.name}:1"})

    ctx = FakeContext(RESOURCE)
    assert await build(ctx) == Result.ok("built", data={"image": "app:1"})
    assert [(e["event"], e["repo"]) for e in ctx.logs] == [
        ("cloning", "https://example.com/app.git")
    ]


def make_driver(handler: Any, *, events: list[str] | None = None, max_attempts: int = 3) -> Driver:
    driver = Driver("toolkit", max_attempts=max_attempts)
    driver.on("pipeline", events=events)(handler)
    return driver


async def test_dispatch_success() -> None:
    async def build(ctx: Context) -> Result:
        ctx.log.info("building", step=1)
        return Result.ok("built", data={"image": "app:1"})

    report = await dispatch(make_driver(build), RESOURCE, run_id="run-1")
    handler = "test_dispatch_success.<locals>.build"
    assert report.result == Result(True, "built", {"image": "app:1"})
    assert (report.action, report.delay, report.kind) == ("ack", None, "success")
    bound = {
        "driver": "toolkit",
        "run_id": "run-1",
        "event_name": "create",
        "resource_type": "pipeline",
        "resource_name": "app",
        "pipeline": "ci",
    }
    assert without_ids(report.logs) == [
        {**bound, "event": "run started", "level": "debug", "attempt": 1, "handler": handler},
        {**bound, "event": "building", "level": "info", "step": 1},
        {**bound, "event": "run succeeded", "level": "info", "result": "built"},
    ]
    assert all(entry["message_id"] for entry in report.logs)


async def test_dispatch_hands_the_handler_the_event_and_resource() -> None:
    seen: list[tuple[str, int, str, Resource]] = []

    async def record(ctx: Context) -> None:
        seen.append((ctx.event, ctx.attempt, ctx.run_id, ctx.resource))

    resource = Resource(name="app", type="pipeline", spec=[1])
    report = await dispatch(make_driver(record), resource, "process", 2, run_id="run-9")
    assert report.kind == "success"
    assert seen == [("process", 2, "run-9", resource)]


async def test_dispatch_fail() -> None:
    async def build(ctx: Context) -> None:
        raise Fail("repo not found", data={"repo": "x"})

    report = await dispatch(make_driver(build), RESOURCE)
    assert report.result == Result(False, "repo not found", {"repo": "x"})
    assert (report.action, report.delay, report.kind) == ("ack", None, "failure")
    assert [(e["event"], e["level"]) for e in report.logs][-1] == ("run failed", "warning")


async def test_dispatch_retry_with_delay() -> None:
    async def build(ctx: Context) -> None:
        raise Retry("registry busy", delay=7)

    report = await dispatch(make_driver(build), RESOURCE)
    assert report == DispatchReport(
        result=None, action="nak", delay=7, kind="retry", logs=report.logs
    )
    last = report.logs[-1]
    assert (last["event"], last["reason"], last["delay"]) == ("run will retry", "registry busy", 7)


async def test_dispatch_exception_is_retried_with_backoff() -> None:
    async def build(ctx: Context) -> None:
        raise ConnectionError("registry down")

    report = await dispatch(make_driver(build), RESOURCE, attempt=2)
    assert report.result is None
    assert (report.action, report.delay, report.kind) == ("nak", 2.0, "retry")
    last = report.logs[-1]
    assert (last["event"], last["level"], last["attempt"]) == (
        "run raised; will retry",
        "error",
        2,
    )
    assert isinstance(last["exc_info"], ConnectionError)


async def test_dispatch_exception_on_the_last_attempt_gives_up() -> None:
    async def build(ctx: Context) -> None:
        raise ConnectionError("registry down")

    report = await dispatch(make_driver(build, max_attempts=2), RESOURCE, attempt=2)
    assert report.result == Result(
        False, "gave up after 2 attempts: ConnectionError: registry down", None
    )
    assert (report.action, report.delay, report.kind) == ("term", None, "gave_up")
    assert report.logs[-1]["event"] == "run gave up"


async def test_dispatch_beyond_max_attempts_gives_up_without_running_the_handler() -> None:
    calls: list[int] = []

    async def build(ctx: Context) -> None:
        calls.append(ctx.attempt)

    report = await dispatch(make_driver(build, max_attempts=2), RESOURCE, attempt=3)
    assert calls == []
    assert report.action == "term"
    assert report.kind == "gave_up"
    assert report.result is not None and not report.result.success
    assert report.result.message.startswith("gave up after 2 attempts:")


async def test_dispatch_unhandled_broadcast_event_is_skipped_quietly() -> None:
    calls: list[str] = []

    async def build(ctx: Context) -> None:
        calls.append(ctx.event)

    report = await dispatch(make_driver(build, events=["create"]), RESOURCE, event="delete")
    assert calls == []
    assert (report.result, report.action, report.delay, report.kind) == (
        None,
        "ack",
        None,
        "skipped",
    )
    (entry,) = report.logs
    assert entry["event"] == "event skipped: no handler for it"
    assert entry["level"] == "debug"
    assert entry["event_name"] == "delete"


async def test_dispatch_unhandled_step_addressed_to_the_driver_reports_a_failure() -> None:
    async def build(ctx: Context) -> None:
        return None

    driver = make_driver(build, events=["create"])
    report = await dispatch(driver, RESOURCE, event="process")
    expected = f"driver {driver.name!r} has no handler for event 'process' of type 'pipeline'"
    assert report.result == Result(False, expected, None)
    assert (report.action, report.kind) == ("ack", "unrouted")
    (entry,) = report.logs
    assert entry["level"] == "warning"
    # The default follows the server: "process" is a step, anything else a broadcast.
    broadcast = await dispatch(driver, RESOURCE, event="process", addressed=False)
    assert (broadcast.result, broadcast.action, broadcast.kind) == (None, "ack", "skipped")
    step = await dispatch(driver, RESOURCE, event="delete", addressed=True)
    assert (step.action, step.kind) == ("ack", "unrouted")


async def test_dispatch_unknown_resource_type_is_skipped() -> None:
    async def build(ctx: Context) -> None:
        return None

    report = await dispatch(make_driver(build), {"name": "x", "resource": "other"})
    assert (report.result, report.action, report.kind) == (None, "ack", "skipped")


class _Abort(BaseException):
    """A BaseException of the handler's own, like some libraries define."""


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt(), _Abort("stop")])
@pytest.mark.parametrize("sync", [False, True])
async def test_dispatch_base_exceptions_fail_the_run_not_the_driver(
    raised: BaseException, sync: bool
) -> None:
    def sync_build(ctx: Context) -> None:
        raise raised

    async def async_build(ctx: Context) -> None:
        raise raised

    driver = make_driver(sync_build if sync else async_build, max_attempts=2)
    first = await dispatch(driver, RESOURCE)
    assert (first.action, first.kind, first.result) == ("nak", "retry", None)
    last = await dispatch(driver, RESOURCE, attempt=2)
    assert (last.action, last.kind) == ("term", "gave_up")
    assert last.result is not None
    assert last.result.message == f"gave up after 2 attempts: {outcomes.describe(raised)}"


async def test_dispatch_a_handlers_own_cancelled_error_is_a_failure() -> None:
    async def build(ctx: Context) -> None:
        raise asyncio.CancelledError("inner timeout")

    report = await dispatch(make_driver(build, max_attempts=1), RESOURCE)
    assert (report.action, report.kind) == ("term", "gave_up")


async def test_dispatch_sync_handler_runs_in_a_thread_with_the_context_copied() -> None:
    seen: dict[str, Any] = {}

    def build(ctx: Context) -> dict[str, str]:
        seen["thread"] = threading.get_ident()
        seen["request_id"] = request_id.get()
        ctx.log.info("in thread")
        return {"ok": "yes"}

    token = request_id.set("req-42")
    try:
        report = await dispatch(make_driver(build), RESOURCE)
    finally:
        request_id.reset(token)
    assert seen["thread"] != threading.get_ident()
    assert seen["request_id"] == "req-42"
    assert report.result == Result(True, "", {"ok": "yes"})
    assert report.action == "ack"
    assert "in thread" in [entry["event"] for entry in report.logs]


async def test_dispatch_sync_handler_exception_is_handled_like_an_async_one() -> None:
    def build(ctx: Context) -> None:
        raise Fail("sync failure")

    report = await dispatch(make_driver(build), RESOURCE)
    assert report.result == Result(False, "sync failure", None)
    assert report.action == "ack"


async def test_dispatch_handler_returning_data_that_is_not_json_fails() -> None:
    async def build(ctx: Context) -> object:
        return object()

    report = await dispatch(make_driver(build), RESOURCE)
    assert report.result == Result(
        False, "handler returned data that is not JSON: data: object of type object is not JSON"
    )
    assert (report.action, report.kind) == ("ack", "failure")


@pytest.mark.parametrize("value", [None, "done", {"a": [1, 2]}])
async def test_dispatch_plain_return_values(value: Any) -> None:
    async def build(ctx: Context) -> Any:
        return value

    report = await dispatch(make_driver(build), RESOURCE)
    assert report.result == Result(True, "", value)
    assert (report.action, report.kind) == ("ack", "success")


async def test_dispatch_reports_the_runtimes_enums_which_equal_their_strings() -> None:
    async def build(ctx: Context) -> None:
        return None

    report = await dispatch(make_driver(build), RESOURCE)
    assert (report.action, report.kind) == (outcomes.Action.ACK, outcomes.Kind.SUCCESS)
    assert (report.action, report.kind) == ("ack", "success")
    assert f"{report.action}/{report.kind}" == "ack/success"
