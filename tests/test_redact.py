"""Secrets never reach a log: the matcher, the chain, ``ctx.run``, and every sink for real.

The matcher and the processor are tested on their own first (inside longer text, at any
depth, overlapping secrets, URL passwords, refusals), then where secrets come from
(``Driver(secrets=)``, ``ctx.secret``, ``--redact-env``, the TLS key, API tokens), then
``ctx.run`` output cut into chunks, and last a driver served for real whose lines are read
back from the console, from NATS and from a Loki receiver.
"""

from __future__ import annotations

import gc
import io
import json
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from _certs import make_pki
from _helpers import NatsLogs, wait_until
from _loki_receiver import TIMEOUT, LokiReceiver
from nats.aio.client import Client

from conveyor_driver import Context, Driver, Resource, Result
from conveyor_driver.api.auth import CertificateAuth
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.errors import ConfigurationError
from conveyor_driver.logs.chain import build_logger
from conveyor_driver.logs.loki import LokiConfig
from conveyor_driver.logs.redact import MASK, Redactor, SecretTooShortError
from conveyor_driver.process import run_command
from conveyor_driver.runtime.secrets import driver_redactor, pem_lines, watch_tokens
from conveyor_driver.settings import Settings
from conveyor_driver.testing import FakeContext, dispatch
from conveyor_driver.testing.fixtures import running
from conveyor_driver.tls import load_identity

RESOURCE = {"name": "app", "resource": "pipeline"}


# -- the matcher ------------------------------------------------------------------------------


def test_a_secret_inside_a_longer_line_is_masked() -> None:
    redactor = Redactor(["hunter2-pass"])
    assert redactor.mask("login with hunter2-pass, then go") == "login with ***, then go"
    assert redactor.mask("twice:hunter2-pass,hunter2-pass.") == "twice:***,***."


def test_the_longest_secret_wins_and_overlapping_ones_are_masked_as_one() -> None:
    redactor = Redactor(["abcd", "abcdefgh", "efghijkl"])
    assert redactor.mask("x abcdefgh y") == "x *** y"  # not "***efgh"
    assert redactor.mask("x abcdefghijkl y") == "x *** y"  # no "ijkl" left over
    assert redactor.mask("abcdX") == "***X"
    assert redactor.mask("abcdabcd") == "******"  # side by side: two


def test_url_userinfo_passwords_are_masked_by_default_and_the_user_kept() -> None:
    redactor = Redactor()
    assert redactor.mask("clone https://bob:s3cr3t@git.example.com/app.git now") == (
        "clone https://bob:***@git.example.com/app.git now"
    )
    # An unencoded '@' in the password does not end it; the host is kept.
    assert redactor.mask("nats://u:p@ss@host:4222") == "nats://u:***@host:4222"
    assert redactor.mask("https://git.example.com/a@b") == "https://git.example.com/a@b"
    assert Redactor(urls=False).mask("https://bob:s3cr3t@h") == "https://bob:s3cr3t@h"


def test_secrets_with_characters_that_mean_something_to_a_regex() -> None:
    odd = r"p@$$.w*rd(+)[x]\d"
    assert Redactor([odd]).mask(f"value={odd};") == "value=***;"
    assert Redactor([odd]).mask("value=p@$$Xw*rd") == "value=p@$$Xw*rd"


def test_a_secret_of_several_lines_is_also_masked_line_by_line() -> None:
    redactor = Redactor(["first-line-1234\nsecond-line-5678\nab"])
    assert redactor.mask("second-line-5678") == "***"
    assert redactor.mask("ab") == "ab"  # shorter than 4: the whole secret still is masked


@pytest.mark.parametrize("short", ["", "Q", "x9!"])
def test_a_secret_shorter_than_four_characters_is_refused_everywhere(short: str) -> None:
    with pytest.raises(SecretTooShortError) as raised:
        Redactor([short])
    assert str(raised.value) == (  # its length, never the value
        f"a secret must be at least 4 characters (this one has {len(short)}): masking a "
        "shorter one would shred the log, every occurrence of it in every line"
    )
    with pytest.raises(ConfigurationError, match="at least 4 characters"):
        Driver("d", secrets=["good-secret", short])
    with pytest.raises(SecretTooShortError):
        FakeContext(RESOURCE).secret(short)


