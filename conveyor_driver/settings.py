"""Where the driver connects and how it logs: read from CLI options or CONVEYOR_* variables.

The :class:`~conveyor_driver.Driver` says *what* the driver does and how hard it works
(concurrency, attempts); ``Settings`` says *where* it runs, which differs per deployment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigurationError
from .logs.loki import LokiConfig

DEFAULT_NATS_URL = "nats://localhost:4222"
DEFAULT_API_URL = "http://localhost:8080"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
MAX_STATIC_LABELS = 12
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _split_urls(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    urls = tuple(item.strip() for item in items if item.strip())
    if not urls:
        raise ConfigurationError("no NATS URL given")
    return urls


def _check_choice(allowed: tuple[str, ...]) -> Callable[[Any, attrs.Attribute[str], str], None]:
    def check(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in allowed:
            raise ConfigurationError(
                f"{attribute.name} must be one of {', '.join(allowed)}, not {value!r}"
            )

    return check


@attrs.frozen
class Settings:
    """Deployment settings; every field has a safe default for a local Conveyor."""

    nats_urls: tuple[str, ...] = attrs.field(default=(DEFAULT_NATS_URL,), converter=_split_urls)
    api_url: str = DEFAULT_API_URL
    concurrency: int | None = None
    log_level: str = attrs.field(default="info", validator=_check_choice(LOG_LEVELS))
    log_format: str = attrs.field(default="auto", validator=_check_choice(LOG_FORMATS))
    embedded: bool = False
    embedded_port: int | None = None
    embedded_dir: Path | None = None
    loki: LokiConfig | None = None
    http_port: int | None = None
    #: How long start-up waits out NATS and JetStream weather before it gives up.
    startup_timeout: float = 60.0
    #: The driver's identity on a secured Conveyor (PROTOCOL.md section 6): a PEM
    #: certificate chain (leaf first), its private key, and the operator's CA.
    tls_cert: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    tls_key: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    tls_ca: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``CONVEYOR_*`` variables, for ``driver.run()`` outside the CLI."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        if "CONVEYOR_NATS_URL" in env:
            values["nats_urls"] = env["CONVEYOR_NATS_URL"]
        if "CONVEYOR_API_URL" in env:
            values["api_url"] = env["CONVEYOR_API_URL"]
        if "CONVEYOR_CONCURRENCY" in env:
            values["concurrency"] = _int(env["CONVEYOR_CONCURRENCY"], "CONVEYOR_CONCURRENCY")
        if "CONVEYOR_LOG_LEVEL" in env:
            values["log_level"] = env["CONVEYOR_LOG_LEVEL"].lower()
        if "CONVEYOR_LOG_FORMAT" in env:
            values["log_format"] = env["CONVEYOR_LOG_FORMAT"].lower()
        if "CONVEYOR_EMBEDDED" in env:
            values["embedded"] = env["CONVEYOR_EMBEDDED"].lower() in ("1", "true", "yes", "on")
        for variable, field in (
            ("CONVEYOR_TLS_CERT", "tls_cert"),
            ("CONVEYOR_TLS_KEY", "tls_key"),
            ("CONVEYOR_TLS_CA", "tls_ca"),
        ):
            if env.get(variable):
                values[field] = env[variable]
        if env.get("CONVEYOR_HTTP_PORT"):
            values["http_port"] = _int(env["CONVEYOR_HTTP_PORT"], "CONVEYOR_HTTP_PORT")
        if env.get("CONVEYOR_LOKI_URL"):
            values["loki"] = LokiConfig(
                url=env["CONVEYOR_LOKI_URL"],
                tenant=env.get("CONVEYOR_LOKI_TENANT") or None,
                username=env.get("CONVEYOR_LOKI_USER") or None,
                password=env.get("CONVEYOR_LOKI_PASSWORD") or None,
                token=env.get("CONVEYOR_LOKI_TOKEN") or None,
                labels=parse_labels(env.get("CONVEYOR_LOKI_LABEL", "").split()),
                batch_wait=float(env.get("CONVEYOR_LOKI_BATCH_WAIT", "1.0")),
                batch_bytes=_int(env.get("CONVEYOR_LOKI_BATCH_BYTES", "1048576"), "batch bytes"),
                line_format=env.get("CONVEYOR_LOKI_FORMAT", "logfmt"),
                structured_metadata=env.get("CONVEYOR_LOKI_STRUCTURED_METADATA", "true").lower()
                not in ("0", "false", "no", "off"),
            )
        return cls(**values)  # type: ignore[arg-type]


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as Loki labels; Loki's label-name rule is checked here."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_NAME.match(key) or not value:
            raise ConfigurationError(
                f"Loki label {item!r} must be KEY=VALUE with KEY matching [a-zA-Z_][a-zA-Z0-9_]*"
            )
        labels[key] = value
    if len(labels) > MAX_STATIC_LABELS:
        raise ConfigurationError(
            f"at most {MAX_STATIC_LABELS} static Loki labels: Loki refuses streams with more "
            "than 15 labels, and the driver sets 3 of its own"
        )
    return labels


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number, not {value!r}") from None
