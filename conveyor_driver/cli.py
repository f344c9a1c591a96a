"""The ``conveyor-driver`` command: run a driver, emit a test event, list routes, follow logs.

Every option can also be set with a ``CONVEYOR_<OPTION>`` environment variable. Mistakes a
user can make (a bad app path, an unreachable NATS, a missing stream) print one line and
exit 1; ``--log-level debug`` adds the traceback.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import traceback
from collections.abc import Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson

from . import protocol
from .errors import ConveyorDriverError
from .loader import load_driver
from .logs.loki import LokiConfig
from .models import converter, resource_from_json
from .settings import (
    DEFAULT_API_URL,
    DEFAULT_NATS_URL,
    LOG_FORMATS,
    LOG_LEVELS,
    Settings,
    parse_labels,
)
from .telemetry import configure_from_env

if TYPE_CHECKING:
    from .tls import TLSConfig

F = TypeVar("F", bound=Callable[..., Any])

_nats_url = click.option(
    "--nats-url",
    envvar="CONVEYOR_NATS_URL",
    default=DEFAULT_NATS_URL,
    show_default=True,
    help="NATS server URL(s), comma-separated.",
)


def _tls_options(command: F) -> F:
    """The driver's identity on a secured Conveyor: mutual TLS to NATS, signed API calls."""
    path = click.Path(dir_okay=False, path_type=Path)
    options = [
        click.option(
            "--tls-cert",
            envvar="CONVEYOR_TLS_CERT",
            type=path,
            help="PEM certificate chain of the driver, leaf first.",
        ),
        click.option(
            "--tls-key",
            envvar="CONVEYOR_TLS_KEY",
            type=path,
            help="PEM private key of the leaf certificate (RSA or EC).",
        ),
        click.option(
            "--tls-ca",
            envvar="CONVEYOR_TLS_CA",
            type=path,
            help="PEM CA certificate(s) the servers' certificates are checked against.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _nats_tls(options: dict[str, Any]) -> ssl.SSLContext | None:
    from .tls import load_tls

    tls = load_tls(options["tls_cert"], options["tls_key"], options["tls_ca"])
    return tls.ssl_context() if tls is not None else None


def _friendly_errors(command: F) -> F:
    """Turn user errors into one line on stderr and exit status 1."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("log_level") == "debug"
        try:
            return command(*args, **kwargs)
        except ConveyorDriverError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _run_async(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


@click.group()
@click.version_option(package_name="conveyor-driver")
def main() -> None:
    """Write and run Conveyor CI drivers in Python."""


def _loki_options(command: F) -> F:
    """The ``--loki-*`` options of ``run``; with no --loki-url, no Loki code runs."""
    options = [
        click.option("--loki-url", envvar="CONVEYOR_LOKI_URL", help="Grafana Loki base URL."),
        click.option("--loki-tenant", envvar="CONVEYOR_LOKI_TENANT", help="X-Scope-OrgID."),
        click.option("--loki-user", envvar="CONVEYOR_LOKI_USER", help="Basic auth user."),
        click.option("--loki-password", envvar="CONVEYOR_LOKI_PASSWORD"),
        click.option("--loki-token", envvar="CONVEYOR_LOKI_TOKEN", help="Bearer token."),
        click.option(
            "--loki-label",
            envvar="CONVEYOR_LOKI_LABEL",
            multiple=True,
            metavar="KEY=VALUE",
            help="A static label on every line (repeatable).",
        ),
        click.option(
            "--loki-batch-wait",
            envvar="CONVEYOR_LOKI_BATCH_WAIT",
            type=click.FloatRange(min=0.01),
            default=1.0,
            show_default=True,
            help="Seconds a batch gathers before it is sent.",
        ),
        click.option(
            "--loki-batch-bytes",
            envvar="CONVEYOR_LOKI_BATCH_BYTES",
            type=click.IntRange(min=1024),
            default=1_048_576,
            show_default=True,
        ),
        click.option(
            "--loki-format",
            envvar="CONVEYOR_LOKI_FORMAT",
            type=click.Choice(["logfmt", "json"]),
            default="logfmt",
            show_default=True,
            help="How each line is rendered.",
        ),
        click.option(
            "--loki-structured-metadata/--no-loki-structured-metadata",
            envvar="CONVEYOR_LOKI_STRUCTURED_METADATA",
            default=True,
            show_default=True,
            help="Off for Loki 2.x: run ids then go into the line instead.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("app", envvar="CONVEYOR_APP")
@_nats_url
@click.option(
    "--api-url",
    envvar="CONVEYOR_API_URL",
    default=DEFAULT_API_URL,
    show_default=True,
    help="Conveyor API server URL.",
)
@click.option(
    "--concurrency",
    envvar="CONVEYOR_CONCURRENCY",
    type=click.IntRange(min=1),
    help="Handlers running at once (default: the Driver's).",
)
@click.option(
    "--log-level",
    envvar="CONVEYOR_LOG_LEVEL",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    envvar="CONVEYOR_LOG_FORMAT",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    default="auto",
    show_default=True,
    help="console (pretty), json (one object a line), auto (console on a terminal).",
)
@click.option(
    "--embedded",
    envvar="CONVEYOR_EMBEDDED",
    is_flag=True,
    help="Start a local nats-server with the Conveyor streams and use it.",
)
@click.option("--embedded-port", envvar="CONVEYOR_EMBEDDED_PORT", type=int, default=None)
@click.option(
    "--embedded-dir",
    envvar="CONVEYOR_EMBEDDED_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="JetStream storage of the embedded server (default: a temporary directory).",
)
@click.option(
    "--http-port",
    envvar="CONVEYOR_HTTP_PORT",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve /healthz, /readyz and /metrics on this port (off by default).",
)
@_loki_options
@_tls_options
@_friendly_errors
def run(app: str, **options: Any) -> None:
    """Serve the driver APP (module:attr or path/to/file.py:attr) until SIGINT/SIGTERM."""
    driver = load_driver(app)
    settings = Settings(
        nats_urls=options["nats_url"],
        api_url=options["api_url"],
        concurrency=options["concurrency"],
        log_level=options["log_level"].lower(),
        log_format=options["log_format"].lower(),
        embedded=options["embedded"],
        embedded_port=options["embedded_port"],
        embedded_dir=options["embedded_dir"],
        loki=_loki_config(options),
        http_port=options["http_port"],
        tls_cert=options["tls_cert"],
        tls_key=options["tls_key"],
        tls_ca=options["tls_ca"],
    )
    shutdown_telemetry = configure_from_env(driver.name, prometheus=settings.http_port is not None)
    try:
        _run_async(driver.serve(settings))
    finally:
        if shutdown_telemetry is not None:
            shutdown_telemetry()


def _loki_config(options: dict[str, Any]) -> LokiConfig | None:
    if not options["loki_url"]:
        return None
    if options["loki_token"] and options["loki_user"]:
        raise click.UsageError("give either --loki-user/--loki-password or --loki-token")
    return LokiConfig(
        url=options["loki_url"],
        tenant=options["loki_tenant"],
        username=options["loki_user"],
        password=options["loki_password"],
        token=options["loki_token"],
        labels=parse_labels(options["loki_label"]),
        batch_wait=options["loki_batch_wait"],
        batch_bytes=options["loki_batch_bytes"],
        line_format=options["loki_format"],
        structured_metadata=options["loki_structured_metadata"],
    )


@main.command()
@click.argument("app", envvar="CONVEYOR_APP")
@_friendly_errors
def routes(app: str) -> None:
    """List APP's handlers, what they answer to, and the subjects its consumer reads."""
    driver = load_driver(app)
    click.echo(
        f"driver {driver.name} (consumer {driver.name!r} on stream {protocol.MESSAGES_STREAM!r})"
    )
    if not driver.routes:
        click.echo("  no handlers registered")
    for route in driver.routes:
        events = ", ".join(sorted(route.events)) if route.events else "*"
        click.echo(
            f"  {route.name}: resource types {', '.join(route.resource_types)}; events {events}"
        )
        for subject in protocol.filter_subjects(driver.name, route.resource_types):
            click.echo(f"    {subject}")


@main.command()
@click.argument("app", envvar="CONVEYOR_APP")
@_nats_url
@_tls_options
@_friendly_errors
def status(app: str, nats_url: str, **tls_options: Any) -> None:
    """Show APP's consumer as the server sees it: backlog, in flight, redeliveries."""
    driver = load_driver(app)
    _run_async(_status(driver.name, nats_url, _nats_tls(tls_options)))


async def _status(name: str, nats_url: str, tls: ssl.SSLContext | None = None) -> None:
    from nats.js.errors import NotFoundError

    from .logs.chain import build_logger
    from .runtime.connection import connect

    nc = await connect(
        nats_url.split(","), name="conveyor-driver:status", log=build_logger(), tls=tls
    )
    try:
        try:
            info = await nc.jetstream().consumer_info(protocol.MESSAGES_STREAM, name)
        except NotFoundError:
            raise _NoResult(
                f"consumer {name!r} not found on stream {protocol.MESSAGES_STREAM!r} "
                "(has the driver run against this NATS, and does the stream exist?)"
            ) from None
    finally:
        await nc.close()
    config = info.config
    rows = [
        ("consumer", f"{name} on stream {protocol.MESSAGES_STREAM}"),
        ("subjects", ", ".join(config.filter_subjects or [config.filter_subject or "-"])),
        ("pending", f"{info.num_pending} waiting to be delivered"),
        ("ack pending", f"{info.num_ack_pending} delivered, not yet acknowledged"),
        ("redelivered", str(info.num_redelivered)),
        ("waiting pulls", str(info.num_waiting)),
        ("last delivery", _when(info.delivered.last_active if info.delivered else None)),
        ("last ack", _when(info.ack_floor.last_active if info.ack_floor else None)),
    ]
    for label, value in rows:
        click.echo(f"{label:>14}: {value}")


def _when(moment: Any) -> str:
    return moment.isoformat() if moment is not None else "never"


@main.command()
@click.argument("resource_type")
@click.argument("name")
@click.option("--spec", default="{}", show_default=True, help="The resource spec as JSON.")
@click.option("--event", default="create", show_default=True)
@click.option("--driver", help="Address a pipeline step to this driver.")
@click.option("--pipeline", default="", help="The pipeline the resource belongs to.")
@click.option("--wait", is_flag=True, help="Print the result event of this run.")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds --wait waits.")
@_nats_url
@_tls_options
@_friendly_errors
def emit(
    resource_type: str,
    name: str,
    spec: str,
    event: str,
    driver: str | None,
    pipeline: str,
    wait: bool,
    timeout: float,
    nats_url: str,
    **tls_options: Any,
) -> None:
    """Publish a RESOURCE_TYPE event for NAME exactly as the Conveyor server would."""
    try:
        spec_value = orjson.loads(spec)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--spec") from None
    for label, token in (("resource type", resource_type), ("driver", driver or "x")):
        if not protocol.is_subject_token(token):
            raise click.BadParameter(f"{label} {token!r} is not a NATS subject token")
    resource = resource_from_json(
        {"name": name, "resource": resource_type, "pipeline": pipeline, "spec": spec_value}
    )
    nats_tls = _nats_tls(tls_options)
    _run_async(_emit(nats_url, resource, event, driver, wait, timeout, nats_tls))


async def _emit(
    nats_url: str,
    resource: Any,
    event: str,
    driver: str | None,
    wait: bool,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> None:
    from .emit import emit_event, watch_results
    from .logs.chain import build_logger
    from .runtime.connection import connect

    log = build_logger(level="warning")
    nc = await connect(nats_url.split(","), name="conveyor-driver:emit", log=log, tls=tls)
    try:
        async with watch_results(nc) as watch:
            message = await emit_event(nc, resource, event=event, driver=driver)
            click.echo(
                f"emitted {event} {resource.type}/{resource.name} run_id={message.run_id}", err=True
            )
            if not wait:
                return
            try:
                result = await watch.wait(message.run_id, timeout)
            except TimeoutError:
                raise _NoResult(f"no result for run {message.run_id} within {timeout:g}s") from None
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
@click.argument("run_id")
@click.option("--driver", help="Only this driver's lines (default: every driver of the run).")
@click.option(
    "--api-url",
    envvar="CONVEYOR_API_URL",
    default=DEFAULT_API_URL,
    show_default=True,
    help="Conveyor API server URL.",
)
@_tls_options
@_friendly_errors
def logs(run_id: str, driver: str | None, api_url: str, **tls_options: Any) -> None:
    """Follow RUN_ID's log lines from the API server as they come, until it ends the stream."""
    from .tls import load_tls

    tls = load_tls(tls_options["tls_cert"], tls_options["tls_key"], tls_options["tls_ca"])
    _run_async(_logs(Settings(api_url=api_url), tls, run_id, driver))


async def _logs(settings: Settings, tls: TLSConfig | None, run_id: str, driver: str | None) -> None:
    from .api import ConveyorAPIError, ConveyorClient

    client = ConveyorClient.from_settings(settings, tls)
    try:
        async for entry in client.stream_logs(run_id, driver):
            click.echo(f"{entry.timestamp} [{entry.driver}] {entry.message}")
    except ConveyorAPIError as exc:
        raise _APIFailed(str(exc)) from None
    finally:
        await client.close()


class _APIFailed(ConveyorDriverError):
    pass


if __name__ == "__main__":
    main()
