"""The driver's X.509 identity: one certificate chain, its key and the operator's CA.

A Conveyor server with authentication on (``docs/protocol.md#authentication``) checks the
same identity twice: NATS verifies the client certificate in the TLS handshake, and the API
server verifies a JWT signed with the certificate's key. Both are loaded and checked here
once, at start-up, so that a wrong file is a one-line error before anything connects rather
than a handshake failure later. What the NATS connection does with the identity (insisting
on TLS, explaining a failed handshake) is :mod:`conveyor_driver.runtime.connection`'s job.

Error messages name files and certificate subjects, never their contents: a key's PEM must
not end up in a terminal, a log aggregator or a CI transcript.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from .errors import ConfigurationError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: The curves the Conveyor server accepts (JWT ``ES256``/``ES384``/``ES512``).
SUPPORTED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

_PEM_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"


@attrs.frozen(repr=False)
class Identity:
    """A certificate chain (leaf first) and the private key of its leaf."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    cert_file: Path
    key_file: Path

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def subject(self) -> str:
        return self.leaf.subject.rfc4514_string()

    def __repr__(self) -> str:
        return f"<Identity {self.subject} from {self.cert_file}>"


@attrs.frozen
class TLSConfig:
    """What ``--tls-cert``, ``--tls-key`` and ``--tls-ca`` configure.

    ``identity`` is None when only a CA is given: the driver then verifies the servers it
    talks to but presents no certificate and signs no token.
    """

    identity: Identity | None
    ca_file: Path | None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context: verify the server against the CA, present the identity."""
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"TLS CA file {self.ca_file} cannot be used: {ssl_reason(exc)}"
            ) from None
        if self.identity is not None:
            try:
                context.load_cert_chain(self.identity.cert_file, self.identity.key_file)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigurationError(
                    f"TLS certificate {self.identity.cert_file} with key "
                    f"{self.identity.key_file} cannot be used: {ssl_reason(exc)}"
                ) from None
        return context


def load_tls(
    cert_file: str | Path | None,
    key_file: str | Path | None,
    ca_file: str | Path | None,
    *,
    now: datetime.datetime | None = None,
) -> TLSConfig | None:
    """Check and load the TLS options; None when none is given.

    A certificate needs its key and the other way round. The key must belong to the first
    certificate of the chain, and every certificate of the chain must be valid ``now``.
    """
    if cert_file is None and key_file is None and ca_file is None:
        return None
    if (cert_file is None) != (key_file is None):
        given, missing = (
            ("--tls-cert", "--tls-key") if key_file is None else ("--tls-key", "--tls-cert")
        )
        raise ConfigurationError(f"{given} needs {missing}: a certificate and its key go together")
    ca_path = None
    if ca_file is not None:
        ca_path = Path(ca_file)
        if not load_certificates(ca_path, "CA"):
            raise ConfigurationError(f"TLS CA file {ca_path} holds no PEM certificate")
    identity = None
    if cert_file is not None and key_file is not None:
        identity = load_identity(cert_file, key_file, now=now)
    return TLSConfig(identity=identity, ca_file=ca_path)


def load_identity(
    cert_file: str | Path, key_file: str | Path, *, now: datetime.datetime | None = None
) -> Identity:
    """The chain in ``cert_file`` and the key in ``key_file``, checked against each other."""
    cert_path, key_path = Path(cert_file), Path(key_file)
    chain = tuple(load_certificates(cert_path, "certificate"))
    if not chain:
        raise ConfigurationError(f"TLS certificate file {cert_path} holds no PEM certificate")
    key = load_private_key(key_path)
    _check_key_matches(chain, key, cert_path, key_path)
    _check_validity(chain, cert_path, now or datetime.datetime.now(datetime.UTC))
    return Identity(chain=chain, key=key, cert_file=cert_path, key_file=key_path)


def load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    data = _read(path, f"TLS {what} file")
    if _PEM_CERT_MARKER not in data:
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigurationError(
            f"TLS {what} file {path} holds a PEM certificate that cannot be parsed"
        ) from None


def load_private_key(path: Path) -> PrivateKey:
    """An RSA or EC (P-256/P-384/P-521) key from PEM: PKCS#1, SEC1 or PKCS#8, unencrypted."""
    data = _read(path, "TLS key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigurationError(
            f"TLS key file {path} is encrypted: give the key without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # cryptography's message may quote the input: say what is wrong, not what is there.
        raise ConfigurationError(
            f"TLS key file {path} holds no usable PEM private key "
            "(RSA or EC; PKCS#1, SEC1 or PKCS#8)"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in SUPPORTED_CURVES:
            raise ConfigurationError(
                f"TLS key file {path} holds an EC key on curve {key.curve.name}: "
                "Conveyor accepts P-256, P-384 and P-521"
            )
        return key
    raise ConfigurationError(
        f"TLS key file {path} holds a key of a kind Conveyor does not accept: "
        "use an RSA or EC (P-256, P-384, P-521) key"
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigurationError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise ConfigurationError(f"{what} {path} cannot be read: {exc.strerror}") from None


def _public_der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches(
    chain: tuple[x509.Certificate, ...], key: PrivateKey, cert_path: Path, key_path: Path
) -> None:
    wanted = _public_der(key.public_key())
    if _public_der(chain[0].public_key()) == wanted:
        return
    for position, cert in enumerate(chain[1:], start=2):
        if _public_der(cert.public_key()) == wanted:
            raise ConfigurationError(
                f"TLS key {key_path} belongs to certificate {position} of {cert_path} "
                f"({cert.subject.rfc4514_string()}): put that leaf certificate first"
            )
    raise ConfigurationError(
        f"TLS key {key_path} does not match the certificate "
        f"{chain[0].subject.rfc4514_string()} in {cert_path}"
    )


def _check_validity(
    chain: tuple[x509.Certificate, ...], cert_path: Path, now: datetime.datetime
) -> None:
    for cert in chain:
        subject = cert.subject.rfc4514_string()
        if now > cert.not_valid_after_utc:
            raise ConfigurationError(
                f"TLS certificate {subject} in {cert_path} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
        if now < cert.not_valid_before_utc:
            raise ConfigurationError(
                f"TLS certificate {subject} in {cert_path} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )


def ssl_reason(exc: BaseException) -> str:
    """An SSL or OS error in a few plain words (``ssl.SSLError`` reasons are upper snake)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
