"""Every ``CONVEYOR_*`` variable through both entry points: ``driver.run()`` and the CLI.

The two used to read the environment each in their own way and drifted: variables one of
them ignored, values one refused and the other accepted, a bare ``ValueError``. These tests
hold them to one reading: each variable, valid and invalid, gives the same ``Settings`` (or
the same one-line error naming the variable) from ``Settings.from_env``, from
``driver.run()`` and from ``conveyor-driver run``; the option gives the same value and an
error naming the option. The CLI runs in-process (click's ``CliRunner``) and stops where
the driver would start serving.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import click
import pytest
from _helpers import invoke, one_error_line
from apps.harness import app
from apps.worker_app import driver as worker

from conveyor_driver import Driver, telemetry
from conveyor_driver.cli import main
from conveyor_driver.errors import ConfigurationError
from conveyor_driver.settings import Settings

WORKER = app("worker_app.py:driver")
LOKI = {"CONVEYOR_LOKI_URL": "http://loki:3100"}


@attrs.frozen
class Case:
    """One variable: a valid text and what it becomes, texts refused, its option."""

    variable: str
    option: str
    valid: str
    expected: Any
    get: Callable[[Settings], Any]
    invalid: tuple[str, ...] = ()
    #: Other variables the case needs (a Loki URL for the Loki settings).
    needs: dict[str, str] = attrs.field(factory=dict)
    #: The valid value on the command line, when it is not ``option valid``.
    option_args: tuple[str, ...] | None = None
    #: Set by the program, not the user (the supervisor's worker index): no option.
    env_only: bool = False

    @property
    def args(self) -> tuple[str, ...]:
        return self.option_args if self.option_args is not None else (self.option, self.valid)


def _loki(field: str) -> Callable[[Settings], Any]:
    return lambda settings: getattr(settings.loki, field)


CASES = [
    Case(
        "CONVEYOR_NATS_URL",
        "--nats-url",
        "nats://a:4222, tls://b:4222",
        ("nats://a:4222", "tls://b:4222"),
        lambda s: s.nats_urls,
        invalid=("http://a:4222", "a:4222", " , "),
    ),
    Case(
        "CONVEYOR_API_URL",
        "--api-url",
        "https://conveyor:8080",
        "https://conveyor:8080",
        lambda s: s.api_url,
        invalid=("notaurl", "ftp://conveyor"),
    ),
    Case("CONVEYOR_CONCURRENCY", "--concurrency", "4", 4, lambda s: s.concurrency, ("0", "abc")),
    # One worker serves in place; more start the supervisor (tests/test_workers.py).
    Case("CONVEYOR_WORKERS", "--workers", "1", 1, lambda s: s.workers, ("0", "two")),
    Case(
        "CONVEYOR_WORKER_INDEX",
        "--worker-index",
        "3",
        3,
        lambda s: s.worker_index,
        ("-1", "first"),
        option_args=(),
        env_only=True,
    ),
    # Off serves in place; on starts the supervisor and a watcher (tests/test_reload.py).
    Case(
        "CONVEYOR_RELOAD", "--reload", "off", False, lambda s: s.reload, ("maybe",), option_args=()
    ),
    Case("CONVEYOR_LOG_LEVEL", "--log-level", "WARNING", "warning", lambda s: s.log_level, ("x",)),
    Case("CONVEYOR_LOG_FORMAT", "--log-format", "json", "json", lambda s: s.log_format, ("xml",)),
    Case("CONVEYOR_LOOP", "--loop", "ASYNCIO", "asyncio", lambda s: s.loop, ("tokio",)),
    Case(
        "CONVEYOR_EMBEDDED",
        "--embedded",
        "yes",
        True,
        lambda s: s.embedded,
        ("maybe",),
        option_args=("--embedded",),
    ),
    Case(
        "CONVEYOR_EMBEDDED_PORT",
        "--embedded-port",
        "4333",
        4333,
        lambda s: s.embedded_port,
        ("x", "0", "70000"),
    ),
    Case(
        "CONVEYOR_EMBEDDED_DIR",
        "--embedded-dir",
        "/var/lib/nats",
        Path("/var/lib/nats"),
        lambda s: s.embedded_dir,
    ),
    Case(
        "CONVEYOR_WORKSPACE_ROOT",
        "--workspace-root",
        "/var/lib/builds",
        Path("/var/lib/builds"),
        lambda s: s.workspace_root,
    ),
    Case(
        "CONVEYOR_KEEP_FAILED_WORKSPACES",
        "--keep-failed-workspaces",
        "on",
        True,
        lambda s: s.keep_failed_workspaces,
        ("maybe",),
        option_args=("--keep-failed-workspaces",),
    ),
    Case("CONVEYOR_HTTP_PORT", "--http-port", "9464", 9464, lambda s: s.http_port, ("0", "web")),
    Case(
        "CONVEYOR_HTTP_HOST", "--http-host", "127.0.0.1", "127.0.0.1", lambda s: s.http_host, (" ",)
    ),
    Case(
        "CONVEYOR_STARTUP_TIMEOUT",
        "--startup-timeout",
        "2.5",
        2.5,
        lambda s: s.startup_timeout,
        ("0", "-1", "soon"),
    ),
    Case(
        "CONVEYOR_TIMEOUT",
        "--timeout",
        "600",
        600.0,
        lambda s: s.timeout,
        ("0", "-5", "forever"),
    ),
    Case(
        "CONVEYOR_LEDGER",
        "--ledger",
        "off",
        False,
        lambda s: s.ledger,
        ("maybe",),
        option_args=("--no-ledger",),
    ),
    Case(
        "CONVEYOR_LEDGER_TTL",
        "--ledger-ttl",
        "3600",
        3600.0,
        lambda s: s.ledger_ttl,
        ("0", "week"),
    ),
    Case(
        "CONVEYOR_BLOCK_THRESHOLD",
        "--block-threshold",
        "0.5",
        0.5,
        lambda s: s.block_threshold,
        ("0", "-2", "long"),
    ),
    Case("CONVEYOR_MAX_RUNS", "--max-runs", "1", 1, lambda s: s.max_runs, ("0", "-1", "x")),
    Case(
        "CONVEYOR_EXIT_WHEN_IDLE",
        "--exit-when-idle",
        "30",
        30.0,
        lambda s: s.exit_when_idle,
        ("0", "-1", "soon"),
    ),
    Case(
        "CONVEYOR_APPLY_DEFINITIONS",
        "--apply-definitions",
        "on",
        True,
        lambda s: s.apply_definitions,
        ("sometimes",),
        option_args=("--apply-definitions",),
    ),
    Case(
        "CONVEYOR_LAG_INTERVAL",
        "--lag-interval",
        "0.5",
        0.5,
        lambda s: s.lag_interval,
        ("0", "-1", "often"),
    ),
    Case(
        "CONVEYOR_LOKI_URL",
        "--loki-url",
        "http://loki:3100",
        "http://loki:3100",
        _loki("url"),
        ("loki:3100",),
    ),
    Case("CONVEYOR_LOKI_TENANT", "--loki-tenant", "team-a", "team-a", _loki("tenant"), needs=LOKI),
    Case("CONVEYOR_LOKI_USER", "--loki-user", "bob", "bob", _loki("username"), needs=LOKI),
    Case("CONVEYOR_LOKI_PASSWORD", "--loki-password", "pw", "pw", _loki("password"), needs=LOKI),
    Case("CONVEYOR_LOKI_TOKEN", "--loki-token", "tok", "tok", _loki("token"), needs=LOKI),
    Case(
        "CONVEYOR_LOKI_LABEL",
        "--loki-label",
        "env=prod team=a",
        {"env": "prod", "team": "a"},
        _loki("labels"),
        ("env", "1x=y"),
        needs=LOKI,
        option_args=("--loki-label", "env=prod", "--loki-label", "team=a"),
    ),
    Case(
        "CONVEYOR_LOKI_BATCH_WAIT",
        "--loki-batch-wait",
        "0.5",
        0.5,
        _loki("batch_wait"),
        ("abc", "0"),
        needs=LOKI,
    ),
    Case(
        "CONVEYOR_LOKI_BATCH_BYTES",
        "--loki-batch-bytes",
        "2048",
        2048,
        _loki("batch_bytes"),
        ("100", "lots"),
        needs=LOKI,
    ),
    Case(
        "CONVEYOR_LOKI_FORMAT",
        "--loki-format",
        "json",
        "json",
        _loki("line_format"),
        ("xml",),
        LOKI,
    ),
    Case(
        "CONVEYOR_LOKI_MAX_LINE_SIZE",
        "--loki-max-line-size",
        "100000",
        100_000,
        _loki("max_line_size"),
        ("-1", "big"),
        needs=LOKI,
    ),
    Case(
        "CONVEYOR_LOKI_STRUCTURED_METADATA",
        "--loki-structured-metadata",
        "off",
        False,
        _loki("structured_metadata"),
        ("perhaps",),
        needs=LOKI,
        option_args=("--no-loki-structured-metadata",),
    ),
    Case("CONVEYOR_TLS_CERT", "--tls-cert", "/etc/d.crt", Path("/etc/d.crt"), lambda s: s.tls_cert),
    Case("CONVEYOR_TLS_KEY", "--tls-key", "/etc/d.key", Path("/etc/d.key"), lambda s: s.tls_key),
    Case("CONVEYOR_TLS_CA", "--tls-ca", "/etc/ca.pem", Path("/etc/ca.pem"), lambda s: s.tls_ca),
    Case(
        "CONVEYOR_REDACT_ENV",
        "--redact-env",
        "*TOKEN*, DEPLOY_* ,",
        ("*TOKEN*", "DEPLOY_*"),
        lambda s: s.redact_env,
    ),
    Case(
        "CONVEYOR_REDACT_URLS",
        "--redact-urls",
        "off",
        False,
        lambda s: s.redact_urls,
        ("perhaps",),
        option_args=("--no-redact-urls",),
    ),
]
INVALID = [(case, text) for case in CASES for text in case.invalid]
#: Pairs refused together: the error names both, wherever each came from.
CONFLICTS = [
    ({"CONVEYOR_LOKI_USER": "bob", "CONVEYOR_LOKI_TOKEN": "tok", **LOKI}, ()),
    ({"CONVEYOR_LOKI_TOKEN": "tok", **LOKI}, ("--loki-user", "bob")),
]


def _id(case: Case) -> str:
    return case.variable.removeprefix("CONVEYOR_")


# --- the two entry points, stopped where the driver would start serving ----------------------


@attrs.define
class Served:
    settings: list[Settings] = attrs.field(factory=list)
    telemetry: list[tuple[str, bool]] = attrs.field(factory=list)

    @property
    def one(self) -> Settings:
        assert len(self.settings) == 1, self.settings
        return self.settings[0]


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """Driver.serve records its settings instead of serving; telemetry set-up is recorded."""
    seen = Served()

    async def serve(_driver: Driver, settings: Settings | None = None) -> None:
        assert settings is not None
        seen.settings.append(settings)

    def configure(
        service_name: str, *, prometheus: bool = False, environ: object = None
    ) -> Callable[[], None] | None:
        seen.telemetry.append((service_name, prometheus))
        return None

    monkeypatch.setattr(Driver, "serve", serve)
    monkeypatch.setattr(telemetry, "configure_from_env", configure)
    # Before settings had one reader, the CLI held its own reference to this function.
    monkeypatch.setattr("conveyor_driver.cli.configure_from_env", configure, raising=False)
    for name in list(os.environ):
        if name.startswith("CONVEYOR_"):
            monkeypatch.delenv(name)
    yield seen


def run_driver(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    worker.run()


# --- valid values: the same Settings from every entry point ----------------------------------


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_every_variable_reads_the_same_everywhere(
    case: Case, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**case.needs, case.variable: case.valid}
    assert case.get(Settings.from_env(env)) == case.expected

    run_driver(monkeypatch, env)
    assert case.get(served.one) == case.expected
    from_python = served.settings.pop()

    result = invoke("run", WORKER, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    assert served.one == from_python

    if case.env_only:
        return
    served.settings.clear()
    result = invoke("run", WORKER, *case.args, env=case.needs)
    assert result.exit_code == 0, (result.output, result.exception)
    assert case.get(served.one) == case.expected


@pytest.mark.parametrize(("case", "text"), INVALID, ids=[f"{_id(c)}={t!r}" for c, t in INVALID])
def test_every_invalid_value_is_one_line_naming_its_variable_or_option(
    case: Case, text: str, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**case.needs, case.variable: text}
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env(env)
    message = str(raised.value)
    assert message.startswith(f"{case.variable} "), message
    assert "\n" not in message

    with pytest.raises(ConfigurationError) as raised:
        run_driver(monkeypatch, env)
    assert str(raised.value) == message

    assert one_error_line(invoke("run", WORKER, env=env)) == message

    for name in env:
        monkeypatch.delenv(name)
    args = (case.option, text) if case.option_args is None else ()
    if args:
        by_option = one_error_line(invoke("run", WORKER, *args, env=case.needs))
        assert by_option == message.replace(case.variable, case.option, 1)
    assert served.settings == []


@pytest.mark.parametrize(("env", "args"), CONFLICTS, ids=["both-variables", "option-and-variable"])
def test_loki_user_and_token_are_refused_together_everywhere(
    env: dict[str, str], args: tuple[str, ...], served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = args[0] if args else "CONVEYOR_LOKI_USER"
    line = one_error_line(invoke("run", WORKER, *args, env=env))
    assert line.startswith(f"{user} and CONVEYOR_LOKI_TOKEN are both set: "), line
    if not args:
        with pytest.raises(ConfigurationError, match=r"^CONVEYOR_LOKI_USER and CONVEYOR_LOKI"):
            run_driver(monkeypatch, env)
    assert served.settings == []


def test_an_option_wins_over_its_variable(served: Served) -> None:
    result = invoke("run", WORKER, "--http-port", "9000", env={"CONVEYOR_HTTP_PORT": "9464"})
    assert result.exit_code == 0, result.output
    assert served.one.http_port == 9000


def test_an_empty_variable_counts_as_unset(served: Served) -> None:
    env = {"CONVEYOR_HTTP_PORT": "", "CONVEYOR_LOKI_URL": "", "CONVEYOR_CONCURRENCY": ""}
    assert Settings.from_env(env) == Settings()
    assert invoke("run", WORKER, env=env).exit_code == 0
    assert served.one == Settings()


def test_new_settings_have_their_defaults() -> None:
    settings = Settings.from_env({})
    assert (settings.http_host, settings.startup_timeout) == ("0.0.0.0", 60.0)


# --- the app argument and the OpenTelemetry SDK: one path for both entry points --------------


def test_the_app_comes_from_conveyor_app(served: Served) -> None:
    result = invoke("run", env={"CONVEYOR_APP": WORKER, "CONVEYOR_HTTP_PORT": "9464"})
    assert result.exit_code == 0, (result.output, result.exception)
    assert served.one.http_port == 9464
    missing = invoke("run")
    assert missing.exit_code == 2
    assert "CONVEYOR_APP" in missing.stderr


def test_driver_run_installs_the_telemetry_sdk_as_the_cli_does(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_driver(monkeypatch, {"CONVEYOR_HTTP_PORT": "9464"})
    assert invoke("run", WORKER, "--http-port", "9464").exit_code == 0
    assert served.telemetry == [("worker", True), ("worker", True)]
    served.telemetry.clear()
    run_driver(monkeypatch, {"CONVEYOR_HTTP_PORT": ""})
    assert served.telemetry == [("worker", False)]


# --- the own options of emit and logs ---------------------------------------------------------


@attrs.frozen
class OwnCase:
    command: str
    variable: str
    option: str
    valid: str
    expected: Any
    invalid: str | None = None
    flag: bool = False


OWN = [
    OwnCase("emit", "CONVEYOR_EMIT_SPEC", "--spec", '{"a": 1}', {"a": 1}),
    OwnCase("emit", "CONVEYOR_EMIT_EVENT", "--event", "process", "process", invalid=" "),
    OwnCase("emit", "CONVEYOR_EMIT_DRIVER", "--driver", "builder", "builder", invalid="a.b"),
    OwnCase("emit", "CONVEYOR_EMIT_PIPELINE", "--pipeline", "ci", "ci", invalid="a/b"),
    OwnCase("emit", "CONVEYOR_EMIT_WAIT", "--wait", "true", True, invalid="perhaps", flag=True),
    OwnCase("emit", "CONVEYOR_EMIT_TIMEOUT", "--timeout", "5", 5.0, invalid="0"),
    OwnCase("logs", "CONVEYOR_LOGS_DRIVER", "--driver", "builder", "builder"),
    OwnCase("manifest", "CONVEYOR_MANIFEST_IMAGE", "--image", "reg/x:1", "reg/x:1"),
    OwnCase(
        "manifest", "CONVEYOR_MANIFEST_SCALED_JOB", "--scaled-job", "on", True, "perhaps", True
    ),
    OwnCase(
        "manifest", "CONVEYOR_MANIFEST_PROMETHEUS_URL", "--prometheus-url", "http://p", "http://p"
    ),
]


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """emit and logs record what they would send instead of connecting; manifest, its options."""
    seen: dict[str, Any] = {}

    async def emit(urls: tuple[str, ...], resource: Any, own: dict[str, Any], tls: object) -> None:
        seen.update(own, spec=resource.spec, pipeline=resource.pipeline or None)

    async def logs(settings: Settings, tls: object, run_id: str, driver: str | None) -> None:
        seen.update(driver=driver, api_url=settings.api_url)

    def manifest(driver: Driver, options: Any) -> str:
        seen.update(image=options.image, prometheus_url=options.prometheus_url)
        seen["scaled_job"] = options.shape == "scaled-job"
        return ""

    monkeypatch.setattr("conveyor_driver.cli._emit", emit)
    monkeypatch.setattr("conveyor_driver.cli._logs", logs)
    monkeypatch.setattr("conveyor_driver.manifest.render", manifest)
    return seen


def _command(case: OwnCase) -> list[str]:
    arguments = {"emit": ["job", "app-1"], "logs": ["run-1"], "manifest": [WORKER]}
    return [case.command, *arguments[case.command]]


def _key(case: OwnCase) -> str:
    return case.option.removeprefix("--").replace("-", "_")


@pytest.mark.parametrize("case", OWN, ids=lambda c: f"{c.command}-{_id(c)}")
def test_every_own_option_has_its_variable(case: OwnCase, captured: dict[str, Any]) -> None:
    result = invoke(*_command(case), env={case.variable: case.valid})
    assert result.exit_code == 0, (result.output, result.exception)
    assert captured[_key(case)] == case.expected
    captured.clear()
    args = [case.option] if case.flag else [case.option, case.valid]
    result = invoke(*_command(case), *args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert captured[_key(case)] == case.expected
    if case.invalid is not None:
        captured.clear()
        one_error_line(invoke(*_command(case), env={case.variable: case.invalid}))
        assert captured == {}


# --- --help names every variable -------------------------------------------------------------


@pytest.mark.parametrize("name", ["run", "emit", "status", "logs", "manifest"])
def test_help_names_the_variable_of_every_option(name: str) -> None:
    from conveyor_driver.settings import COMMAND_VARIABLES, VARIABLES

    command = main.commands[name]
    result = invoke(name, "--help")
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())
    known = {v.name for v in VARIABLES} | {
        v.name for variables in COMMAND_VARIABLES.values() for v in variables
    }
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            variables = [v for v in known if f"[env: {v}]" in " ".join((param.help or "").split())]
            assert len(variables) == 1, (param.name, param.help)
            assert f"[env: {variables[0]}]" in help_text


def test_the_tests_cover_every_variable_of_the_table() -> None:
    from conveyor_driver.settings import COMMAND_VARIABLES, VARIABLES

    assert {case.variable for case in CASES} == {v.name for v in VARIABLES}
    own = {(command, v.name) for command, vs in COMMAND_VARIABLES.items() for v in vs}
    assert {(c.command, c.variable) for c in OWN} | {("app", "CONVEYOR_APP")} == own