def test_20_secrets_are_one_compiled_pattern_rebuilt_when_the_set_changes() -> None:
    words = [secrets.token_urlsafe(12) for _ in range(20)]
    redactor = Redactor(words)
    scan = redactor._m.any
    assert scan is not None
    assert all(redactor.mask(f"<{word}>") == "<***>" for word in words)
    redactor.add("one-more-secret")
    assert redactor._m.any is not scan
    assert redactor.mask("one-more-secret") == MASK
    redactor.release(["one-more-secret"])
    assert redactor.mask("one-more-secret") == "one-more-secret"


def test_a_secret_added_twice_stays_until_released_twice() -> None:
    redactor = Redactor()
    redactor.add("shared-token")
    redactor.add("shared-token")
    redactor.release(["shared-token"])
    assert redactor.mask("shared-token") == MASK
    redactor.release(["shared-token", "never-added"])
    assert redactor.mask("shared-token") == "shared-token"


class Opaque:
    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return f"Opaque({self.text})"


def test_the_processor_masks_structured_fields_at_any_depth() -> None:
    redactor = Redactor(["tok-12345"])
    event = {
        "event": "calling tok-12345",
        "count": 3,
        "flag": True,
        "clean": "nothing here",
        "deep": {"a": [{"b": ("x tok-12345 y", 1)}], "tok-12345": "key"},
        "raw": b"tok-12345",
        "object": Opaque("tok-12345"),
        "kept": Opaque("public"),
    }
    kept = event["kept"]
    out = redactor(None, "info", event)
    assert out["event"] == "calling ***"
    assert out["count"] == 3 and out["flag"] is True and out["clean"] == "nothing here"
    assert out["deep"] == {"a": [{"b": ("x *** y", 1)}], "***": "key"}
    assert out["raw"] == "b'***'"
    assert out["object"] == "Opaque(***)"
    assert out["kept"] is kept  # a clean object reaches the renderer as it is
    assert "tok-12345" not in json.dumps(out, default=str)


def test_a_string_seen_clean_is_scanned_again_once_a_secret_is_added() -> None:
    redactor = Redactor(["first-secret"])
    bound = "resource-late-secret"
    assert redactor(None, "info", {"event": "x", "name": bound})["name"] == bound
    redactor.add("late-secret")
    assert redactor(None, "info", {"event": "x", "name": bound})["name"] == "resource-***"


def test_safe_cut_never_splits_a_secret_between_two_pieces() -> None:
    words = [secrets.token_hex(n) for n in (4, 9, 16, 30)]
    redactor = Redactor(words)
    text = "".join(f"{'.' * (i * 7 % 23)}{words[i % len(words)]}" for i in range(200))
    expected = redactor.mask(text)
    for size in (5, 17, 31, 64, 100):
        lines, carried, position = [], "", 0
        while position < len(text):
            piece = carried + text[position : position + size]
            position += size
            cut = len(piece) if position >= len(text) else redactor.safe_cut(piece)
            lines.append(piece[:cut])
            carried = piece[cut:]
        lines.append(carried)
        assert "".join(redactor.mask(line) for line in lines) == expected, size


# -- the chain: console output and FakeContext ---------------------------------------------------


def test_the_console_gets_masked_text_in_both_formats_and_in_tracebacks() -> None:
    for fmt in ("json", "console"):
        stream = io.StringIO()
        log = build_logger(fmt=fmt, stream=stream, redactor=Redactor(["pa55-word"]))
        log.info("login pa55-word", nested={"k": ["pa55-word"]})
        try:
            raise ValueError("refused pa55-word")
        except ValueError:
            log.exception("failed")
        text = stream.getvalue()
        assert "pa55-word" not in text, fmt
        assert "login ***" in text and "refused ***" in text, fmt


def test_ctx_secret_returns_the_value_and_masks_the_run_lines() -> None:
    ctx = FakeContext(RESOURCE, secrets=["given-secret"])
    token = ctx.secret("vault-token-xyz")
    assert token == "vault-token-xyz"
    ctx.log.info(f"token {token}", header={"Authorization": f"Bearer {token}"})
    ctx.log.info("given-secret")
    assert [entry["event"] for entry in ctx.logs] == ["token ***", "***"]
    assert ctx.logs[0]["header"] == {"Authorization": "Bearer ***"}


