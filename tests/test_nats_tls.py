"""Mutual TLS to a real nats-server that verifies client certificates (``verify: true``).

The driver must verify the server against the configured CA, present its own certificate,
and refuse a server that does not speak TLS; each failure is one clear line, at once,
instead of a hang or a silent plaintext connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import nats
import pytest
from _certs import TLSNats, make_ca, make_leaf, make_pki, tls_nats_server, write_pem
from _conveyor_api_server import ConveyorAPIServer
from _helpers import TIMEOUT, run_in_process, wait_until
from apps.harness import app
from nats.aio.client import Client
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from conveyor_driver import Context, Driver, Result, Settings, protocol
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.emit import emit_event, watch_results
from conveyor_driver.errors import NatsUnavailableError
from conveyor_driver.models import Resource

pytestmark = pytest.mark.nats  # every test here runs a TLS nats-server


@pytest.fixture(params=[("p256", False), ("rsa", True)], ids=["ec-p256", "rsa-intermediate"])
def secure_nats(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TLSNats]:
    kind, intermediate = request.param
    pki = make_pki(tmp_path / "pki", kind=kind, intermediate=intermediate)
    with tls_nats_server(tmp_path, pki) as server:
        yield server


@pytest.fixture
def ec_nats(tmp_path: Path) -> Iterator[TLSNats]:
    with tls_nats_server(tmp_path, make_pki(tmp_path / "pki")) as server:
        yield server


@contextlib.asynccontextmanager
async def observer(server: TLSNats, *, streams: bool = True) -> AsyncIterator[Client]:
    """The test's own TLS connection, with the Conveyor streams created."""
    nc = await nats.connect(server.url, tls=server.context())
    try:
        if streams:
            for config in protocol.server_streams():
                await nc.jetstream().add_stream(config)
        yield nc
    finally:
        await nc.close()


def secure_driver() -> Driver:
    driver = Driver("secure")

    @driver.on("pipeline")
    async def build(ctx: Context) -> Result:
        base = await ctx.api.get_resource("image", "base")
        return Result.ok("built", data={"base": base.spec})

    return driver


