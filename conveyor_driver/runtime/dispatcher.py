"""One delivery, start to finish, with no NATS in it: decode, route, run, decide.

The runtime and :func:`conveyor_driver.testing.dispatch` both call :func:`process`, so a
unit test exercises the same routing and error semantics a production driver runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Awaitable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanContext, Status, StatusCode
from structlog.typing import FilteringBoundLogger

from .. import outcomes, protocol, specs
from ..context import Context
from ..logs.redact import Redactor
from ..logs.stdlib import run_scope
from ..models import DecodeError, DriverMessage, decode_driver_message
from ..outcomes import Action, Kind, Outcome
from ..telemetry import Telemetry
from ..trace_context import extract
from ..workspace import RunWorkspace, finish

if TYPE_CHECKING:
    from ..api import ConveyorClient
    from ..app import Driver, Route

_EXCERPT_BYTES = 200
_ERROR_KINDS = frozenset({Kind.FAILURE, Kind.GAVE_UP, Kind.UNDECODABLE})
_RUN_OUTCOMES = {
    Kind.SUCCESS: "success",
    Kind.FAILURE: "failure",
    Kind.RETRY: "retry",
    Kind.GAVE_UP: "terminated",
    Kind.UNDECODABLE: "terminated",
    Kind.UNROUTED: "failure",
    Kind.SKIPPED: "skipped",
}


@attrs.frozen
class Delivery:
    """What the transport knows of a message: body, subject, attempt, headers.

    ``attempt`` counts the handler's real starts, not JetStream's deliveries (see
    :mod:`.ledger`); ``earlier`` describes the attempts before it, when they are known.
    """

    data: bytes
    subject: str
    attempt: int = 1
    headers: Mapping[str, str] | None = None
    earlier: tuple[str, ...] = ()
    #: The body already decoded by whoever had to read it first (the ledger's admission).
    message: DriverMessage | None = None


@attrs.frozen
class Processed:
    """The decision, with the decoded message when there was one to decode."""

    outcome: Outcome
    message: DriverMessage | None = None
    span_context: SpanContext | None = None
    #: What the attempt raised, when it failed and will be retried: the ledger keeps it.
    error: str = ""


@attrs.frozen
class Services:
    """What the runtime hands every run: the driver logger, the API client, the driver's
    telemetry, a thread pool.

    ``timeout`` is the operator's default deadline (``--timeout``), in place of the
    driver's; a handler's own ``timeout=`` still wins, being the more specific.
    """

    log: FilteringBoundLogger
    api: ConveyorClient
    telemetry: Telemetry
    executor: Executor | None = None
    timeout: float | None = None
    #: The driver's secrets, masked in its logs; ``ctx.secret`` adds a run's own to it.
    redactor: Redactor | None = None
    #: ``ctx.workspace``'s parent (None: the system's temporary directory), and whether a
    #: failed run's is kept (``--keep-failed-workspaces``).
    workspace_root: Path | None = None
    keep_failed_workspaces: bool = False


class HandlerThreads(ThreadPoolExecutor):
    """The threads sync handlers run in; one abandoned at its deadline is replaced.

    A thread cannot be cancelled. A sync handler still running at its deadline is left to
    finish, and the pool grows by one so that it does not hold a slot the next run needs.
    """

    abandoned = 0

    def abandon(self) -> None:
        self.abandoned += 1
        # The pool starts threads on demand up to this bound: raising it lends one more.
        self._max_workers += 1


async def process(driver: Driver, delivery: Delivery, services: Services) -> Processed:
    """Decide what happens to ``delivery``; never raises for anything a handler does.

    Each delivery is one CONSUMER span, child of the trace context the message carries, and
    current while the handler runs, so the handler's logs, API calls and commands join it.
    """
    telemetry = services.telemetry
    decoded = _decode(delivery, services.log)
    if not telemetry.enabled():
        processed, _ = await _decide(driver, delivery, decoded, services)
        telemetry.count_run(_RUN_OUTCOMES[processed.outcome.kind])  # /metrics shows them
        if delivery.headers:  # no SDK: pass the caller's trace context through unchanged
            parent = trace.get_current_span(extract(delivery.headers)).get_span_context()
            return _in_span(processed, parent)
        return processed
    message = decoded if isinstance(decoded, DriverMessage) else None
    if message is not None:
        resource = message.payload
        route = telemetry.route(driver.name, delivery.subject, resource.type, message.event)
        run = (message.id, message.run_id, resource.name)
    else:
        resource_type = protocol.resource_type_from_subject(delivery.subject) or "message"
        route = telemetry.route(driver.name, delivery.subject, resource_type, None)
        run = None
    started = time.perf_counter()
    span = telemetry.start_run(route, extract(delivery.headers), delivery.attempt, run)
    # attach/detach rather than start_as_current_span, whose context-manager layers add
    # to the cost of every recorded span (bench/README.md).
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        processed, error = await _decide(driver, delivery, decoded, services)
        outcome = processed.outcome
        if span.is_recording():
            span.set_attribute("conveyor.outcome", outcome.kind.value)
            if error is not None and not isinstance(error, outcomes.Retry):
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, outcomes.describe(error)))
            elif outcome.kind in _ERROR_KINDS:
                text = outcome.result.message if outcome.result else outcome.kind.value
                span.set_status(Status(StatusCode.ERROR, text))
    finally:
        otel_context.detach(token)
        span.end()
    kind = outcome.kind
    telemetry.record_run(route, time.perf_counter() - started, kind.value, _RUN_OUTCOMES[kind])
    return _in_span(processed, span.get_span_context())


def _in_span(processed: Processed, span_context: SpanContext) -> Processed:
    """``processed`` with the span its result and logs belong to (built directly: per run)."""
    return Processed(processed.outcome, processed.message, span_context, processed.error)


def _decode(delivery: Delivery, log: FilteringBoundLogger) -> DriverMessage | Processed:
    if delivery.message is not None:
        return delivery.message
    try:
        return decode_driver_message(delivery.data, delivery.subject)
    except DecodeError as exc:
        excerpt = delivery.data[:_EXCERPT_BYTES].decode("utf-8", errors="replace")
        log.warning(
            "message terminated: not a DriverMessage",
            subject=delivery.subject,
            reason=str(exc),
            size=len(delivery.data),
            excerpt=excerpt,
        )
        return Processed(Outcome(Kind.UNDECODABLE, Action.TERM))


async def _decide(
    driver: Driver,
    delivery: Delivery,
    decoded: DriverMessage | Processed,
    services: Services,
) -> tuple[Processed, BaseException | None]:
    if isinstance(decoded, Processed):
        return decoded, None
    message = decoded
    resource = message.payload
    log = services.log.bind(
        run_id=message.run_id,
        message_id=message.id,
        event_name=message.event,
        resource_type=resource.type,
        resource_name=resource.name,
        **({"pipeline": resource.pipeline} if resource.pipeline else {}),
    )
    route = driver.route_for(resource.type, message.event)
    if route is None:
        return _unrouted(driver, delivery, message, log), None

    if delivery.attempt > driver.max_attempts:
        earlier = delivery.earlier or ("the handler never finished (the driver stopped mid-run)",)
        outcome = outcomes.gave_up(delivery.attempt - 1, earlier[-1], earlier[:-1])
        log.error("run gave up", attempt=delivery.attempt, reason=outcome.result)
        return Processed(outcome, message), None

    spec = resource.spec
    if route.spec is not None:
        try:
            spec = specs.structure(resource.spec, route.spec)
        except specs.InvalidSpec as exc:
            # Permanent: the same spec fails the same way on every attempt.
            outcome = outcomes.from_exception(exc, delivery.attempt, driver.max_attempts)
            log.warning("run failed: invalid spec", errors=exc.errors, handler=route.name)
            return Processed(outcome, message), None

    timeout = _timeout_of(route, driver, services)
    ctx: Context[Any] = Context(
        driver=driver.name,
        event=message.event,
        run_id=message.run_id,
        message_id=message.id,
        subject=delivery.subject,
        attempt=delivery.attempt,
        resource=resource,
        log=log,
        api=services.api,
        deadline=time.monotonic() + timeout if timeout is not None else None,
        kill_grace=driver.kill_grace,
        run_workspace=RunWorkspace(services.workspace_root, driver.name),
        spec=spec,
        redactor=services.redactor,
    )
    log.debug("run started", attempt=delivery.attempt, handler=route.name)
    succeeded = False
    try:
        processed, error = await _run(route, ctx, delivery, driver, services, timeout, message)
        succeeded = processed.outcome.kind is Kind.SUCCESS
        return processed, error
    finally:
        # Also on timeout and cancellation: the run has ended either way.
        workspace = ctx.run_workspace
        ending = workspace.end(keep=not succeeded and services.keep_failed_workspaces)
        if ending is not None:  # an await only for a run that made one
            await finish(workspace, ending, log)


async def _run(
    route: Route,
    ctx: Context,
    delivery: Delivery,
    driver: Driver,
    services: Services,
    timeout: float | None,
    message: DriverMessage,
) -> tuple[Processed, BaseException | None]:
    """Call the handler and turn what it did into an outcome."""
    log = ctx.log
    inflight = services.telemetry.inflight
    inflight.add(1)
    try:
        with run_scope(log):
            if timeout is None:
                value = await _call(route, ctx, services.executor)
            else:
                value = await _call_until(route, ctx, services, timeout, log)
    except BaseException as exc:
        # SystemExit, KeyboardInterrupt & co. raised by a handler are its failure, not a
        # request to stop the driver: signals reach the runtime through its own handlers.
        # A cancellation is the runtime's own (shutdown) only when this task is cancelling.
        if isinstance(exc, asyncio.CancelledError) and _cancelling():
            raise
        attempt, max_attempts = delivery.attempt, driver.max_attempts
        outcome = outcomes.from_exception(exc, attempt, max_attempts, delivery.earlier)
        _log_exception(log, exc, outcome, attempt, max_attempts)
        error = outcomes.describe(exc) if outcome.kind is Kind.RETRY else ""
        return Processed(outcome, message, error=error), exc
    finally:
        inflight.add(-1)
    outcome = outcomes.from_return(value)
    _log_result(log, outcome)
    return Processed(outcome, message), None


def _unrouted(
    driver: Driver, delivery: Delivery, message: DriverMessage, log: FilteringBoundLogger
) -> Processed:
    """No handler takes this event: skip a broadcast, report a step addressed to us.

    A broadcast (``resources.<type>``) goes to every driver of the type, so not handling
    some of its events is normal. A step addressed to this driver is the pipeline waiting
    for it: without a result it would wait forever; a failure ends it (the server stops a
    pipeline at a failed step).
    """
    resource_type = message.payload.type
    if not protocol.is_addressed(delivery.subject):
        log.debug("event skipped: no handler for it", subject=delivery.subject)
        return Processed(Outcome(Kind.SKIPPED, Action.ACK), message)
    text = (
        f"driver {driver.name!r} has no handler for event {message.event!r} "
        f"of type {resource_type!r}"
    )
    log.warning("step failed: no handler for it", subject=delivery.subject, result=text)
    return Processed(Outcome(Kind.UNROUTED, Action.ACK, outcomes.Result.fail(text)), message)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _timeout_of(route: Route, driver: Driver, services: Services) -> float | None:
    if route.timeout is not None:
        return route.timeout
    return services.timeout if services.timeout is not None else driver.timeout


async def _call_until(
    route: Route,
    ctx: Context,
    services: Services,
    timeout: float,
    log: FilteringBoundLogger,
) -> Any:
    """The handler's value, or :class:`~conveyor_driver.outcomes.TimedOut` at the deadline.

    An async handler is cancelled there (its ``ctx.run`` commands are stopped as it
    unwinds). A sync one cannot be: its outcome is decided at the deadline all the same,
    and its thread is abandoned to finish on its own.
    """
    executor = services.executor
    if route.is_async:
        try:
            async with asyncio.timeout(timeout) as window:
                return await route.handler(ctx)  # type: ignore[misc]  # is_async: a coroutine
        except TimeoutError:
            if window.expired():
                raise outcomes.TimedOut(timeout) from None
            raise  # the handler's own TimeoutError, before its deadline
    future = asyncio.ensure_future(_call(route, ctx, executor))
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        if future.done():  # finished at the last moment, or raised TimeoutError itself
            return future.result()
    if isinstance(executor, HandlerThreads):
        executor.abandon()
    services.telemetry.abandoned_threads.add(1)
    log.warning(
        "sync handler abandoned at its deadline; its thread runs on until it returns",
        handler=route.name,
        timeout=timeout,
        abandoned_threads=executor.abandoned if isinstance(executor, HandlerThreads) else None,
    )
    raise outcomes.TimedOut(timeout)


def _call(route: Route, ctx: Context, executor: Executor | None) -> Awaitable[Any]:
    """The run's awaitable: an async handler's own coroutine, a sync one's executor future.

    Not a coroutine itself, so an async handler costs no extra frame per run. A sync
    handler runs in a copy of the current context, taken here, inside the run's scope.
    """
    if route.is_async:
        return route.handler(ctx)  # type: ignore[return-value]  # is_async: a coroutine
    loop = asyncio.get_running_loop()
    run = functools.partial(contextvars.copy_context().run, _in_thread, route.handler, ctx)
    return loop.run_in_executor(executor, run)


def _in_thread(handler: Any, ctx: Context) -> Any:
    """A sync handler's call, which tells its workspace when the thread is done with it.

    A thread abandoned at its deadline runs on: its workspace is removed when it returns,
    not under its feet (:func:`~conveyor_driver.workspace.finish`).
    """
    workspace = ctx.run_workspace
    workspace.enter()
    try:
        return handler(ctx)
    finally:
        workspace.leave()


def _log_result(log: FilteringBoundLogger, outcome: Outcome) -> None:
    result = outcome.result
    assert result is not None
    if result.success:
        log.info("run succeeded", result=result.message)
    else:
        log.warning("run failed", result=result.message)


def _log_exception(
    log: FilteringBoundLogger,
    exc: BaseException,
    outcome: Outcome,
    attempt: int,
    max_attempts: int,
) -> None:
    if outcome.kind is Kind.FAILURE:
        log.warning("run failed", result=outcome.result.message if outcome.result else "")
    elif outcome.kind is Kind.GAVE_UP:
        log.error(
            "run gave up",
            attempt=attempt,
            result=outcome.result.message if outcome.result else "",
            exc_info=not isinstance(exc, outcomes.Retry),
        )
    elif isinstance(exc, outcomes.Retry):
        log.info("run will retry", reason=exc.message, delay=outcome.delay, attempt=attempt)
    else:
        log.error(
            "run raised; will retry",
            attempt=attempt,
            max_attempts=max_attempts,
            delay=outcome.delay,
            exc_info=exc,
        )
