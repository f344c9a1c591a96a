"""The secrets a driver knows of before its first run, gathered into its one Redactor.

A handler registers its own with ``ctx.secret``; these are the ones nobody should have to
remember: ``Driver(secrets=[...])``, the values of environment variables named like
secrets (``--redact-env``), the passwords and tokens of the driver's own settings (Loki,
URLs with userinfo), its TLS private key, and the API tokens it signs with that key.

Values the operator did not hand over as secrets (an environment variable, a Loki
password) may be too short to mask; they are left out and named in one warning, rather
than stopping the driver over a ``KEYBOARD=us``.
"""

from __future__ import annotations

import collections
import fnmatch
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..logs.redact import MIN_LENGTH, Redactor

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from ..api.auth import CertificateAuth
    from ..app import Driver
    from ..settings import Settings

#: API tokens kept masked at once: the current one and the one before (still in flight).
_TOKENS_KEPT = 2


def driver_redactor(
    driver: Driver, settings: Settings, environ: Mapping[str, str] | None = None
) -> tuple[Redactor, list[str]]:
    """The driver's redactor, and the names of the values too short to be masked."""
    env = os.environ if environ is None else environ
    redactor = Redactor(driver.secrets, urls=settings.redact_urls)
    found: list[tuple[str, str]] = [
        (name, value)
        for name, value in env.items()
        if value and _matches(name, settings.redact_env)
    ]
    found += _settings_secrets(settings)
    if settings.tls_key is not None:
        found += [("--tls-key", line) for line in pem_lines(settings.tls_key.read_text())]
    too_short = sorted({name for name, value in found if len(value) < MIN_LENGTH})
    redactor.add(*(value for _name, value in found if len(value) >= MIN_LENGTH))
    return redactor, too_short


def pem_lines(text: str) -> list[str]:
    """The base64 lines of PEM blocks (what ``cat key.pem`` would print, line by line).

    The ``-----BEGIN ...-----`` lines are public; masking them would hide nothing.
    """
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.startswith("-----") and ":" not in line
    ]


def watch_tokens(auth: CertificateAuth, redactor: Redactor) -> None:
    """Mask each API token the driver signs, from the moment it is signed.

    The signature is the part that makes a token usable (its header and claims are the
    public certificate chain and a thumbprint), and a logged token cannot be used without
    it. Tokens are renewed every minute or two: the one before the current is released so
    the set does not grow with the driver's age.
    """
    kept: collections.deque[str] = collections.deque()

    def minted(token: str) -> None:
        signature = token.rpartition(".")[2]
        if len(signature) < MIN_LENGTH:
            return
        redactor.add(signature)
        kept.append(signature)
        if len(kept) > _TOKENS_KEPT:
            redactor.release([kept.popleft()])

    auth.on_mint = minted


def warn_too_short(log: FilteringBoundLogger, names: Iterable[str]) -> None:
    """One line naming (never showing) the values left unmasked for being too short."""
    names = list(names)
    if names:
        log.warning(
            f"values shorter than {MIN_LENGTH} characters are not masked in logs",
            names=", ".join(names),
        )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, pattern.upper()) for pattern in patterns)


def _settings_secrets(settings: Settings) -> list[tuple[str, str]]:
    """Passwords and tokens in the driver's own settings, by the option that gives them."""
    found: list[tuple[str, str]] = []
    if settings.loki is not None:
        for option, value in (
            ("--loki-password", settings.loki.password),
            ("--loki-token", settings.loki.token),
        ):
            if value:
                found.append((option, value))
    urls = [("--nats-url", url) for url in settings.nats_urls]
    urls.append(("--api-url", settings.api_url))
    if settings.loki is not None:
        urls.append(("--loki-url", settings.loki.url))
    for option, url in urls:
        parts = urllib.parse.urlsplit(url)
        # nats://TOKEN@host: a userinfo without a password is NATS's token form.
        secret = parts.password or (parts.username if "@" in parts.netloc else None)
        if secret:
            # As written (a URL is logged percent-encoded) and as the server reads it.
            found += [(option, form) for form in {secret, urllib.parse.unquote(secret)}]
    return found