def test_a_run_secret_is_released_once_its_context_is_gone() -> None:
    redactor = Redactor()
    ctx = Context(
        driver="d",
        event="create",
        run_id="r",
        message_id="m",
        subject="s",
        attempt=1,
        resource=Resource(name="app", type="pipeline"),
        log=build_logger(stream=io.StringIO()),
        api=None,  # type: ignore[arg-type]  # not used here
        redactor=redactor,
    )
    ctx.secret("per-run-token")
    assert redactor.mask("per-run-token") == MASK
    del ctx
    gc.collect()
    assert redactor.mask("per-run-token") == "per-run-token"
    assert len(redactor) == 0


async def test_dispatch_masks_the_driver_secrets_in_its_report() -> None:
    driver = Driver("masked", secrets=["driver-wide-secret"])

    @driver.on("pipeline")
    def build(ctx: Context) -> Result:
        ctx.log.info("using driver-wide-secret")
        return Result.ok("ok")

    report = await dispatch(driver, RESOURCE)
    assert "using ***" in [entry["event"] for entry in report.logs]


# -- where the driver's own secrets come from ---------------------------------------------------


def test_redact_env_masks_the_values_of_matching_variables_and_names_short_ones() -> None:
    environ = {
        "DEPLOY_TOKEN": "env-token-5678",
        "my_api_key": "lower-case-name",
        "KEYBOARD": "us",
        "PATH": "/usr/bin:/bin",
        "EMPTY_SECRET": "",
    }
    redactor, too_short = driver_redactor(Driver("d"), Settings(), environ)
    assert redactor.mask("env-token-5678 lower-case-name /usr/bin") == "*** *** /usr/bin"
    assert too_short == ["KEYBOARD"]
    only, _ = driver_redactor(Driver("d"), Settings(redact_env=("PATH",)), environ)
    assert only.mask("env-token-5678 /usr/bin:/bin") == "env-token-5678 ***"
    none, _ = driver_redactor(Driver("d"), Settings.from_env({"CONVEYOR_REDACT_ENV": "none"}), {})
    assert not none.mask("env-token-5678").count(MASK)


