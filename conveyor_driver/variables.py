"""Every ``CONVEYOR_*`` variable, once: its setting, its parser and its command-line option.

The one table both entry points read (:mod:`.settings` builds the settings from it, the CLI
builds its options and their help from it), so that ``driver.run()`` and
``conveyor-driver run`` can never read the environment differently.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigurationError
from .logs.loki import LINE_FORMATS
from .loops import LOOPS

DEFAULT_NATS_URL = "nats://localhost:4222"
DEFAULT_API_URL = "http://localhost:8080"
DEFAULT_PROMETHEUS_URL = "http://prometheus-server.monitoring.svc:9090"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
NATS_RULE = "NATS URLs start with nats://, tls://, ws:// or wss://"
#: Environment variables whose values are masked in every log line (``--redact-env``).
DEFAULT_REDACT_ENV = ("*TOKEN*", "*SECRET*", "*PASSWORD*", "*KEY*", "*CREDENTIAL*")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# --- parsers: text of a variable or an option → a typed value, or ValueError(problem) ---------


def text(value: str) -> str:
    return value


def lower(value: str) -> str:
    return value.strip().lower()


def whole(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"must be a whole number, not {value!r}") from None


def decimal(value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ValueError(f"must be a number, not {value!r}") from None


def boolean(value: str) -> bool:
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"must be one of {', '.join(_TRUE + _FALSE)}, not {value!r}")


def path(value: str) -> Path:
    return Path(value)


def split_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """A comma-separated list (or a sequence) of URLs, blanks dropped."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(item.strip() for item in items if item.strip())


