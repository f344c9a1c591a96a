"""The Driver: a registry of reconcile handlers, lifecycle hooks, and the way to run them."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import attrs

from . import protocol, specs
from .errors import ConfigurationError
from .logs.redact import check_secret
from .outcomes import Result
from .process import KILL_GRACE

if TYPE_CHECKING:
    from .context import Context
    from .settings import Settings

#: What a handler may return, as Flask's ``ResponseReturnValue`` says what a view may:
#: a :class:`Result`, ``None`` (success), or a JSON value (success, with it as ``data``).
HandlerReturnValue: TypeAlias = (
    Result | Mapping[str, Any] | Sequence[Any] | str | int | float | bool | None
)
#: A handler, sync or async, as Flask's ``RouteCallable``: the type checker refuses one
#: whose return the runtime could only turn into a failure.
Handler: TypeAlias = (
    Callable[["Context"], HandlerReturnValue] | Callable[["Context"], Awaitable[HandlerReturnValue]]
)
Hook = Callable[[], Any]
H = TypeVar("H", bound=Handler)
K = TypeVar("K", bound=Hook)


@attrs.frozen
class Route:
    """One registered handler and what it answers to (``events=None``: every event)."""

    handler: Handler
    resource_types: tuple[str, ...]
    events: frozenset[str] | None
    #: Seconds one attempt may take (None: the driver's default, which may be None too).
    timeout: float | None = None
    #: The class ``resource.spec`` is structured into before the handler is called
    #: (:mod:`conveyor_driver.specs`); None: the handler gets the JSON as it is.
    spec: type[Any] | None = None

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", repr(self.handler))

    is_async: bool = attrs.field(init=False)

    @is_async.default
    def _is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)

    def matches(self, resource_type: str, event: str) -> bool:
        return resource_type in self.resource_types and (
            self.events is None or event in self.events
        )

    def overlaps(self, other: Route) -> bool:
        if not set(self.resource_types) & set(other.resource_types):
            return False
        if self.events is None or other.events is None:
            return True
        return bool(self.events & other.events)


class Driver:
    """A Conveyor driver: name it, register handlers with :meth:`on`, then :meth:`run`.

    ``concurrency`` is how many handlers run at once in one process (and how many messages
    it holds). ``max_attempts`` bounds retries: the last failed attempt publishes a failure
    result. ``ack_wait`` is how long JetStream waits for news of a delivery before it
    hands the message to another instance; the runtime keeps long runs alive inside it.
    ``grace_period`` is how long a shutdown lets running handlers finish. ``secrets`` are
    masked as ``***`` in every log line of the driver (console, NATS, Loki, ``ctx.run``).
    """

    def __init__(
        self,
        name: str,
        *,
        concurrency: int = 1,
        max_attempts: int = 3,
        ack_wait: float = 30.0,
        grace_period: float = 30.0,
        timeout: float | None = None,
        kill_grace: float = KILL_GRACE,
        ledger: bool = True,
        apply_definitions: bool = False,
        secrets: Iterable[str] = (),
    ) -> None:
        if not isinstance(name, str) or not protocol.is_subject_token(name):
            raise ConfigurationError(
                f"driver name {name!r} is not usable: it must be non-empty, without "
                "whitespace, '.', '*' or '>' (it becomes a NATS subject token)"
            )
        for label, value in (("concurrency", concurrency), ("max_attempts", max_attempts)):
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"Driver {label} must be at least 1, not {value!r}")
        if ack_wait <= 0:
            raise ConfigurationError(f"Driver ack_wait must be positive, not {ack_wait!r}")
        if grace_period < 0:
            raise ConfigurationError(f"Driver grace_period must be >= 0, not {grace_period!r}")
        _check_timeout("Driver timeout", timeout)
        if kill_grace < 0:
            raise ConfigurationError(f"Driver kill_grace must be >= 0, not {kill_grace!r}")
        self.name = name
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.ack_wait = float(ack_wait)
        self.grace_period = float(grace_period)
        self.timeout = float(timeout) if timeout is not None else None
        self.kill_grace = float(kill_grace)
        #: Keep the run ledger (docs/protocol.md#the-run-ledger); ``--no-ledger`` also
        #: turns it off.
        self.ledger = ledger
        #: Create or update the ResourceDefinitions of the typed specs at start
        #: (:mod:`conveyor_driver.definitions`); ``--apply-definitions`` also turns it on.
        self.apply_definitions = apply_definitions
        #: Masked as ``***`` in every log line (``conveyor_driver.logs.redact``); checked
        #: here, so a secret too short to mask is refused where it is written.
        self.secrets = tuple(check_secret(secret) for secret in secrets)
        self._routes: list[Route] = []
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []

    def __repr__(self) -> str:
        return f"<Driver {self.name!r} routes={len(self._routes)}>"

    def on(
        self,
        *resource_types: str,
        events: Iterable[str] | None = None,
        timeout: float | None = None,
        spec: type[Any] | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated function for these resource types (and events).

        ``timeout`` bounds one attempt in seconds (default: the driver's ``timeout``): at
        the deadline an async handler is cancelled, its ``ctx.run`` commands are stopped,
        and the attempt counts as failed.

        ``spec`` (an attrs class or a dataclass) types the resource's spec: it is
        structured before the handler is called and handed over as ``ctx.spec``; a spec
        that does not fit is a failure result naming every bad field, never retried. It
        is also the JSON Schema of these resource types (``conveyor-driver schema``).
        """
        _check_timeout("@driver.on() timeout", timeout)
        if spec is not None:
            specs.check(spec)
        if not resource_types:
            raise ConfigurationError("@driver.on() needs at least one resource type")
        for resource_type in resource_types:
            if not isinstance(resource_type, str) or not protocol.is_subject_token(resource_type):
                raise ConfigurationError(
                    f"resource type {resource_type!r} is not usable: it must be non-empty, "
                    "without whitespace, '.', '*' or '>'"
                )
        event_set: frozenset[str] | None = None
        if events is not None:
            event_set = frozenset([events] if isinstance(events, str) else events)
            if not event_set or not all(isinstance(e, str) and e for e in event_set):
                raise ConfigurationError("events must be a non-empty list of event names")

        def register(handler: H) -> H:
            if not callable(handler):
                raise ConfigurationError(f"@driver.on() decorates a function, not {handler!r}")
            route = Route(handler, tuple(dict.fromkeys(resource_types)), event_set, timeout, spec)
            for existing in self._routes:
                _check_same_spec(route, existing)
                if route.overlaps(existing):
                    raise ConfigurationError(
                        f"handler {route.name} clashes with {existing.name}: both would "
                        f"handle {_describe_overlap(route, existing)}"
                    )
            self._routes.append(route)
            return handler

        return register

    def on_startup(self, hook: K) -> K:
        """Run ``hook`` (sync or async) once connected, before the first message."""
        self.startup_hooks.append(hook)
        return hook

    def on_shutdown(self, hook: K) -> K:
        """Run ``hook`` (sync or async) after the last handler finished."""
        self.shutdown_hooks.append(hook)
        return hook

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self._routes)

    @property
    def resource_types(self) -> list[str]:
        return sorted({t for route in self._routes for t in route.resource_types})

    @property
    def subjects(self) -> list[str]:
        """The filter subjects of this driver's consumer."""
        return protocol.filter_subjects(self.name, self.resource_types)

    def route_for(self, resource_type: str, event: str) -> Route | None:
        for route in self._routes:
            if route.matches(resource_type, event):
                return route
        return None

    def check(self) -> None:
        """Refuse to start a driver that could never handle anything."""
        if not self._routes:
            raise ConfigurationError(
                f"driver {self.name!r} has no handler: register one with @driver.on(...)"
            )

    async def serve(self, settings: Settings | None = None) -> None:
        """Consume until cancelled or until SIGINT/SIGTERM, inside a running event loop."""
        from .runtime.server import serve

        await serve(self, settings)

    def run(self, settings: Settings | None = None) -> None:
        """Serve until SIGINT/SIGTERM on the loop ``settings.loop`` names (uvloop if it can).

        Settings default to the CONVEYOR_* environment.

        ``conveyor-driver run`` comes through here too, so a driver started from Python
        and one started from the command line read the same variables and install the
        OpenTelemetry SDK from the same ``OTEL_*`` variables. The process is the driver's:
        once started, its garbage collector is set for serving (a frozen start-up heap,
        fewer collections); :meth:`serve` in your own event loop leaves it alone.
        """
        from .loops import run
        from .runtime.heap import owned_by_driver
        from .settings import Settings
        from .telemetry import configure_from_env

        settings = settings if settings is not None else Settings.from_env()
        shutdown_telemetry = configure_from_env(
            self.name, prometheus=settings.http_port is not None
        )
        try:
            with owned_by_driver():
                run(self.serve(settings), settings.loop)
        finally:
            if shutdown_telemetry is not None:
                shutdown_telemetry()


def _describe_overlap(a: Route, b: Route) -> str:
    types = sorted(set(a.resource_types) & set(b.resource_types))
    if a.events is None or b.events is None:
        events = (a.events or b.events) or frozenset()
        what = "every event" if not events else f"event {', '.join(sorted(events))}"
    else:
        what = f"event {', '.join(sorted(a.events & b.events))}"
    return f"{what} of resource type {', '.join(types)}"


def _check_same_spec(route: Route, other: Route) -> None:
    """One resource type, one schema: two spec classes for one type cannot both be it."""
    if route.spec is None or other.spec is None or route.spec is other.spec:
        return
    shared = sorted(set(route.resource_types) & set(other.resource_types))
    if shared:
        raise ConfigurationError(
            f"handler {route.name} types resource type {', '.join(shared)} with spec "
            f"{route.spec.__qualname__}, but {other.name} with {other.spec.__qualname__}: "
            "one resource type has one schema"
        )


def _check_timeout(what: str, timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:
        raise ConfigurationError(f"{what} must be positive seconds or None, not {timeout!r}")
