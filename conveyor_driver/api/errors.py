"""What a Conveyor API call raises: one family under :class:`ConveyorDriverError`.

Why under it: an API error is something a user can cause (a wrong URL, a missing resource,
a server that is down) and its message reads as one line, so the CLI prints it without a
traceback, as it does the driver's other errors. ``NotFound`` and ``APIUnavailable`` are
the names of earlier releases, kept as aliases.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import orjson

from ..errors import ConveyorDriverError

_TEXT_LIMIT = 300
# The Go server answers 500 "... not found" where it means 404 (a missing etcd key).
_NOT_FOUND_TEXT = re.compile(r"\bnot found\b", re.IGNORECASE)


class ConveyorAPIError(ConveyorDriverError):
    """A non-2xx answer: the status, the request, and the server's ``error`` text."""

    def __init__(self, status: int, method: str, path: str, error: str) -> None:
        super().__init__(f"{method} {path} answered {status}: {error}")
        self.status = status
        self.method = method
        self.path = path
        self.error = error


class NotFoundError(ConveyorAPIError):
    """The resource (or definition, or pipeline) does not exist."""


class APIUnavailableError(ConveyorAPIError):
    """No answer at all: the connection failed or timed out (``status`` is 0)."""

    def __init__(self, method: str, path: str, error: str) -> None:
        ConveyorDriverError.__init__(self, f"{method} {path} got no answer: {error}")
        self.status = 0
        self.method = method
        self.path = path
        self.error = error


NotFound = NotFoundError
APIUnavailable = APIUnavailableError


def answered(
    status: int, reason: str | None, raw: bytes, method: str, path: str, *, signed: bool
) -> ConveyorAPIError:
    """The error a non-2xx answer means, with the server's own ``error`` text.

    ``signed`` says whether the request carried a token: a 401 to an unsigned request tells
    the user what to configure.
    """
    text = _error_text(raw) or reason or ""
    if status == 401 and not signed:
        text += " (the server requires authentication: configure --tls-cert and --tls-key)"
    not_found = status == 404 or (
        method == "GET" and status == 500 and _NOT_FOUND_TEXT.search(text) is not None
    )
    error_class = NotFoundError if not_found else ConveyorAPIError
    return error_class(status, method, path, text)


def unexpected_answer(method: str, path: str, value: Any, wanted: str) -> ConveyorAPIError:
    """A 2xx answer of the wrong shape, quoted (cut short) so the user can see it."""
    excerpt = orjson.dumps(value)[:_TEXT_LIMIT].decode(errors="replace")
    return ConveyorAPIError(200, method, path, f"unexpected answer, not {wanted}: {excerpt}")


def failure_reason(exc: BaseException, timeout: float | None = None) -> str:
    """Why a request got no answer, in words (an :class:`APIUnavailableError`'s ``error``)."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s" if timeout else "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__


def after_attempts(reason: str, attempts: int) -> str:
    return reason if attempts == 1 else f"{reason} ({attempts} attempts)"


def _error_text(raw: bytes) -> str:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:_TEXT_LIMIT].decode(errors="replace").strip()
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return raw[:_TEXT_LIMIT].decode(errors="replace").strip()
