"""Certificate-bound JWTs for the Conveyor API server (``docs/protocol.md#authentication``).

The server keeps no session: each request carries a short-lived token signed with the
driver's private key, with the certificate chain in the header (``x5c``) and the leaf's
SHA-256 thumbprint in the claims (``cnf.x5t#S256``). The server checks the chain against its
CA, the thumbprint against the leaf and the signature with the leaf's key.

Signing takes a few lines with ``cryptography``, so no JWT library is needed. The token is
a bearer credential: it is kept in memory only, and never logged or put in a message.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections.abc import Callable

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ..errors import ConfigurationError
from ..tls import Identity

#: The server's default, and ours.
DEFAULT_TTL = 120.0
#: ``iat`` is set this far in the past: the server rejects a token "issued in the future",
#: and its clock may be a little behind ours.
CLOCK_SKEW = 30

_EC_ALGORITHMS: dict[str, tuple[str, hashes.HashAlgorithm, int]] = {
    # curve: (alg, hash, bytes per coordinate in the JWS signature)
    "secp256r1": ("ES256", hashes.SHA256(), 32),
    "secp384r1": ("ES384", hashes.SHA384(), 48),
    "secp521r1": ("ES512", hashes.SHA512(), 66),
}


def b64url(data: bytes) -> str:
    """base64url without padding, as JWS and ``x5t#S256`` use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(der: bytes) -> str:
    """``x5t#S256`` of a certificate: base64url(SHA-256(DER))."""
    return b64url(hashlib.sha256(der).digest())


class CertificateAuth:
    """Mints ``Authorization`` headers from an identity, reusing a token until near expiry.

    ``ttl`` is the token's lifetime; a new one is signed once less than a quarter of it
    (at most 30 seconds) is left, so no request leaves with a token about to expire.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl < 10:
            raise ConfigurationError(f"token lifetime must be at least 10 seconds, not {ttl!r}")
        self.identity = identity
        self.ttl = ttl
        self.algorithm = algorithm_for(identity)
        self._clock = clock
        self._renew_before = min(ttl / 4, 30.0)
        self._x5c = [
            base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
            for cert in identity.chain
        ]
        self._thumbprint = thumbprint(identity.leaf.public_bytes(serialization.Encoding.DER))
        self._token: str | None = None
        self._expires = 0.0
        self.minted = 0
        #: Called with each new token before it is used (the driver masks it in logs).
        self.on_mint: Callable[[str], None] | None = None

    def __repr__(self) -> str:
        return f"<CertificateAuth {self.algorithm} {self.identity.subject}>"

    def token(self) -> str:
        """A valid token: the cached one, or a fresh one when it is near its expiry."""
        now = self._clock()
        if self._token is None or now >= self._expires - self._renew_before:
            self._token, self._expires = self._mint(now)
            if self.on_mint is not None:
                self.on_mint(self._token)
        return self._token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def invalidate(self) -> None:
        """Forget the cached token (the server refused it), so the next call signs anew."""
        self._token = None

    def _mint(self, now: float) -> tuple[str, float]:
        issued = math.floor(now)
        expires = issued + math.ceil(self.ttl)
        header = {"alg": self.algorithm, "typ": "JWT", "x5c": self._x5c}
        claims = {
            "iat": issued - CLOCK_SKEW,
            "exp": expires,
            "cnf": {"x5t#S256": self._thumbprint},
        }
        signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
        signature = sign(self.identity, signing_input.encode("ascii"))
        self.minted += 1
        return f"{signing_input}.{b64url(signature)}", float(expires)


def algorithm_for(identity: Identity) -> str:
    """RS256 for RSA, ES256/ES384/ES512 for the NIST curves."""
    key = identity.key
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    return _EC_ALGORITHMS[key.curve.name][0]


def sign(identity: Identity, data: bytes) -> bytes:
    """A JWS signature: PKCS#1 v1.5 for RSA; for EC, r and s as fixed-width big-endian."""
    key = identity.key
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    _alg, digest, size = _EC_ALGORITHMS[key.curve.name]
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")
