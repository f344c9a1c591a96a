"""Ship log lines to Grafana Loki with its push API, without ever slowing a handler.

Three promises, because common Python Loki handlers break them: a log call only appends to
a bounded queue (no request on the caller's path); labels stay few and bounded (the driver,
the resource type, the level and static labels), while per-run values such as the run id go
into structured metadata, so Loki's stream count does not grow with every build; and a clean
shutdown flushes what is queued within a deadline. The shipper reports its own trouble on the
console only, never through the chain it ships, so a failing Loki cannot feed itself.

A line longer than Loki's ``max_line_size`` (256,000 bytes by default) would be refused
with a 400 and lost; it is truncated instead, with the marker the NATS sink uses, which
states the line's whole size (see :func:`~conveyor_driver.logs.chain.truncate_line`). A
refused batch is dropped, counted and warned about once, never retried, so the lines
behind it go on.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import gzip
import random
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from .. import validation
from ..errors import InvalidSettingError
from .chain import logfmt_value, truncate_line
from .sink import LineCounter, SinkReporter
from .stdlib import silence_bridge

if TYPE_CHECKING:
    import aiohttp
    from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

    from ..runtime.publisher import Publisher

PUSH_PATH = "/loki/api/v1/push"

#: Keys that vary per run, and their structured-metadata names: never labels.
METADATA_KEYS = {
    "run_id": "run_id",
    "message_id": "message_id",
    "event_name": "event",
    "resource_name": "resource_name",
    "trace_id": "trace_id",
    "span_id": "span_id",
}
_METADATA_ITEMS = tuple(METADATA_KEYS.items())
#: Left out of the line besides the message and the labels ``_entry`` takes out: the driver
#: (the ``service_name`` label) and the chain's timestamp (the entry carries its own).
_NOT_IN_LINE = ("timestamp", "driver")
_Labels = tuple[tuple[str, str], ...]
_MAX_RETRIES = 10


#: Loki refuses a stream with more than 15 labels, and the driver sets 3 of its own.
MAX_STATIC_LABELS = 12
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
LINE_FORMATS = ("logfmt", "json")


def parse_labels(items: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Static labels from ``KEY=VALUE`` items (a string: separated by whitespace).

    Loki's label-name rule is checked here, so a bad label is refused at start-up with one
    line rather than by Loki on every push.
    """
    if isinstance(items, Mapping):
        pairs = [f"{key}={value}" for key, value in items.items()]
    else:
        pairs = items.split() if isinstance(items, str) else list(items)
    labels: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_NAME.match(key) or not value:
            raise InvalidSettingError(
                f"has {item!r}: a label must be KEY=VALUE with KEY matching [a-zA-Z_][a-zA-Z0-9_]*",
                "labels",
            )
        labels[key] = value
    if len(labels) > MAX_STATIC_LABELS:
        raise InvalidSettingError(
            f"has {len(labels)} labels: at most {MAX_STATIC_LABELS}, since Loki refuses "
            "streams with more than 15 labels and the driver sets 3 of its own",
            "labels",
        )
    return labels


@attrs.frozen
class LokiConfig:
    """Where and how to push; the defaults follow Promtail's (about 1 s or 1 MiB a batch).

    The validators are the only rules for these values: the CLI and ``CONVEYOR_LOKI_*``
    both end up here, so a value is accepted or refused the same way from either.

    ``max_line_size`` is the receiving Loki's limit in bytes (its ``limits_config``
    ``max_line_size``: ``256KB``, which Loki reads as 256,000): longer lines are truncated
    to it with a marker rather than refused. 0 means Loki has no limit.
    """

    url: str = attrs.field(
        validator=validation.url(("http", "https"), "Loki URLs start with http:// or https://")
    )
    tenant: str | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=parse_labels)
    batch_wait: float = attrs.field(default=1.0, validator=validation.number(float, minimum=0.01))
    batch_bytes: int = attrs.field(
        default=1_048_576, validator=validation.number(int, minimum=1024)
    )
    timeout: float = attrs.field(default=10.0, validator=validation.number(float, above=0))
    max_queue: int = attrs.field(default=100_000, validator=validation.number(int, minimum=1))
    structured_metadata: bool = True
    line_format: str = attrs.field(default="logfmt", validator=validation.one_of(LINE_FORMATS))
    min_backoff: float = 0.5
    max_backoff: float = 30.0
    flush_timeout: float = 10.0
    max_line_size: int = attrs.field(default=256_000, validator=validation.number(int, minimum=0))

    def __attrs_post_init__(self) -> None:
        if self.username and self.token:
            raise InvalidSettingError(
                "are both set: Loki takes basic auth (user and password) or a bearer token, "
                "not both",
                "username",
                "token",
            )

    @property
    def push_url(self) -> str:
        return self.url.rstrip("/") + PUSH_PATH