def test_the_driver_own_passwords_tokens_and_tls_key_are_masked(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    settings = Settings(
        nats_urls=("nats://nats-token-abc@localhost:4222", "nats://u:nats%40pass@h:4222"),
        loki=LokiConfig(url="http://loki:3100", username="bob", password="loki-pass-1"),
        tls_cert=pki.client.cert,
        tls_key=pki.client.key,
        redact_urls=False,
    )
    redactor, _ = driver_redactor(Driver("d"), settings, {})
    key_text = pki.client.key.read_text()
    lines = pem_lines(key_text)
    assert lines and all(len(line) >= 4 for line in lines)
    masked = redactor.mask(f"{key_text} nats-token-abc nats%40pass nats@pass loki-pass-1")
    assert "-----BEGIN" in masked
    assert not any(line in masked for line in lines)
    assert masked.split("-----")[-1].split() == [MASK] * 4


def test_each_api_token_is_masked_from_the_moment_it_is_signed(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    now = [1_000_000.0]
    auth = CertificateAuth(
        load_identity(pki.client.cert, pki.client.key), ttl=60, clock=lambda: now[0]
    )
    redactor = Redactor()
    watch_tokens(auth, redactor)
    tokens = []
    for _ in range(3):
        tokens.append(auth.token())
        now[0] += 60
    assert redactor.mask(f"Authorization: Bearer {tokens[-1]}").endswith(".***")
    assert redactor.mask(tokens[1]).endswith(".***")  # the one before, maybe still in flight
    assert redactor.mask(tokens[0]) == tokens[0]  # released: the set does not grow
    assert len(redactor) == 2


# -- ctx.run ------------------------------------------------------------------------------------


def command_lines(stream: io.StringIO) -> list[str]:
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [entry["event"] for entry in entries if entry.get("stream") == "stdout"]


@pytest.mark.process
async def test_a_secret_split_across_two_output_chunks_is_masked(tmp_path: Path) -> None:
    stream = io.StringIO()
    redactor = Redactor(["split-secret-42"])
    log = build_logger(fmt="json", stream=stream, redactor=redactor)
    # Two writes, far enough apart to reach the driver as two reads of the pipe.
    script = "import sys, time\n" + "".join(
        f"sys.stdout.write({part!r}); sys.stdout.flush(); time.sleep(0.3)\n"
        for part in ("before split-se", "cret-42 after\nsecond split-secret", "-42\n")
    )
    result = await run_command(log, [sys.executable, "-c", script], redactor=redactor)
    assert result.ok
    assert command_lines(stream) == ["before *** after", "second ***"]
    assert "split-secret-42" not in stream.getvalue()
    assert result.stdout == "before *** after\nsecond ***\n"


@pytest.mark.process
@pytest.mark.parametrize("offset", [-7, -1, 0, 3])
async def test_a_secret_across_the_cut_of_a_very_long_line_is_masked(
    tmp_path: Path, offset: int
) -> None:
    secret = "long-line-secret-0123456789"
    limit = 64 * 1024
    head = "x" * (limit - len(secret) // 2 + offset)
    text = head + secret + "y" * 1000 + "é" * 40000 + secret + "\n"
    path = tmp_path / "out.txt"
    path.write_text(text, encoding="utf-8")
    stream = io.StringIO()
    redactor = Redactor([secret])
    log = build_logger(fmt="json", stream=stream, redactor=redactor)
    result = await run_command(log, ["cat", str(path)], redactor=redactor)
    assert result.ok
    lines = command_lines(stream)
    assert len(lines) > 1  # logged in pieces
    assert "".join(lines) == text[:-1].replace(secret, MASK)  # no piece cut a character
    assert "long-line" not in stream.getvalue() and "0123456789" not in stream.getvalue()


# -- every sink, through a served driver --------------------------------------------------------


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[LokiReceiver]:
    async with LokiReceiver() as server:
        yield server


SECRETS = ("driver-secret-1234", "env-token-5678", "run-secret-abcd", "hunter2x")


@pytest.mark.process
async def test_secrets_are_masked_in_the_console_nats_and_loki(
    nats_server: EmbeddedNats,
    nats_client: Client,
    receiver: LokiReceiver,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEPLOY_TOKEN", "env-token-5678")
    driver = Driver("redacting", secrets=["driver-secret-1234"])

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        token = ctx.secret("run-secret-abcd")
        ctx.log.info("cloning https://bob:hunter2x@git.example.com/app.git")
        ctx.log.info("env env-token-5678 and driver-secret-1234 inside a longer line")
        ctx.log.info("calling", request={"headers": [{"Authorization": f"Bearer {token}"}]})
        await ctx.run(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "sys.stdout.write('out: run-sec'); sys.stdout.flush(); time.sleep(0.3)\n"
                "sys.stdout.write('ret-abcd done\\n')",
            ],
            check=True,
        )
        try:
            raise RuntimeError(f"refused {token}")
        except RuntimeError:
            ctx.log.exception("call failed")
        return Result.ok("built")

    expected = [
        "cloning https://bob:***@git.example.com/app.git",
        "env *** and *** inside a longer line",
        "out: *** done",
        "refused ***",
        "Bearer ***",
    ]
    nats_logs = NatsLogs()
    await nats_client.subscribe("logs.>", cb=nats_logs.on_message)
    config = LokiConfig(url=receiver.url, batch_wait=0.02)
    async with running(driver, nats_server.url, loki=config), watch_results(nats_client) as watch:
        message = await emit_event(nats_client, Resource(name="app", type="pipeline"))
        result = await watch.wait(message.run_id, timeout=TIMEOUT)
        await receiver.wait_for(lambda r: any("run succeeded" in line for line in r.lines()))
        await wait_until(
            lambda: any("run succeeded" in m for m in nats_logs.messages(message.run_id)),
            what="the last NATS line",
        )
    assert result.driverresult.success
    console = capsys.readouterr().err
    sinks = {
        "console": console,
        "nats": "\n".join(nats_logs.messages(message.run_id)),
        "loki": "\n".join(receiver.lines()),
    }
    for name, text in sinks.items():
        for secret in SECRETS:
            assert secret not in text, (name, secret)
        for line in expected:
            assert line in text, (name, line)
    assert receiver.invalid == []
