"""Certificates for the TLS and auth tests, made on the spot with ``cryptography``.

A small PKI: a root CA, optionally an intermediate, and leaves for servers and drivers,
with RSA or EC keys written in the PEM encodings a driver may be handed (PKCS#1, SEC1,
PKCS#8). Nothing here is checked in: every test run has fresh keys. And a nats-server
that speaks only TLS and verifies its clients' certificates, for the drivers to connect to.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conveyor_driver import Settings
from conveyor_driver.embedded import find_nats_server, free_port

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_CURVES: dict[str, ec.EllipticCurve] = {
    "p256": ec.SECP256R1(),
    "p384": ec.SECP384R1(),
    "p521": ec.SECP521R1(),
    "secp256k1": ec.SECP256K1(),
}

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


_Curve = Literal["p256", "p384", "p521", "secp256k1"]


@overload
def new_key(kind: Literal["rsa"]) -> rsa.RSAPrivateKey: ...
@overload
def new_key(kind: Literal["ed25519"]) -> ed25519.Ed25519PrivateKey: ...
@overload
def new_key(kind: _Curve = "p256") -> ec.EllipticCurvePrivateKey: ...
@overload
def new_key(kind: str) -> PrivateKey: ...
def new_key(kind: str = "p256") -> PrivateKey:
    """A fresh key: ``rsa``, ``ed25519`` or an EC curve by name."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(_CURVES[kind])


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@attrs.frozen
class Issued:
    """A certificate with its key, and the chain above it up to (not including) the root."""

    cert: x509.Certificate
    key: PrivateKey
    parents: tuple[x509.Certificate, ...] = ()

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Leaf first, then each issuer: what a cert file and ``x5c`` carry."""
        return (self.cert, *self.parents)

    def chain_above_root(self) -> tuple[x509.Certificate, ...]:
        """What a certificate issued by this one carries above itself (no root)."""
        return () if self.cert.issuer == self.cert.subject else self.chain

    def cert_pem(self, *, with_chain: bool = True) -> bytes:
        certs = self.chain if with_chain else (self.cert,)
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)

    def key_pem(self, encoding: str = "pkcs8") -> bytes:
        """``pkcs8`` or ``traditional`` (PKCS#1 for RSA, SEC1 for EC)."""
        fmt = (
            serialization.PrivateFormat.PKCS8
            if encoding == "pkcs8"
            else serialization.PrivateFormat.TraditionalOpenSSL
        )
        return self.key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())

    def write(self, directory: Path, name: str, *, key_encoding: str = "pkcs8") -> Files:
        directory.mkdir(parents=True, exist_ok=True)
        cert_file = directory / f"{name}.crt"
        key_file = directory / f"{name}.key"
        cert_file.write_bytes(self.cert_pem())
        key_file.write_bytes(self.key_pem(key_encoding))
        key_file.chmod(0o600)
        return Files(cert=cert_file, key=key_file)


@attrs.frozen
class Files:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "conveyor-driver tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _sign(builder: x509.CertificateBuilder, issuer_key: PrivateKey) -> x509.Certificate:
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


def make_ca(
    common_name: str = "Test Root CA",
    *,
    kind: str = "p256",
    issuer: Issued | None = None,
) -> Issued:
    """A root CA, or an intermediate CA when ``issuer`` is given."""
    key = new_key(kind)
    start = now() - datetime.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject if issuer else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:
        return Issued(_sign(builder, key), key)
    return Issued(_sign(builder, issuer.key), key, issuer.chain_above_root())


def make_leaf(
    issuer: Issued,
    common_name: str = "driver",
    *,
    kind: str = "p256",
    key: PrivateKey | None = None,
    usages: Sequence[x509.ObjectIdentifier] | None = (SERVER_AUTH, CLIENT_AUTH),
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A leaf certificate; ``usages=None`` leaves out the extended key usage extension.

    The default usages are those of the certificate ``conveyor init`` makes (server and
    client), which both NATS and the API server accept.
    """
    key = key or new_key(kind)
    start = not_before or now() - datetime.timedelta(hours=1)
    end = not_after or now() + datetime.timedelta(days=7)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    return Issued(_sign(builder, issuer.key), key, issuer.chain_above_root())


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


@attrs.frozen
class Pki:
    """A CA, a server certificate for 127.0.0.1, and a driver identity, as files."""

    ca: Issued
    ca_file: Path
    server: Files
    client: Files
    client_issued: Issued


def make_pki(directory: Path, *, kind: str = "p256", intermediate: bool = False) -> Pki:
    ca = make_ca(kind=kind)
    signer = make_ca("Test Intermediate CA", kind=kind, issuer=ca) if intermediate else ca
    server = make_leaf(signer, "nats-server", kind=kind)
    client = make_leaf(signer, "test-driver", kind=kind)
    return Pki(
        ca=ca,
        ca_file=write_pem(directory / "ca.pem", ca.cert),
        server=server.write(directory, "server"),
        client=client.write(directory, "client"),
        client_issued=client,
    )


# -- a nats-server verifying clients ------------------------------------------------------


@attrs.frozen
class TLSNats:
    url: str
    pki: Pki
    log_file: Path

    def context(self, *, identity: bool = True, ca: Path | None = None) -> ssl.SSLContext:
        """A client context of the tests' own observer connections."""
        context = ssl.create_default_context(cafile=str(ca or self.pki.ca_file))
        if identity:
            context.load_cert_chain(self.pki.client.cert, self.pki.client.key)
        return context

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "nats_urls": self.url,
            "tls_cert": self.pki.client.cert,
            "tls_key": self.pki.client.key,
            "tls_ca": self.pki.ca_file,
            "log_format": "json",
            **overrides,
        }
        return Settings(**values)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited: {log_file.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nats-server did not listen on {port}")


@contextlib.contextmanager
def tls_nats_server(directory: Path, pki: Pki, *, extra: str = "") -> Iterator[TLSNats]:
    """nats-server with JetStream and ``tls { ... verify: true }``: clients need a certificate."""
    port = free_port()
    config = directory / "nats.conf"
    config.write_text(
        f"""
listen: "127.0.0.1:{port}"
jetstream {{ store_dir: "{directory / "jetstream"}" }}
tls {{
  cert_file: "{pki.server.cert}"
  key_file: "{pki.server.key}"
  ca_file: "{pki.ca_file}"
  verify: true
  timeout: 5
}}
{extra}
"""
    )
    log_file = directory / "nats-server.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [find_nats_server(), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_port(port, process, log_file)
        yield TLSNats(f"nats://127.0.0.1:{port}", pki, log_file)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