def patterns(value: str | Sequence[str]) -> tuple[str, ...]:
    """A comma-separated list of name patterns (``*`` and ``?`` as in a shell); ``none``: no
    pattern at all, since an empty variable counts as unset."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(item.strip() for item in items if item.strip())
    return () if names == ("none",) else names


@attrs.frozen
class Variable:
    """One ``CONVEYOR_*`` variable: the keyword it sets, how its text is read, its option.

    ``key`` is a :class:`Settings` field, ``loki_<field>`` for a :class:`LokiConfig` field,
    or, for variables of one command (:data:`COMMAND_VARIABLES`), the click parameter.
    """

    name: str
    key: str
    option: str
    parse: Callable[[str], Any] = text
    help: str = ""
    #: What ``--help`` shows as the default (None: no default shown).
    default: str | None = None
    #: ``"flag"`` (``--x``), ``"switch"`` (``--x/--no-x``), ``"many"`` (repeatable) or ``""``.
    kind: str = ""
    metavar: str | None = None


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "CONVEYOR_NATS_URL",
        "nats_urls",
        "--nats-url",
        split_urls,
        "NATS server URL(s), comma-separated.",
        DEFAULT_NATS_URL,
    ),
    Variable(
        "CONVEYOR_API_URL", "api_url", "--api-url", text, "Conveyor API URL.", DEFAULT_API_URL
    ),
    Variable(
        "CONVEYOR_CONCURRENCY",
        "concurrency",
        "--concurrency",
        whole,
        "Handlers running at once (default: the Driver's).",
    ),
    Variable(
        "CONVEYOR_WORKERS",
        "workers",
        "--workers",
        whole,
        "Worker processes, each with its own connection and event loop (one per core).",
        "1",
    ),
    Variable(
        "CONVEYOR_WORKER_INDEX",
        "worker_index",
        "--worker-index",
        whole,
        "Set by --workers in each worker process: its number, bound to its log lines.",
    ),
    Variable(
        "CONVEYOR_RELOAD",
        "reload",
        "--reload",
        boolean,
        "Development: restart the driver gracefully when one of the app's .py files changes.",
        kind="flag",
    ),
    Variable(
        "CONVEYOR_LOG_LEVEL",
        "log_level",
        "--log-level",
        lower,
        "The least severe level shown; debug adds tracebacks to errors.",
        "info",
        metavar="[" + "|".join(LOG_LEVELS) + "]",
    ),
    Variable(
        "CONVEYOR_LOG_FORMAT",
        "log_format",
        "--log-format",
        lower,
        "console (pretty), json (one object a line), auto (console on a terminal).",
        "auto",
        metavar="[" + "|".join(LOG_FORMATS) + "]",
    ),
    Variable(
        "CONVEYOR_LOOP",
        "loop",
        "--loop",
        lower,
        "Event loop: uvloop (auto: when installed) or asyncio's own.",
        "auto",
        metavar="[" + "|".join(LOOPS) + "]",
    ),
    Variable(
        "CONVEYOR_EMBEDDED",
        "embedded",
        "--embedded",
        boolean,
        "Start a local nats-server with the Conveyor streams and use it.",
        kind="flag",
    ),
    Variable(
        "CONVEYOR_EMBEDDED_PORT",
        "embedded_port",
        "--embedded-port",
        whole,
        "Port of the embedded nats-server (default: a free one).",
    ),
    Variable(
        "CONVEYOR_EMBEDDED_DIR",
        "embedded_dir",
        "--embedded-dir",
        path,
        "JetStream storage of the embedded server (default: a temporary directory).",
    ),
    Variable(
        "CONVEYOR_HTTP_PORT",
        "http_port",
        "--http-port",
        whole,
        "Serve /healthz, /readyz and /metrics on this port (off by default).",
    ),
    Variable(
        "CONVEYOR_HTTP_HOST",
        "http_host",
        "--http-host",
        text,
        "Address the probes listen on (127.0.0.1: this machine only).",
        "0.0.0.0",
    ),
    Variable(
        "CONVEYOR_STARTUP_TIMEOUT",
        "startup_timeout",
        "--startup-timeout",
        decimal,
        "Seconds start-up waits for NATS and JetStream before it gives up.",
        "60",
        metavar="SECONDS",
    ),
    Variable(
        "CONVEYOR_TIMEOUT",
        "timeout",
        "--timeout",
        decimal,
        "Seconds one attempt of a handler may take, unless its own timeout= says otherwise "
        "(default: the Driver's timeout, none unless set).",
        metavar="SECONDS",
    ),
    Variable(
        "CONVEYOR_LEDGER",
        "ledger",
        "--ledger",
        boolean,
        "Keep the run ledger (a finished run is never run again; one result per delivery).",
        "on",
        kind="switch",
    ),
    Variable(
        "CONVEYOR_LEDGER_TTL",
        "ledger_ttl",
        "--ledger-ttl",
        decimal,
        "Seconds the run ledger keeps a delivery's record.",
        "604800",
        metavar="SECONDS",
    ),
    Variable(
        "CONVEYOR_BLOCK_THRESHOLD",
        "block_threshold",
        "--block-threshold",
        decimal,
        "Seconds the event loop may stall before a warning names the handler holding it.",
        "1.0",
        metavar="SECONDS",
    ),
    Variable(
        "CONVEYOR_LAG_INTERVAL",
        "lag_interval",
        "--lag-interval",
        decimal,
        "Seconds between two readings of the consumer's backlog for /metrics.",
        "5",
        metavar="SECONDS",
    ),
    Variable(
        "CONVEYOR_MAX_RUNS",
        "max_runs",
        "--max-runs",
        whole,
        "Stop gracefully after this many runs; pulls no more than that (1: a one-shot job).",
        metavar="N",
    ),
    Variable(
        "CONVEYOR_EXIT_WHEN_IDLE",
        "exit_when_idle",
        "--exit-when-idle",
        decimal,
        "Stop gracefully after this many seconds with nothing running and nothing delivered.",
        metavar="SECONDS",
    ),
    Variable(
        "CONVEYOR_WORKSPACE_ROOT",
        "workspace_root",
        "--workspace-root",
        path,
        "Where each run's ctx.workspace is made (default: the system's temporary directory).",
    ),
    Variable(
        "CONVEYOR_KEEP_FAILED_WORKSPACES",
        "keep_failed_workspaces",
        "--keep-failed-workspaces",
        boolean,
        "Keep the workspace of a failed run for inspection; its log says where.",
        kind="flag",
    ),
    Variable(
        "CONVEYOR_APPLY_DEFINITIONS",
        "apply_definitions",
        "--apply-definitions",
        boolean,
        "At start, create or update the ResourceDefinitions of the handlers' spec= classes.",
        kind="flag",
    ),
    Variable("CONVEYOR_LOKI_URL", "loki_url", "--loki-url", text, "Grafana Loki base URL."),
    Variable("CONVEYOR_LOKI_TENANT", "loki_tenant", "--loki-tenant", text, "X-Scope-OrgID."),
    Variable("CONVEYOR_LOKI_USER", "loki_username", "--loki-user", text, "Basic auth user."),
    Variable(
        "CONVEYOR_LOKI_PASSWORD", "loki_password", "--loki-password", text, "Basic auth password."
    ),
    Variable("CONVEYOR_LOKI_TOKEN", "loki_token", "--loki-token", text, "Bearer token."),
    Variable(
        "CONVEYOR_LOKI_LABEL",
        "loki_labels",
        "--loki-label",
        text,
        "A static label on every line (repeatable; the variable: space-separated).",
        kind="many",
        metavar="KEY=VALUE",
    ),
    Variable(
        "CONVEYOR_LOKI_BATCH_WAIT",
        "loki_batch_wait",
        "--loki-batch-wait",
        decimal,
        "Seconds a batch gathers before it is sent.",
        "1.0",
        metavar="SECONDS",
    ),
    Variable(
        "CONVEYOR_LOKI_BATCH_BYTES",
        "loki_batch_bytes",
        "--loki-batch-bytes",
        whole,
        "Bytes a batch gathers at most.",
        "1048576",
    ),
    Variable(
        "CONVEYOR_LOKI_FORMAT",
        "loki_line_format",
        "--loki-format",
        lower,
        "How each line is rendered.",
        "logfmt",
        metavar="[" + "|".join(LINE_FORMATS) + "]",
    ),
    Variable(
        "CONVEYOR_LOKI_MAX_LINE_SIZE",
        "loki_max_line_size",
        "--loki-max-line-size",
        whole,
        "Loki's max_line_size in bytes: longer lines are truncated (0: no limit).",
        "256000",
    ),
    Variable(
        "CONVEYOR_LOKI_STRUCTURED_METADATA",
        "loki_structured_metadata",
        "--loki-structured-metadata",
        boolean,
        "Off for Loki 2.x: run ids then go into the line instead.",
        "on",
        kind="switch",
    ),
    Variable(
        "CONVEYOR_TLS_CERT",
        "tls_cert",
        "--tls-cert",
        path,
        "PEM certificate chain of the driver, leaf first.",
    ),
    Variable(
        "CONVEYOR_TLS_KEY",
        "tls_key",
        "--tls-key",
        path,
        "PEM private key of the leaf certificate (RSA or EC).",
    ),
    Variable(
        "CONVEYOR_TLS_CA",
        "tls_ca",
        "--tls-ca",
        path,
        "PEM CA certificate(s) the servers' certificates are checked against.",
    ),
    Variable(
        "CONVEYOR_REDACT_ENV",
        "redact_env",
        "--redact-env",
        patterns,
        "Mask in every log line the values of the environment variables whose names match "
        "these patterns (comma-separated, case-insensitive; none: no variable).",
        ",".join(DEFAULT_REDACT_ENV),
        metavar="PATTERNS",
    ),
    Variable(
        "CONVEYOR_REDACT_URLS",
        "redact_urls",
        "--redact-urls",
        boolean,
        "Mask the password of URLs in log lines (https://user:***@host).",
        "on",
        kind="switch",
    ),
)


def _positive(value: str) -> float:
    number = decimal(value)
    if not number > 0:
        raise ValueError(f"must be greater than 0, not {value!r}")
    return number


#: Variables of one command's own options (not deployment settings), read the same way.
COMMAND_VARIABLES: dict[str, tuple[Variable, ...]] = {
    "app": (Variable("CONVEYOR_APP", "app", "APP"),),
    "emit": (
        Variable("CONVEYOR_EMIT_SPEC", "spec", "--spec", text, "The resource spec as JSON.", "{}"),
        Variable("CONVEYOR_EMIT_EVENT", "event", "--event", text, "The event name.", "create"),
        Variable(
            "CONVEYOR_EMIT_DRIVER", "driver", "--driver", text, "Address a pipeline step to it."
        ),
        Variable(
            "CONVEYOR_EMIT_PIPELINE", "pipeline", "--pipeline", text, "The resource's pipeline."
        ),
        Variable(
            "CONVEYOR_EMIT_WAIT",
            "wait",
            "--wait",
            boolean,
            "Print the result event of this run.",
            kind="flag",
        ),
        Variable(
            "CONVEYOR_EMIT_TIMEOUT",
            "timeout",
            "--timeout",
            _positive,
            "Seconds --wait waits.",
            "60",
            metavar="SECONDS",
        ),
    ),
    "logs": (
        Variable(
            "CONVEYOR_LOGS_DRIVER",
            "driver",
            "--driver",
            text,
            "Only this driver's lines (default: every driver of the run).",
        ),
    ),
    "manifest": (
        Variable(
            "CONVEYOR_MANIFEST_IMAGE",
            "image",
            "--image",
            text,
            "The image built from deploy/Dockerfile (default: <driver name>:latest).",
        ),
        Variable(
            "CONVEYOR_MANIFEST_SCALED_JOB",
            "scaled_job",
            "--scaled-job",
            boolean,
            "A KEDA ScaledJob (one run per pod) instead of a Deployment and ScaledObject.",
            kind="flag",
        ),
        Variable(
            "CONVEYOR_MANIFEST_PROMETHEUS_URL",
            "prometheus_url",
            "--prometheus-url",
            text,
            "The Prometheus KEDA asks for the backlog.",
            DEFAULT_PROMETHEUS_URL,
        ),
    ),
}


def as_environment(given: Mapping[str, Any]) -> dict[str, str]:
    """The ``CONVEYOR_*`` variables that say what these command-line values say.

    ``--workers`` hands its worker processes the options it was given this way, so that
    each worker reads them through this table and its parsers, as the parent did.
    """
    by_key = {variable.key: variable for variable in VARIABLES}
    env: dict[str, str] = {}
    for key, value in given.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        elif isinstance(value, tuple | list):
            value = " ".join(map(str, value))  # a repeatable option: space-separated
        env[by_key[key].name] = str(value)
    return env


def read_environment(
    variables: Sequence[Variable], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The parsed values of those ``variables`` that are set, by key: the one reader.

    An empty variable counts as unset, as a templated ``CONVEYOR_X=`` in a container
    manifest means "no value". A value that does not parse is one line naming the variable.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for variable in variables:
        raw = env.get(variable.name)
        if raw is None or raw == "":
            continue
        values[variable.key] = parse_value(variable, raw, variable.name)
    return values


def parse_value(variable: Variable, raw: str, label: str) -> Any:
    try:
        return variable.parse(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{label} {exc}") from None


def command_values(
    command: str, given: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The values of ``command``'s own options (:data:`COMMAND_VARIABLES`).

    Each is what was ``given`` on the command line (text parsed like its variable, errors
    naming the option), else its variable, else its default.
    """
    variables = COMMAND_VARIABLES[command]
    values: dict[str, Any] = {
        variable.key: (
            variable.parse(variable.default)
            if variable.default is not None
            else (False if variable.kind == "flag" else None)
        )
        for variable in variables
    }
    values.update(read_environment(variables, environ))
    for variable in variables:
        if variable.key in given and given[variable.key] is not None:
            value = given[variable.key]
            values[variable.key] = (
                parse_value(variable, value, variable.option) if isinstance(value, str) else value
            )
    return values
