"""Certificate-bound JWTs (docs/protocol.md#authentication), checked by a server that verifies
them the way the Go Conveyor server does: the chain against the CA, the thumbprint against the
leaf, the signature with the leaf's key, and the token's times.

Every certificate is made in the test (tests/_certs.py): RSA and EC identities in each PEM
encoding, an intermediate CA, a wrong key, an expired certificate.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from _certs import CLIENT_AUTH, SERVER_AUTH, Issued, make_ca, make_leaf, new_key, write_pem
from _conveyor_api_server import ConveyorAPIServer
from _helpers import run_in_process
from apps.harness import app
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from conveyor_driver import Driver, Settings
from conveyor_driver.api import APIUnavailable, CertificateAuth, ConveyorAPIError, ConveyorClient
from conveyor_driver.embedded import free_port
from conveyor_driver.errors import ConfigurationError
from conveyor_driver.models import Resource
from conveyor_driver.testing.fake import LogRecorder
from conveyor_driver.tls import Identity, load_identity, load_tls

PEM_HEADERS = {
    ("rsa", "traditional"): b"-----BEGIN RSA PRIVATE KEY-----",  # PKCS#1
    ("rsa", "pkcs8"): b"-----BEGIN PRIVATE KEY-----",
    ("p256", "traditional"): b"-----BEGIN EC PRIVATE KEY-----",  # SEC1
    ("p256", "pkcs8"): b"-----BEGIN PRIVATE KEY-----",
    ("p384", "traditional"): b"-----BEGIN EC PRIVATE KEY-----",
    ("p384", "pkcs8"): b"-----BEGIN PRIVATE KEY-----",
    ("p521", "traditional"): b"-----BEGIN EC PRIVATE KEY-----",
    ("p521", "pkcs8"): b"-----BEGIN PRIVATE KEY-----",
}
ALGORITHM = {"rsa": "RS256", "p256": "ES256", "p384": "ES384", "p521": "ES512"}


def decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, claims, _signature = token.split(".")
    return (
        json.loads(base64.urlsafe_b64decode(_pad(header))),
        json.loads(base64.urlsafe_b64decode(_pad(claims))),
    )


def _pad(segment: str) -> str:
    """Base64url without its padding (as JWTs carry it) made decodable again."""
    return segment + "=" * (-len(segment) % 4)


def der_b64(issued: Issued) -> list[str]:
    return [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in issued.chain]


def thumbprint(issued: Issued) -> str:
    digest = hashlib.sha256(issued.cert.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def call_with(server: ConveyorAPIServer, identity: Identity, **options: Any) -> Any:
    """One authenticated GET; its answer, or the error it raised."""
    client = ConveyorClient(server.url, auth=CertificateAuth(identity, **options), backoff=0.01)
    try:
        return await client.get_resource_definition("pipeline")
    except ConveyorAPIError as exc:
        return exc
    finally:
        await client.close()


@pytest.fixture
def root() -> Issued:
    return make_ca()


# -- identities the server accepts --------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["traditional", "pkcs8"])
@pytest.mark.parametrize("kind", ["rsa", "p256", "p384", "p521"])
async def test_every_key_kind_and_encoding_signs_tokens_the_server_accepts(
    tmp_path: Path, root: Issued, kind: str, encoding: str
) -> None:
    leaf = make_leaf(root, kind=kind)
    files = leaf.write(tmp_path, "driver", key_encoding=encoding)
    assert files.key.read_bytes().startswith(PEM_HEADERS[(kind, encoding)])
    tls = load_tls(files.cert, files.key, write_pem(tmp_path / "ca.pem", root.cert))
    assert tls is not None and tls.identity is not None

    async with ConveyorAPIServer(roots=[root.cert]) as server:
        server.define("pipeline")
        client = ConveyorClient(server.url, auth=CertificateAuth(tls.identity))
        before = time.time()
        try:
            await client.create_resource(Resource(name="app", type="pipeline"))
            assert (await client.get_resource("pipeline", "app")).name == "app"
            assert (await client.health())["status"] == "healthy"
        finally:
            await client.close()
    assert server.auth_failures == []
    assert len(server.tokens) == 2
    header, claims = decode(server.tokens[0])
    assert header == {"alg": ALGORITHM[kind], "typ": "JWT", "x5c": der_b64(leaf)}
    assert claims["cnf"] == {"x5t#S256": thumbprint(leaf)}
    assert claims["exp"] - claims["iat"] == 120 + 30  # the TTL, and iat set back for skew
    assert math.floor(before) + 120 <= claims["exp"] <= math.floor(time.time()) + 120
    assert server.tokens[1] == server.tokens[0]  # reused, not signed per request


async def test_the_chain_through_an_intermediate_travels_in_x5c(
    tmp_path: Path, root: Issued
) -> None:
    intermediate = make_ca("Issuing CA", issuer=root)
    leaf = make_leaf(intermediate, kind="p384")
    files = leaf.write(tmp_path, "driver")
    identity = load_identity(files.cert, files.key)
    assert len(identity.chain) == 2

    async with ConveyorAPIServer(roots=[root.cert]) as server:
        server.define("pipeline")
        answer = await call_with(server, identity)
        assert answer.name == "pipeline"
        header, _claims = decode(server.tokens[0])
        assert header["x5c"] == der_b64(leaf)  # leaf first, then the intermediate

        # Without the intermediate the server cannot reach its CA.
        files.cert.write_bytes(leaf.cert_pem(with_chain=False))
        refused = await call_with(server, load_identity(files.cert, files.key))
    assert isinstance(refused, ConveyorAPIError)
    assert (refused.status, refused.error) == (401, "invalid token")
    assert server.auth_failures[-1].endswith("x509: certificate signed by unknown authority")


async def test_the_server_refuses_a_certificate_of_another_ca(tmp_path: Path, root: Issued) -> None:
    stranger = make_leaf(make_ca("Another CA"))
    files = stranger.write(tmp_path, "stranger")
    async with ConveyorAPIServer(roots=[root.cert]) as server:
        refused = await call_with(server, load_identity(files.cert, files.key))
    assert isinstance(refused, ConveyorAPIError) and refused.status == 401
    assert "signed by unknown authority" in server.auth_failures[0]


async def test_the_server_checks_the_signature_with_the_leaf_key(root: Issued) -> None:
    leaf = make_leaf(root)
    forged = Identity(
        chain=leaf.chain, key=new_key("p256"), cert_file=Path("c"), key_file=Path("k")
    )
    async with ConveyorAPIServer(roots=[root.cert]) as server:
        refused = await call_with(server, forged)
    assert isinstance(refused, ConveyorAPIError) and refused.status == 401
    assert server.auth_failures == [
        "token parse error: token signature is invalid",
        "token parse error: token signature is invalid",  # signed anew once, refused again
    ]


@pytest.mark.parametrize(
    ("usages", "accepted"),
    [
        ((SERVER_AUTH, CLIENT_AUTH), True),  # what `conveyor init` issues
        (None, True),  # no extended key usage: any use
        ((CLIENT_AUTH,), False),  # Go's Verify defaults to server auth
    ],
)
async def test_extended_key_usage_is_judged_as_go_judges_it(
    tmp_path: Path, root: Issued, usages: Any, accepted: bool
) -> None:
    files = make_leaf(root, usages=usages).write(tmp_path, "driver")
    async with ConveyorAPIServer(roots=[root.cert]) as server:
        server.define("pipeline")
        answer = await call_with(server, load_identity(files.cert, files.key))
    assert isinstance(answer, ConveyorAPIError) is not accepted
    if not accepted:
        assert "incompatible key usage" in server.auth_failures[0]


# -- token lifetime ---------------------------------------------------------------------------


def test_a_token_is_reused_until_shortly_before_it_expires(tmp_path: Path, root: Issued) -> None:
    files = make_leaf(root).write(tmp_path, "driver")
    now = [1_000_000.0]
    auth = CertificateAuth(load_identity(files.cert, files.key), clock=lambda: now[0])
    first = auth.token()
    now[0] += 89.9
    assert auth.token() == first
    now[0] = 1_000_000.0 + 90  # 30 s before expiry: time for a new one
    second = auth.token()
    assert second != first
    assert auth.minted == 2
    assert decode(second)[1]["iat"] == 1_000_090 - 30
    assert decode(second)[1]["exp"] == 1_000_090 + 120
    assert auth.headers() == {"Authorization": f"Bearer {second}"}


def test_the_lifetime_is_configurable(tmp_path: Path, root: Issued) -> None:
    files = make_leaf(root).write(tmp_path, "driver")
    identity = load_identity(files.cert, files.key)
    claims = decode(CertificateAuth(identity, ttl=600, clock=lambda: 5000.0).token())[1]
    assert (claims["iat"], claims["exp"]) == (5000 - 30, 5600)
    with pytest.raises(ConfigurationError, match="at least 10 seconds"):
        CertificateAuth(identity, ttl=1)


async def test_an_expired_token_is_refused_and_signed_anew_once(
    tmp_path: Path, root: Issued
) -> None:
    files = make_leaf(root).write(tmp_path, "driver")
    identity = load_identity(files.cert, files.key)
    async with ConveyorAPIServer(roots=[root.cert]) as server:
        refused = await call_with(server, identity, clock=lambda: time.time() - 600)
    assert isinstance(refused, ConveyorAPIError) and refused.status == 401
    assert (
        server.auth_failures
        == ["token parse error: token has invalid claims: token is expired"] * 2
    )


@pytest.mark.parametrize(("behind", "accepted"), [(10, True), (60, False)])
async def test_a_server_clock_a_little_behind_is_tolerated(
    tmp_path: Path, root: Issued, behind: float, accepted: bool
) -> None:
    files = make_leaf(root).write(tmp_path, "driver")
    async with ConveyorAPIServer(roots=[root.cert], clock_offset=-behind) as server:
        server.define("pipeline")
        answer = await call_with(server, load_identity(files.cert, files.key))
    if accepted:
        assert answer.name == "pipeline"
    else:
        assert isinstance(answer, ConveyorAPIError)
        assert (answer.status, answer.error) == (401, "token issued in the future")


async def test_a_refused_token_is_replaced_once_even_for_a_post(
    tmp_path: Path, root: Issued
) -> None:
    files = make_leaf(root).write(tmp_path, "driver")
    async with ConveyorAPIServer(roots=[root.cert]) as server:
        server.define("pipeline")
        server.fail(401, method="POST", body={"error": "invalid token"})
        auth = CertificateAuth(load_identity(files.cert, files.key))
        client = ConveyorClient(server.url, auth=auth)
        try:
            created = await client.create_resource(Resource(name="app", type="pipeline"))
        finally:
            await client.close()
    assert created.name == "app"
    assert [r.method for r in server.requests] == ["POST", "POST"]
    assert auth.minted == 2


async def test_a_server_that_wants_auth_says_so(root: Issued) -> None:
    async with ConveyorAPIServer(roots=[root.cert]) as server:
        client = ConveyorClient(server.url)
        try:
            with pytest.raises(ConveyorAPIError) as caught:
                await client.list_resources("pipeline")
        finally:
            await client.close()
    assert str(caught.value) == (
        "GET /resources/pipeline answered 401: missing Authorization header "
        "(the server requires authentication: configure --tls-cert and --tls-key)"
    )


# -- identities refused at start-up -------------------------------------------------------------


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path, root: Issued) -> None:
    files = make_leaf(root, "driver").write(tmp_path, "driver")
    other = make_leaf(root, "other").write(tmp_path, "other")
    with pytest.raises(ConfigurationError) as caught:
        load_identity(files.cert, other.key)
    assert str(caught.value) == (
        f"TLS key {other.key} does not match the certificate "
        f"CN=driver,O=conveyor-driver tests in {files.cert}"
    )


def test_a_chain_in_the_wrong_order_is_explained(tmp_path: Path, root: Issued) -> None:
    intermediate = make_ca("Issuing CA", issuer=root)
    leaf = make_leaf(intermediate, "driver")
    files = leaf.write(tmp_path, "driver")
    reversed_chain = write_pem(tmp_path / "reversed.crt", intermediate.cert, leaf.cert)
    with pytest.raises(ConfigurationError, match=r"belongs to certificate 2 of .*put that leaf"):
        load_identity(reversed_chain, files.key)


def test_an_expired_or_future_certificate_is_refused(tmp_path: Path, root: Issued) -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = make_leaf(root, not_before=past, not_after=past + datetime.timedelta(days=1))
    files = expired.write(tmp_path, "expired")
    with pytest.raises(ConfigurationError) as caught:
        load_identity(files.cert, files.key)
    assert str(caught.value) == (
        f"TLS certificate CN=driver,O=conveyor-driver tests in {files.cert} "
        "expired on 2020-01-02 00:00 UTC"
    )
    future = make_leaf(
        root, not_before=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
    )
    files = future.write(tmp_path, "future")
    with pytest.raises(ConfigurationError, match="is not valid before"):
        load_identity(files.cert, files.key)


async def test_the_server_refuses_a_token_of_an_expired_certificate(
    tmp_path: Path, root: Issued
) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    expired = make_leaf(root, not_before=past, not_after=past + datetime.timedelta(days=1))
    files = expired.write(tmp_path, "expired")
    # Loaded as of its own lifetime: the start-up check is what would stop it otherwise.
    identity = load_identity(files.cert, files.key, now=past + datetime.timedelta(hours=1))
    async with ConveyorAPIServer(roots=[root.cert]) as server:
        refused = await call_with(server, identity)
    assert isinstance(refused, ConveyorAPIError) and refused.status == 401
    assert "certificate has expired or is not yet valid" in server.auth_failures[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "ed25519",
            "holds a key of a kind Conveyor does not accept: use an RSA or EC "
            "(P-256, P-384, P-521) key",
        ),
        (
            "secp256k1",
            "holds an EC key on curve secp256k1: Conveyor accepts P-256, P-384 and P-521",
        ),
        ("encrypted", "is encrypted: give the key without a passphrase"),
        ("garbage", "holds no usable PEM private key (RSA or EC; PKCS#1, SEC1 or PKCS#8)"),
    ],
)
def test_keys_conveyor_cannot_use_are_refused(
    tmp_path: Path, root: Issued, content: str, expected: str
) -> None:
    key_file = tmp_path / "driver.key"
    if content == "garbage":
        key_file.write_text(
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ1dC1icm9rZW4=\n-----END PRIVATE KEY-----\n"
        )
    else:
        key = new_key("p256" if content == "encrypted" else content)
        encryption = (
            serialization.BestAvailableEncryption(b"passphrase")
            if content == "encrypted"
            else serialization.NoEncryption()
        )
        key_file.write_bytes(
            key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        )
    cert_file = make_leaf(root).write(tmp_path, "cert").cert
    with pytest.raises(ConfigurationError) as caught:
        load_identity(cert_file, key_file)
    assert str(caught.value) == f"TLS key file {key_file} {expected}"


def test_missing_and_empty_files_are_refused(tmp_path: Path, root: Issued) -> None:
    files = make_leaf(root).write(tmp_path, "driver")
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    cases = [
        (
            (tmp_path / "nope.crt", files.key, None),
            f"TLS certificate file {tmp_path / 'nope.crt'} does not exist",
        ),
        ((empty, files.key, None), f"TLS certificate file {empty} holds no PEM certificate"),
        ((files.cert, files.key, empty), f"TLS CA file {empty} holds no PEM certificate"),
        (
            (files.cert, None, None),
            "--tls-cert needs --tls-key: a certificate and its key go together",
        ),
        (
            (None, files.key, None),
            "--tls-key needs --tls-cert: a certificate and its key go together",
        ),
        ((tmp_path, files.key, None), f"TLS certificate file {tmp_path} is a directory"),
    ]
    for arguments, message in cases:
        with pytest.raises(ConfigurationError) as caught:
            load_tls(*arguments)
        assert str(caught.value) == message
    assert load_tls(None, None, None) is None
    ca_only = load_tls(None, None, write_pem(tmp_path / "ca.pem", root.cert))
    assert ca_only is not None and ca_only.identity is None


def test_settings_read_the_identity_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "CONVEYOR_TLS_CERT": "/etc/conveyor/driver.crt",
            "CONVEYOR_TLS_KEY": "/k",
            "CONVEYOR_TLS_CA": "ca.pem",
        }
    )
    assert (settings.tls_cert, settings.tls_key, settings.tls_ca) == (
        Path("/etc/conveyor/driver.crt"),
        Path("/k"),
        Path("ca.pem"),
    )
    assert Settings.from_env({}).tls_cert is None


async def test_serve_checks_the_identity_before_connecting(tmp_path: Path, root: Issued) -> None:
    files = make_leaf(root, "driver").write(tmp_path, "driver")
    other = make_leaf(root, "other").write(tmp_path, "other")
    driver = Driver("checked")

    @driver.on("pipeline")
    async def handle(_ctx: Any) -> None:
        return None

    # Nothing listens on the port: a NATS error would mean the check came too late.
    settings = Settings(
        nats_urls=f"nats://127.0.0.1:{free_port()}", tls_cert=files.cert, tls_key=other.key
    )
    with pytest.raises(ConfigurationError, match="does not match the certificate"):
        await driver.serve(settings)


async def test_cli_run_prints_one_line_without_key_material(tmp_path: Path, root: Issued) -> None:
    files = make_leaf(root, "driver").write(tmp_path, "driver")
    other_leaf = make_leaf(root, "other")
    other = other_leaf.write(tmp_path, "other")
    done = await run_in_process(
        "run",
        app("worker_app.py:driver"),
        "--nats-url",
        f"nats://127.0.0.1:{free_port()}",
        "--tls-cert",
        str(files.cert),
        "--tls-key",
        str(other.key),
    )
    assert done.returncode == 1
    assert done.stderr_lines == [
        f"Error: TLS key {other.key} does not match the certificate "
        f"CN=driver,O=conveyor-driver tests in {files.cert}"
    ]
    assert "PRIVATE KEY" not in done.stdout + done.stderr


# -- an https API server ------------------------------------------------------------------------


async def test_an_https_api_server_is_verified_against_the_ca(tmp_path: Path, root: Issued) -> None:
    server_files = make_leaf(root, "conveyor-api").write(tmp_path, "api")
    ca_file = write_pem(tmp_path / "ca.pem", root.cert)
    files = make_leaf(root, "driver").write(tmp_path, "driver")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_files.cert, server_files.key)
    async with ConveyorAPIServer(roots=[root.cert], ssl_context=context) as server:
        server.define("pipeline")
        assert server.url.startswith("https://")
        settings = Settings(api_url=server.url)
        client = ConveyorClient.from_settings(settings, load_tls(files.cert, files.key, ca_file))
        try:
            assert (await client.get_resource_definition("pipeline")).name == "pipeline"
        finally:
            await client.close()
        stranger_ca = write_pem(tmp_path / "other-ca.pem", make_ca("Other CA").cert)
        doubtful = ConveyorClient.from_settings(
            settings, load_tls(files.cert, files.key, stranger_ca)
        )
        try:
            with pytest.raises(APIUnavailable, match="certificate verify failed"):
                await doubtful.get_resource_definition("pipeline")
        finally:
            await doubtful.close()
    assert server.auth_failures == []


# -- secrets stay secret ------------------------------------------------------------------------


async def test_no_token_key_or_pem_in_any_log_line_or_error(tmp_path: Path, root: Issued) -> None:
    leaf = make_leaf(root, kind="rsa")
    files = leaf.write(tmp_path, "driver", key_encoding="traditional")
    identity = load_identity(files.cert, files.key)
    recorder = LogRecorder()
    texts: list[str] = []
    async with ConveyorAPIServer(roots=[root.cert]) as server:
        server.fail(503, method="GET", times=2)  # two retries, logged
        server.fail(401, method="GET", body={"error": "invalid token"})  # then a re-sign
        fresh = CertificateAuth(identity)
        stale = CertificateAuth(identity, clock=lambda: time.time() - 600)  # always refused
        for auth in (fresh, stale):
            client = ConveyorClient(server.url, auth=auth, log=recorder.logger(), backoff=0.01)
            try:
                await client.get_pipeline("ci")
            except ConveyorAPIError as exc:
                texts += [str(exc), repr(exc), exc.error]
            finally:
                await client.close()
            texts += [repr(client), repr(auth)]
        texts.append(repr(identity))
    # Broken files: the messages name them, never quote them.
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_bytes(files.key.read_bytes().replace(b"A", b"*", 3))
    for key_file in (corrupt, make_leaf(root).write(tmp_path, "other").key):
        with pytest.raises(ConfigurationError) as caught:
            load_identity(files.cert, key_file)
        texts.append(str(caught.value))
    texts += [json.dumps(entry, default=str) for entry in recorder.entries]

    tokens = [r.authorization.split(" ", 1)[1] for r in server.requests if r.authorization]
    assert len(set(tokens)) >= 2 and len(recorder.entries) >= 2
    secrets = [*tokens, *(t.split(".")[2] for t in tokens), *der_b64(leaf)]
    for pem in (files.key.read_text(), files.cert.read_text(), corrupt.read_text()):
        secrets += [line for line in pem.splitlines() if len(line) >= 16 and "-----" not in line]
    combined = "\n".join(texts)
    assert "PRIVATE KEY" not in combined and "BEGIN CERTIFICATE" not in combined
    leaked = [secret[:12] for secret in secrets if secret in combined]
    assert leaked == []
