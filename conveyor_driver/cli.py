"""The ``conveyor-driver`` command: run a driver, emit an event, list routes, follow logs...

Every option can also be set with a ``CONVEYOR_*`` environment variable, which ``--help``
names. Click itself reads no variable: the options are generated from the table in
:mod:`conveyor_driver.settings`, and only the values given on the command line are handed
to its one reader, so ``conveyor-driver run`` and ``driver.run()`` cannot drift apart.
Mistakes a user can make (a bad app path or setting, an unreachable NATS, a missing stream)
print one line and exit 1; ``--log-level debug`` adds the traceback.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import traceback
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson
from click.core import ParameterSource

from . import protocol
from ._version import __version__
from .errors import ConfigurationError, ConveyorDriverError
from .loader import load_driver
from .models import converter, resource_from_json
from .settings import (
    COMMAND_VARIABLES,
    VARIABLES,
    Settings,
    Variable,
    as_environment,
    command_values,
    decimal,
    path,
    split_urls,
    whole,
)

if TYPE_CHECKING:
    from .app import Driver
    from .tls import TLSConfig

F = TypeVar("F", bound=Callable[..., Any])

_SETTING = {variable.key: variable for variable in VARIABLES}
_TLS = ("tls_cert", "tls_key", "tls_ca")
_LOKI = tuple(key for key in _SETTING if key.startswith("loki_"))
_RUN = (
    "nats_urls",
    "api_url",
    "concurrency",
    "workers",
    "reload",
    "log_level",
    "log_format",
    "loop",
    "embedded",
    "embedded_port",
    "embedded_dir",
    "http_port",
    "http_host",
    "startup_timeout",
    "block_threshold",
    "lag_interval",
    "ledger",
    "ledger_ttl",
    "timeout",
    "max_runs",
    "exit_when_idle",
    "workspace_root",
    "keep_failed_workspaces",
    "apply_definitions",
    *_LOKI,
    *_TLS,
    "redact_env",
    "redact_urls",
)


_METAVARS: dict[Callable[[str], Any], str] = {
    whole: "INTEGER",
    decimal: "NUMBER",
    path: "PATH",
    split_urls: "URL[,URL]",
}


def _option(variable: Variable) -> Callable[[F], F]:
    """A click option for ``variable``; its help names the variable (and the default)."""
    extras = f"[env: {variable.name}]"
    if variable.default is not None:
        extras += f" [default: {variable.default}]"
    decl = variable.option
    if variable.kind == "switch":
        decl = f"{decl}/--no-{decl[2:]}"
    return click.option(
        decl,
        variable.key,
        is_flag=variable.kind in ("flag", "switch"),
        multiple=variable.kind == "many",
        default=None,
        metavar=variable.metavar or _METAVARS.get(variable.parse),
        help=f"{variable.help} {extras}".strip(),
    )


def _options(*keys: str, command: str | None = None) -> Callable[[F], F]:
    """The options of these settings keys, then those of ``command``'s own variables."""
    variables = list(COMMAND_VARIABLES.get(command or "", ()))
    variables += [_SETTING[key] for key in keys]

    def decorate(function: F) -> F:
        for variable in reversed(variables):
            function = _option(variable)(function)
        return function

    return decorate