@attrs.define
class LokiStats:
    shipped: int = 0
    retried: int = 0
    dropped: int = 0

    @property
    def sent(self) -> int:
        """Lines Loki accepted (``shipped``), as every sink counts them."""
        return self.shipped


class LokiSink:
    """A structlog processor feeding a background shipper; one per driver process."""

    def __init__(
        self,
        config: LokiConfig,
        *,
        service_name: str,
        console: FilteringBoundLogger | None = None,
        on_lines: LineCounter | None = None,
    ) -> None:
        self.config = config
        self.service_name = service_name
        self.stats = LokiStats()
        self._reporter = SinkReporter("loki", console=console, on_lines=on_lines)
        self._queue: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._in_flight = 0
        self._wake_at = max(1, config.batch_bytes // 256)
        self._labels: dict[tuple[object, object], _Labels] = {}
        self._max_line = config.max_line_size

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        if len(self._queue) >= self.config.max_queue:
            self._queue.popleft()
            self.stats.dropped += 1
        self._queue.append((time.time_ns(), dict(event_dict)))
        if len(self._queue) == self._wake_at and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
        return event_dict

    def start(self, publisher: Publisher | None = None) -> None:
        """Begin shipping; needs no NATS (``publisher`` is ignored), so it starts first."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._ship_forever(), name="loki-shipper")
        self._reporter.started()

    async def close(self) -> None:
        """Flush within ``flush_timeout``, then report what was shipped, retried, dropped."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.config.flush_timeout)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self.stats.dropped += self._in_flight
        self.stats.dropped += len(self._queue)
        self._queue.clear()
        self._task = None
        self._reporter.report(self.stats)
        self._reporter.console.info(
            "loki shipping finished",
            shipped=self.stats.shipped,
            retried=self.stats.retried,
            dropped=self.stats.dropped,
        )

    async def _ship_forever(self) -> None:
        # Here, not at the top: settings import this module for LokiConfig, and
        # `import conveyor_driver` should not pay for an HTTP client it may never use.
        import aiohttp

        silence_bridge()
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        if self.config.tenant:
            headers["X-Scope-OrgID"] = self.config.tenant
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        if self.config.username is not None:
            pair = f"{self.config.username}:{self.config.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            while True:
                if not self._closing and len(self._queue) < self._wake_at:
                    # Let a batch gather for batch_wait unless it is already big enough.
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.config.batch_wait)
                if not self._queue:
                    if self._closing:
                        return
                    continue
                while self._queue:
                    body, self._in_flight = self._take_batch()
                    await self._push(session, body, self._in_flight)
                    self._in_flight = 0
                    self._reporter.report(self.stats)

    def _take_batch(self) -> tuple[bytes, int]:
        """Encode queued entries, oldest first, into one push body of about batch_bytes."""
        streams: dict[_Labels, list[list[Any]]] = {}
        size = count = 0
        previous = 0
        in_order = True
        queue, entry, limit = self._queue, self._entry, self.config.batch_bytes
        while queue and size < limit:
            timestamp, event_dict = queue.popleft()
            # Stamps are taken in queue order, so they only go back when the clock does.
            in_order = in_order and timestamp >= previous
            previous = timestamp
            try:
                labels, value = entry(timestamp, event_dict)
            except TypeError as exc:  # text JSON cannot carry (lone surrogates): this line only
                self._unencodable(exc)
                continue
            values = streams.get(labels)
            if values is None:
                streams[labels] = [value]
            else:
                values.append(value)
            size += len(value[1]) + 64
            count += 1
        return _encode(streams, in_order), count

    def _entry(self, timestamp: int, event_dict: dict[str, Any]) -> tuple[_Labels, list[Any]]:
        """Labels and ``[ns, line, metadata]``; takes apart ``event_dict``, which it owns."""
        pop = event_dict.pop
        message = pop("event", "")
        key = (pop("level", "info"), pop("resource_type", None))
        labels = self._labels.get(key)
        if labels is None:
            labels = self._labels[key] = self._make_labels(*key)
        for name in _NOT_IN_LINE:
            pop(name, None)
        metadata: dict[str, str] = {}
        if self.config.structured_metadata:
            for name, label in _METADATA_ITEMS:
                if name in event_dict:
                    value = pop(name)
                    metadata[label] = value if type(value) is str else str(value)
        line = self._render(message, event_dict)
        if self._max_line and len(line) * 4 > self._max_line:  # the common case skips a call
            line = truncate_line(line, self._max_line)
        if metadata:
            return labels, [str(timestamp), line, metadata]
        return labels, [str(timestamp), line]

    def _make_labels(self, level: object, resource_type: object) -> _Labels:
        labels = {"service_name": self.service_name, "level": str(level)}
        if resource_type:
            labels["resource_type"] = str(resource_type)
        labels.update(self.config.labels)
        return tuple(sorted(labels.items()))

    def _render(self, message: object, fields: dict[str, Any]) -> str:
        """The line: the event as ``msg`` and the entry's other keys, in logfmt or JSON."""
        if self.config.line_format == "json":
            return orjson.dumps({"msg": message, **fields}, default=str).decode()
        if not fields:
            return "msg=" + logfmt_value(message)
        return f"msg={logfmt_value(message)} " + " ".join(
            [f"{key}={logfmt_value(value)}" for key, value in fields.items()]
        )

    async def _push(self, session: aiohttp.ClientSession, body: bytes, count: int) -> None:
        """Send one batch; retry on 429, 5xx and connection errors; drop on other 4xx."""
        import aiohttp

        for attempt in range(_MAX_RETRIES + 1):
            try:
                async with session.post(self.config.push_url, data=body) as response:
                    if response.status < 300:
                        self.stats.shipped += count
                        return
                    text = (await response.text())[:300].strip()
                    if response.status != 429 and response.status < 500:
                        self._rejected(response.status, text, count)
                        return
                    reason = f"{response.status} {text}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            if attempt == _MAX_RETRIES:
                break
            self.stats.retried += count
            delay = min(self.config.max_backoff, self.config.min_backoff * 2**attempt)
            await asyncio.sleep(random.uniform(delay / 2, delay))
        self.stats.dropped += count
        self._reporter.console.warning(
            "loki unreachable; batch dropped", lines=count, reason=reason
        )

    def _unencodable(self, exc: Exception) -> None:
        self.stats.dropped += 1
        self._reporter.warn_once(
            "unencodable",
            "loki cannot encode a log line; dropping such lines (warned once)",
            error=str(exc),
        )

    def _rejected(self, status: int, text: str, count: int) -> None:
        self.stats.dropped += count
        self._reporter.warn_once(
            "rejected",
            "loki rejected a batch; dropping rejected batches (warned once)",
            status=status,
            error=text,
            lines=count,
        )


def _encode(streams: dict[_Labels, list[list[Any]]], in_order: bool = False) -> bytes:
    """The gzipped push body; streams are sorted by time only when the clock went back."""
    payload = {
        "streams": [
            {
                "stream": dict(labels),
                "values": values if in_order else sorted(values, key=lambda v: int(v[0])),
            }
            for labels, values in streams.items()
        ]
    }
    return gzip.compress(orjson.dumps(payload), compresslevel=1)
