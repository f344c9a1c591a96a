"""A Loki-compatible push receiver for tests: an aiohttp server that is as strict as Loki.

It accepts ``POST /loki/api/v1/push`` only when the body is what Loki would take (gzip, JSON
streams, label names Loki allows, at most 15 labels, decimal nanosecond timestamps as
strings, string-valued structured metadata, one stream's values in time order) and answers
400 with the reason otherwise, so a sink that would be refused by a real Loki fails here
too. It can be told to answer 429/500/400 for the next pushes, and it records what it took.

Lines longer than ``max_line_size`` bytes (Loki's default: ``256KB``, read by Loki as
256,000) are refused as Loki's distributor refuses them: the other lines of the push are
kept, and the answer is 400 with Loki's ``line_too_long`` message for each refused line.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from conveyor_driver.embedded import free_port

PUSH_PATH = "/loki/api/v1/push"
MAX_LABELS = 15
MAX_LINE_SIZE = 256_000
#: Loki's validation.LineTooLongErrorMsg.
LINE_TOO_LONG = (
    "Max entry size '{limit}' bytes exceeded for stream '{stream}' while adding an entry "
    "with length '{size}' bytes"
)
#: Generous: the machine is shared, and a deadline only matters when a test is failing.
TIMEOUT = 30.0
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RECORDED_HEADERS = ("X-Scope-OrgID", "Authorization", "Content-Encoding", "Content-Type")


@dataclass(frozen=True)
class Entry:
    """One accepted log line; ``metadata`` is None when the value had no third element."""

    labels: dict[str, str]
    timestamp: str
    line: str
    metadata: dict[str, str] | None


class InvalidPush(ValueError):
    """A push Loki would refuse with 400; the message is the reason."""


def validate_push(headers: dict[str, str], raw: bytes) -> list[Entry]:
    """The entries of a push body, or InvalidPush saying why Loki would refuse it."""
    if headers.get("Content-Encoding") != "gzip":
        raise InvalidPush(f"Content-Encoding must be gzip, not {headers.get('Content-Encoding')!r}")
    if not headers.get("Content-Type", "").startswith("application/json"):
        raise InvalidPush(f"Content-Type must be application/json: {headers.get('Content-Type')!r}")
    try:
        body = json.loads(gzip.decompress(raw))
    except (OSError, EOFError, ValueError) as exc:
        raise InvalidPush(f"body is not gzip-compressed JSON: {exc}") from None
    if not isinstance(body, dict) or set(body) != {"streams"}:
        raise InvalidPush(f"body must be {{'streams': [...]}}, got keys {sorted(body)}")
    streams = body["streams"]
    if not isinstance(streams, list) or not streams:
        raise InvalidPush("streams must be a non-empty list")
    entries: list[Entry] = []
    for stream in streams:
        entries.extend(_validate_stream(stream))
    return entries


def _validate_stream(stream: Any) -> list[Entry]:
    if not isinstance(stream, dict) or set(stream) != {"stream", "values"}:
        raise InvalidPush(f"a stream must have exactly 'stream' and 'values': {stream!r}")
    labels = stream["stream"]
    if not isinstance(labels, dict) or not labels:
        raise InvalidPush(f"stream labels must be a non-empty object: {labels!r}")
    if len(labels) > MAX_LABELS:
        raise InvalidPush(f"stream has {len(labels)} labels, more than {MAX_LABELS}")
    for name, value in labels.items():
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            raise InvalidPush(f"invalid label name {name!r}")
        if not isinstance(value, str) or not value:
            raise InvalidPush(f"label {name!r} must have a non-empty string value: {value!r}")
    values = stream["values"]
    if not isinstance(values, list) or not values:
        raise InvalidPush(f"stream {labels} has no values")
    entries: list[Entry] = []
    previous = -1
    for value in values:
        if not isinstance(value, list) or len(value) not in (2, 3):
            raise InvalidPush(f"a value must be [ts, line] or [ts, line, metadata]: {value!r}")
        timestamp, line = value[0], value[1]
        if not isinstance(timestamp, str) or not timestamp.isdecimal():
            raise InvalidPush(f"timestamp must be unix ns as a decimal string: {timestamp!r}")
        if not isinstance(line, str):
            raise InvalidPush(f"line must be a string: {line!r}")
        if int(timestamp) < previous:
            raise InvalidPush(f"entry out of order in stream {labels}: {timestamp} < {previous}")
        previous = int(timestamp)
        metadata: dict[str, str] | None = None
        if len(value) == 3:
            metadata = value[2]
            if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
            ):
                raise InvalidPush(f"structured metadata values must be strings: {metadata!r}")
        entries.append(Entry(dict(labels), timestamp, line, metadata))
    return entries


class LokiReceiver:
    """Serve on a free local port for the life of an ``async with`` block.

    ``entries`` holds accepted lines in arrival order, ``attempts`` every POST that reached
    the push path (accepted or not), ``accepted`` the pushes taken whole, ``headers`` the
    recorded headers of each attempt and ``invalid`` the reasons of refused bodies and lines.
    """

    def __init__(self, *, max_line_size: int = MAX_LINE_SIZE) -> None:
        self.port = free_port()
        self.max_line_size = max_line_size
        self.entries: list[Entry] = []
        self.headers: list[dict[str, str]] = []
        self.invalid: list[str] = []
        self.attempts = 0
        self.accepted = 0
        self._scripted: collections.deque[tuple[int, str]] = collections.deque()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer_next(self, status: int, count: int = 1, text: str = "") -> None:
        """Answer the next ``count`` valid pushes with ``status`` (and drop their lines)."""
        self._scripted.extend([(status, text or f"scripted {status}")] * count)

    def lines(self, **labels: str) -> list[str]:
        """The lines whose labels include ``labels``, in arrival order."""
        return [e.line for e in self.entries if labels.items() <= e.labels.items()]

    async def wait_for(
        self, predicate: Callable[[LokiReceiver], bool], timeout: float = TIMEOUT
    ) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), timeout)

    async def __aenter__(self) -> LokiReceiver:
        app = web.Application()
        app.router.add_post(PUSH_PATH, self._push)
        # Raw bodies: whether the sink really gzips is one of the things checked.
        self._runner = web.AppRunner(app, auto_decompress=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _too_long(self, entries: list[Entry]) -> dict[int, str]:
        """Loki's reason for each entry over the line limit, by the entry's id."""
        reasons: dict[int, str] = {}
        for entry in entries:
            size = len(entry.line.encode())
            if self.max_line_size and size > self.max_line_size:
                stream = ", ".join(f'{k}="{v}"' for k, v in sorted(entry.labels.items()))
                reasons[id(entry)] = LINE_TOO_LONG.format(
                    limit=self.max_line_size, stream=f"{{{stream}}}", size=size
                )
        return reasons

    async def _push(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = {k: request.headers[k] for k in _RECORDED_HEADERS if k in request.headers}
        async with self._changed:
            self.attempts += 1
            self.headers.append(headers)
            try:
                entries = validate_push(headers, raw)
            except InvalidPush as exc:
                self.invalid.append(str(exc))
                response = web.Response(status=400, text=str(exc))
            else:
                too_long = self._too_long(entries)
                if self._scripted:
                    status, text = self._scripted.popleft()
                    response = web.Response(status=status, text=text)
                elif too_long:
                    self.invalid.extend(too_long.values())
                    self.entries.extend(e for e in entries if id(e) not in too_long)
                    response = web.Response(status=400, text="\n".join(too_long.values()))
                else:
                    self.accepted += 1
                    self.entries.extend(entries)
                    response = web.Response(status=204)
            self._changed.notify_all()
        return response
