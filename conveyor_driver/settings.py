"""Where the driver connects and how it logs: one table of ``CONVEYOR_*`` variables, one reader.

The :class:`~conveyor_driver.Driver` says *what* the driver does and how hard it works
(concurrency, attempts); ``Settings`` says *where* it runs, which differs per deployment.

Why one table: ``driver.run()`` and ``conveyor-driver run`` must start the same driver from
the same environment, and two readers drift apart (a variable one of them ignores, a value
one refuses and the other takes). So :data:`~.variables.VARIABLES` names every variable
once, with its field, its parser and its command-line option; :meth:`Settings.from_env` is
the only reader, the CLI passes it the options given on its command line as overrides, and
the validators on the settings classes are the only rules. An invalid value is one
:class:`ConfigurationError` line naming the variable or the option it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from . import validation
from .errors import InvalidSettingError
from .logs.loki import LokiConfig, parse_labels
from .loops import LOOPS
from .variables import (
    COMMAND_VARIABLES,
    DEFAULT_API_URL,
    DEFAULT_NATS_URL,
    DEFAULT_REDACT_ENV,
    LOG_FORMATS,
    LOG_LEVELS,
    NATS_RULE,
    NATS_SCHEMES,
    VARIABLES,
    Variable,
    as_environment,
    command_values,
    decimal,
    parse_value,
    path,
    patterns,
    read_environment,
    split_urls,
    whole,
)

__all__ = [
    "COMMAND_VARIABLES",
    "DEFAULT_API_URL",
    "DEFAULT_NATS_URL",
    "VARIABLES",
    "Settings",
    "Variable",
    "as_environment",
    "command_values",
    "decimal",
    "parse_labels",
    "path",
    "read_environment",
    "split_urls",
    "whole",
]

_BY_KEY = {variable.key: variable for variable in VARIABLES}


@attrs.frozen
class Settings:
    """Deployment settings; every field has a safe default for a local Conveyor.

    Build them with :meth:`from_env` (what ``driver.run()`` and the CLI do) or directly;
    the validators below hold either way.
    """

    nats_urls: tuple[str, ...] = attrs.field(
        default=(DEFAULT_NATS_URL,),
        converter=split_urls,
        validator=validation.url(NATS_SCHEMES, NATS_RULE),
    )
    api_url: str = attrs.field(
        default=DEFAULT_API_URL,
        validator=validation.url(
            ("http", "https"), "the Conveyor API URL starts with http:// or https://"
        ),
    )
    concurrency: int | None = attrs.field(default=None, validator=validation.number(int, minimum=1))
    #: Processes ``conveyor-driver run`` starts (runtime/supervisor.py); one serves in place.
    workers: int = attrs.field(default=1, validator=validation.number(int, minimum=1))
    #: Which worker this process is, when a supervisor started it (None: no supervisor).
    worker_index: int | None = attrs.field(
        default=None, validator=validation.number(int, minimum=0)
    )
    #: The dev loop (conveyor_driver/reload.py): one worker, restarted when the code changes.
    reload: bool = False
    log_level: str = attrs.field(default="info", validator=validation.one_of(LOG_LEVELS))
    log_format: str = attrs.field(default="auto", validator=validation.one_of(LOG_FORMATS))
    #: ``auto`` runs uvloop when it is installed (:mod:`conveyor_driver.loops`).
    loop: str = attrs.field(default="auto", validator=validation.one_of(LOOPS))
    embedded: bool = False
    embedded_port: int | None = attrs.field(default=None, validator=validation.port())
    embedded_dir: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    loki: LokiConfig | None = None
    http_port: int | None = attrs.field(default=None, validator=validation.port())
    #: Where the probes listen: every interface by default, as a container needs.
    http_host: str = attrs.field(default="0.0.0.0", validator=validation.non_empty)
    #: How long start-up waits for NATS and JetStream (an election, a restart) before it
    #: gives up with one line; a configuration error ends it at once.
    startup_timeout: float = attrs.field(default=60.0, validator=validation.number(float, above=0))
    #: The default deadline of one attempt, in place of the Driver's (a handler's own wins).
    timeout: float | None = attrs.field(default=None, validator=validation.number(float, above=0))
    #: The run ledger (docs/protocol.md#the-run-ledger); off only with --no-ledger.
    ledger: bool = True
    ledger_ttl: float = attrs.field(
        default=7 * 24 * 3600.0, validator=validation.number(float, above=0)
    )
    #: A loop that does not turn for this long is reported with the stack holding it.
    block_threshold: float = attrs.field(default=1.0, validator=validation.number(float, above=0))
    #: How often the consumer's backlog is read for /metrics (and ``conveyor-driver lag``).
    lag_interval: float = attrs.field(default=5.0, validator=validation.number(float, above=0))
    #: One-shot and draining modes (docs/protocol.md#one-shot-and-draining-modes): stop after
    #: this many runs, or after this many idle seconds.
    max_runs: int | None = attrs.field(default=None, validator=validation.number(int, minimum=1))
    exit_when_idle: float | None = attrs.field(
        default=None, validator=validation.number(float, above=0)
    )
    #: Where ``ctx.workspace`` directories go (None: the system's temporary directory), and
    #: whether a failed run's is kept (conveyor_driver/workspace.py).
    workspace_root: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path)
    )
    keep_failed_workspaces: bool = False
    #: Apply the typed specs' ResourceDefinitions at start, as ``Driver(apply_definitions=True)``.
    apply_definitions: bool = False
    #: The driver's identity on a secured Conveyor (``docs/protocol.md#authentication``): a PEM
    #: certificate chain (leaf first), its private key, and the operator's CA.
    tls_cert: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    tls_key: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    tls_ca: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    #: Secrets in logs (``conveyor_driver.logs.redact``): the environment variables whose
    #: values are masked, by name pattern, and whether URL passwords are.
    redact_env: tuple[str, ...] = attrs.field(default=DEFAULT_REDACT_ENV, converter=patterns)
    redact_urls: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
        """Settings from ``CONVEYOR_*`` variables, with ``overrides`` taking precedence.

        ``overrides`` are keyed as :data:`VARIABLES` (``loki_url``, ``loki_batch_wait``...);
        a text value is parsed like its variable (so the CLI can hand over its options as
        typed), other values are taken as they are, and None is skipped. Errors name the
        variable, or the option for an override.
        """
        values = read_environment(VARIABLES, environ)
        label = {key: _BY_KEY[key].name for key in values}
        for key, value in overrides.items():
            if key not in _BY_KEY:
                raise TypeError(f"Settings.from_env() got an unknown setting {key!r}")
            if value is None:
                continue
            variable = _BY_KEY[key]
            parsed = (
                parse_value(variable, value, variable.option) if isinstance(value, str) else value
            )
            values[key] = parsed
            label[key] = variable.option
        loki = {key[5:]: values.pop(key) for key in list(values) if key.startswith("loki_")}
        try:
            config = LokiConfig(**loki) if "url" in loki else None
        except InvalidSettingError as exc:
            raise exc.naming({key[5:]: name for key, name in label.items()}) from None
        try:
            return cls(**values, loki=config)
        except InvalidSettingError as exc:
            raise exc.naming(label) from None