async def test_the_driver_consumes_with_its_identity(
    secure_nats: TLSNats, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = secure_driver()
    async with (
        ConveyorAPIServer(roots=[secure_nats.pki.ca.cert]) as api,
        observer(secure_nats) as nc,
    ):
        api.define("image")
        api.resources[("image", "base")] = [
            {"name": "base", "resource": "image", "id": "1", "metadata": {}, "spec": "debian"}
        ]
        task = asyncio.create_task(driver.serve(secure_nats.settings(api_url=api.url)))
        try:
            js = nc.jetstream()

            async def consumer_exists() -> bool:
                if task.done():
                    task.result()
                try:
                    await js.consumer_info(protocol.MESSAGES_STREAM, driver.name)
                except NotFoundError:
                    return False
                return True

            await wait_until(consumer_exists, what="the driver's consumer")
            async with watch_results(nc) as watch:
                message = await emit_event(nc, Resource(name="app", type="pipeline"))
                result = await watch.wait(message.run_id, TIMEOUT)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert result.driverresult.success, result.driverresult.message
    assert result.driverresult.data == {"base": "debian"}
    assert api.auth_failures == []
    assert len(api.tokens) == 1
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert '"event":"driver started"' in output
    assert "eof_received" not in output
    key_lines = [
        line for line in secure_nats.pki.client.key.read_text().splitlines() if "-----" not in line
    ]
    for secret in [api.tokens[0], *key_lines]:
        assert secret not in output


async def serve_error(settings: Settings) -> str:
    """What ``serve`` raised: it must be NatsUnavailableError, and quickly."""
    with pytest.raises(NatsUnavailableError) as caught:
        await asyncio.wait_for(secure_driver().serve(settings), TIMEOUT)
    return str(caught.value)


async def test_a_server_not_signed_by_the_configured_ca_is_refused(
    ec_nats: TLSNats, tmp_path: Path
) -> None:
    other_ca = write_pem(tmp_path / "other-ca.pem", make_ca("Other CA").cert)
    message = await serve_error(ec_nats.settings(tls_ca=other_ca))
    assert message == (
        f"cannot verify the TLS certificate of NATS at {ec_nats.url} against the configured "
        "CA: unable to get local issuer certificate"
    )


async def test_no_client_certificate_is_refused_by_the_server(ec_nats: TLSNats) -> None:
    message = await serve_error(ec_nats.settings(tls_cert=None, tls_key=None))
    assert message == (
        f"NATS at {ec_nats.url} requires a client certificate: give --tls-cert and --tls-key"
    )


async def test_a_certificate_of_another_ca_is_refused_by_the_server(
    ec_nats: TLSNats, tmp_path: Path
) -> None:
    stranger = make_leaf(make_ca("Other CA")).write(tmp_path, "stranger")
    message = await serve_error(ec_nats.settings(tls_cert=stranger.cert, tls_key=stranger.key))
    assert message.startswith(f"NATS at {ec_nats.url} rejected the client certificate (tlsv1")
    assert message.endswith("alert unknown ca)")


async def test_no_tls_options_against_a_tls_server_says_what_to_give(ec_nats: TLSNats) -> None:
    message = await serve_error(ec_nats.settings(tls_cert=None, tls_key=None, tls_ca=None))
    assert message == (
        f"NATS at {ec_nats.url} requires TLS and its certificate is not trusted (unable to get "
        "local issuer certificate): give the operator's CA with --tls-ca (and "
        "--tls-cert/--tls-key if it verifies clients)"
    )


async def test_a_plaintext_server_is_refused_when_tls_is_configured(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = Settings(
        tls_cert=pki.client.cert, tls_key=pki.client.key, tls_ca=pki.ca_file, log_format="json"
    )
    async with EmbeddedNats() as plain:
        message = await serve_error(attrs.evolve(settings, nats_urls=plain.url))
        nc = await nats.connect(plain.url)
        try:
            with pytest.raises(NotFoundError):  # the driver did nothing on that server
                await nc.jetstream().consumer_info(protocol.MESSAGES_STREAM, "secure")
        finally:
            await nc.close()
    assert message == (
        f"NATS at {plain.url} does not use TLS, but a TLS identity or CA is configured: "
        "refusing to connect in plaintext"
    )


async def test_a_server_where_tls_is_optional_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with tls_nats_server(tmp_path, pki, extra="allow_non_tls: true") as server:
        message = await serve_error(server.settings())
    assert message == (
        f"NATS at {server.url} accepts plaintext beside TLS (allow_non_tls), and this client "
        "cannot insist on TLS there: configure the server to require TLS"
    )


async def test_cli_emit_and_status_speak_tls(ec_nats: TLSNats) -> None:
    tls_args = [
        "--nats-url",
        ec_nats.url,
        "--tls-cert",
        str(ec_nats.pki.client.cert),
        "--tls-key",
        str(ec_nats.pki.client.key),
        "--tls-ca",
        str(ec_nats.pki.ca_file),
    ]
    async with observer(ec_nats) as nc:
        js = nc.jetstream()
        # The messages stream keeps only what some consumer is interested in.
        await js.add_consumer(
            protocol.MESSAGES_STREAM,
            ConsumerConfig(durable_name="probe", filter_subject="resources.pipeline"),
        )
        emitted = await run_in_process("emit", "pipeline", "app", "--spec", '{"n": 1}', *tls_args)
        assert emitted.returncode == 0, emitted.stderr
        assert emitted.stderr.startswith("emitted create pipeline/app run_id=")
        sub = await js.pull_subscribe_bind("probe", protocol.MESSAGES_STREAM)
        [msg] = await sub.fetch(1, timeout=TIMEOUT)
        assert msg.subject == "resources.pipeline"

        status = await run_in_process("status", app("worker_app.py:driver"), *tls_args)
        refused = await run_in_process("emit", "pipeline", "app", "--nats-url", ec_nats.url)
    # Connected over TLS: what is missing is the worker's consumer, not a secure connection.
    assert status.returncode == 1
    assert status.stderr_lines[0].startswith("Error: consumer 'worker' not found")
    assert refused.returncode == 1
    assert refused.stderr_lines == [
        f"Error: NATS at {ec_nats.url} requires TLS and its certificate is not trusted "
        "(unable to get local issuer certificate): give the operator's CA with --tls-ca "
        "(and --tls-cert/--tls-key if it verifies clients)"
    ]