def _given(params: dict[str, Any], keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The parameters among ``keys`` that were written on the command line."""
    ctx = click.get_current_context()
    return {
        key: params[key]
        for key in keys
        if ctx.get_parameter_source(key) is ParameterSource.COMMANDLINE
    }


def _settings(params: dict[str, Any], keys: tuple[str, ...]) -> Settings:
    """Settings from the environment and this command's options: one reader for both."""
    settings = Settings.from_env(**_given(params, keys))
    click.get_current_context().meta["debug"] = settings.log_level == "debug"
    return settings


def _own(params: dict[str, Any], command: str) -> dict[str, Any]:
    """The values of ``command``'s own options: the command line, else the variable."""
    keys = [variable.key for variable in COMMAND_VARIABLES[command]]
    return command_values(command, _given(params, keys))


def _app(app: str | None) -> str:
    """APP from the command line or CONVEYOR_APP."""
    resolved = app or command_values("app", {}).get("app")
    if not resolved:
        raise click.UsageError("Missing argument 'APP' (or set CONVEYOR_APP).")
    return str(resolved)


def _nats_tls(settings: Settings) -> ssl.SSLContext | None:
    from .tls import load_tls

    tls = load_tls(settings.tls_cert, settings.tls_key, settings.tls_ca)
    return tls.ssl_context() if tls is not None else None


def _friendly_errors(command: F) -> F:
    """Turn user errors into one line on stderr and exit status 1."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConveyorDriverError as exc:
            if click.get_current_context().meta.get("debug"):
                traceback.print_exc()
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


@click.group()
@click.version_option(__version__, package_name="conveyor-driver")
def main() -> None:
    """Write and run Conveyor CI drivers in Python."""


_APP = click.argument("app", required=False, metavar="APP")


@main.command()
@_APP
@_options(*_RUN)
@_friendly_errors
def run(app: str | None, **options: Any) -> None:
    """Serve the driver APP (module:attr or path/to/file.py:attr) until SIGINT/SIGTERM.

    APP may also come from CONVEYOR_APP.
    """
    settings = _settings(options, _RUN)
    driver: Driver = load_driver(_app(app))
    if settings.reload:
        from .reload import serve_reloading

        given = as_environment(_given(options, _RUN))
        sys.exit(serve_reloading(driver, _app(app), settings, given))
    if settings.workers > 1:
        from .runtime.supervisor import supervise

        given = as_environment(_given(options, _RUN))
        sys.exit(supervise(driver, _app(app), settings, given))
    driver.run(settings)


_LAG: tuple[str, ...] = ("nats_urls", "http_port", "http_host", "startup_timeout")
_LAG += ("lag_interval", "log_level", "log_format", *_TLS)


@main.command()
@_APP
@_options(*_LAG)
@_friendly_errors
def lag(app: str | None, **options: Any) -> None:
    """Serve APP's backlog on /metrics, to scale it from zero; run no handler, pull nothing.

    Creates APP's consumer if it is missing, so that events are kept; never changes one.
    """
    from .runtime.lag import serve_lag

    _run_async(serve_lag(load_driver(_app(app)), _settings(options, _LAG)))


@main.command()
@_APP
@_friendly_errors
def routes(app: str | None) -> None:
    """List APP's handlers, what they answer to, and the subjects its consumer reads."""
    driver = load_driver(_app(app))
    click.echo(
        f"driver {driver.name} (consumer {driver.name!r} on stream {protocol.MESSAGES_STREAM!r})"
    )
    if not driver.routes:
        click.echo("  no handlers registered")
    for route in driver.routes:
        events = ", ".join(sorted(route.events)) if route.events else "*"
        typed = f"; spec {route.spec.__qualname__}" if route.spec is not None else ""
        click.echo(
            f"  {route.name}: resource types {', '.join(route.resource_types)}; "
            f"events {events}{typed}"
        )
        for subject in protocol.filter_subjects(driver.name, route.resource_types):
            click.echo(f"    {subject}")


@main.command()
@_APP
@_options("nats_urls", *_TLS)
@_friendly_errors
def status(app: str | None, **options: Any) -> None:
    """Show APP's consumer as the server sees it: backlog, in flight, redeliveries."""
    settings = _settings(options, ("nats_urls", *_TLS))
    driver = load_driver(_app(app))
    from .runtime.status import consumer_status

    rows = _run_async(consumer_status(driver.name, settings.nats_urls, _nats_tls(settings)))
    for label, value in rows:
        click.echo(f"{label:>14}: {value}")


@main.command()
@click.argument("resource_type")
@click.argument("name")
@_options("nats_urls", *_TLS, command="emit")
@_friendly_errors
def emit(resource_type: str, name: str, **options: Any) -> None:
    """Publish a RESOURCE_TYPE event for NAME exactly as the Conveyor server would."""
    from .emit import check_event

    own = _own(options, "emit")
    settings = _settings(options, ("nats_urls", *_TLS))
    try:
        spec_value = orjson.loads(own["spec"])
    except orjson.JSONDecodeError as exc:
        if "spec" in _given(options, ["spec"]):
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--spec") from None
        raise ConfigurationError(f"CONVEYOR_EMIT_SPEC is not JSON: {exc}") from None
    check_event(
        resource_type,
        name,
        event=own["event"],
        driver=own["driver"],
        pipeline=own["pipeline"] or "",
    )
    resource = resource_from_json(
        {
            "name": name,
            "resource": resource_type,
            "pipeline": own["pipeline"] or "",
            "spec": spec_value,
        }
    )
    nats_tls = _nats_tls(settings)
    _run_async(_emit(settings.nats_urls, resource, own, nats_tls))


async def _emit(
    urls: tuple[str, ...], resource: Any, own: dict[str, Any], tls: ssl.SSLContext | None
) -> None:
    from .emit import consumers_of, emit_event, subject_of, watch_results
    from .logs.chain import build_logger
    from .runtime.connection import connect

    event, driver, timeout = own["event"], own["driver"], own["timeout"]
    log = build_logger(level="error")  # one line on failure, as status
    nc = await connect(urls, name="conveyor-driver:emit", log=log, tls=tls)
    try:
        async with watch_results(nc) as watch:
            subject = subject_of(resource.type, driver)
            # The messages stream keeps only what some consumer wants: with nobody to
            # answer, waiting for a result could only end in a time-out.
            consumers = await consumers_of(nc, subject) if own["wait"] else []
            if own["wait"] and not consumers:
                raise _NoResult(
                    f"no driver consumes {subject}: no consumer of stream "
                    f"{protocol.MESSAGES_STREAM!r} filters it, so the stream keeps nothing; "
                    "start a driver that handles it, then emit again"
                )
            message = await emit_event(nc, resource, event=event, driver=driver)
            click.echo(
                f"emitted {event} {resource.type}/{resource.name} run_id={message.run_id}", err=True
            )
            if not own["wait"]:
                return
            try:
                result = await watch.wait(message.run_id, timeout)
            except TimeoutError:
                raise _NoResult(
                    f"no result for run {message.run_id} within {timeout:g}s (consumed by "
                    f"{', '.join(consumers)}: is one of these drivers running?)"
                ) from None
            click.echo(
                orjson.dumps(converter.unstructure(result), option=orjson.OPT_INDENT_2).decode()
            )
            if not result.driverresult.success:
                sys.exit(2)
    finally:
        await nc.close()


class _NoResult(ConveyorDriverError):
    pass


@main.command()
@_APP
@_options("http_port", "workers", command="manifest")
@_friendly_errors
def manifest(app: str | None, **options: Any) -> None:
    """Print Kubernetes manifests for APP, the values that must agree read off the Driver."""
    from .manifest import DEFAULT_HTTP_PORT, ManifestOptions, render

    own = _own(options, "manifest")
    settings = _settings(options, ("http_port", "workers"))
    port = settings.http_port or DEFAULT_HTTP_PORT
    shape = "scaled-job" if own["scaled_job"] else "deployment"
    chosen = ManifestOptions(own["image"], port, own["prometheus_url"], shape, settings.workers)
    click.echo(render(load_driver(_app(app)), chosen), nl=False)


@main.command()
@_APP
@_friendly_errors
def schema(app: str | None) -> None:
    """Print the JSON Schema of each resource type APP's handlers type with spec=."""
    from .definitions import schemas

    click.echo(orjson.dumps(schemas(load_driver(_app(app))), option=orjson.OPT_INDENT_2))


@main.command()
@_APP
@_options("api_url", *_TLS)
@_friendly_errors
def apply(app: str | None, **options: Any) -> None:
    """Create or update the ResourceDefinitions of APP's typed specs on the API server."""
    from .definitions import apply_on_server

    settings = _settings(options, ("api_url", *_TLS))
    for line in _run_async(apply_on_server(load_driver(_app(app)), settings)):
        click.echo(line)


@main.command()
@click.argument("run_id")
@_options("api_url", *_TLS, command="logs")
@_friendly_errors
def logs(run_id: str, **options: Any) -> None:
    """Follow RUN_ID's log lines from the API server as they come, until it ends the stream."""
    from .tls import load_tls

    settings = _settings(options, ("api_url", *_TLS))
    driver = _own(options, "logs")["driver"]
    tls = load_tls(settings.tls_cert, settings.tls_key, settings.tls_ca)
    _run_async(_logs(settings, tls, run_id, driver))


async def _logs(settings: Settings, tls: TLSConfig | None, run_id: str, driver: str | None) -> None:
    from .api import ConveyorClient

    client = ConveyorClient.from_settings(settings, tls)
    try:
        async for entry in client.stream_logs(run_id, driver):
            click.echo(f"{entry.timestamp} [{entry.driver}] {entry.message}")
    finally:
        await client.close()


if __name__ == "__main__":
    main()
