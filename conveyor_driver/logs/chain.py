"""The structlog processor chain every driver log line goes through.

    add level → timestamp → format exception → trace ids (when tracing) → mask secrets
    → sinks (NATS, Loki) → console renderer

Sinks are plain processors that copy what they need and hand it to a background task, so
a log call on the handler's path costs one dict walk and a queue append, never I/O. The
chain is built per driver process and handed to handlers through ``ctx.log``: nothing
here touches structlog's global configuration.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from ..trace_context import add_trace_ids
from .redact import Redactor

#: Keys the runtime binds on every run logger. Sinks that carry them in fields of their own
#: (the NATS Log entry, Loki labels) leave them out of the rendered message.
RUN_KEYS = frozenset(
    {"driver", "run_id", "pipeline", "event_name", "resource_type", "resource_name", "message_id"}
)


def build_logger(
    *,
    level: str = "info",
    fmt: str = "auto",
    sinks: Sequence[Processor] = (),
    stream: TextIO | None = None,
    redactor: Redactor | None = None,
    trace_ids: bool = True,
) -> FilteringBoundLogger:
    """A bound logger writing to ``stream`` (stderr) and handing run lines to ``sinks``.

    ``fmt`` is ``console`` (coloured, for people), ``json`` (one object a line, for log
    collectors) or ``auto``: console on a terminal, JSON otherwise. ``redactor`` masks
    secrets after the exception is formatted (a traceback can hold one) and before the
    sinks and the renderer, so every output receives the same masked text. ``trace_ids``
    false leaves out the lookup of the current span, which a driver without a tracer
    provider would make on every line and never find.
    """
    output = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if output.isatty() else "json"
    renderer: Processor
    if fmt == "console":
        renderer = _console_renderer(colors=output.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
    processors: list[Processor] = [
        structlog.processors.add_log_level,
        _UtcTimestamper(),
        structlog.processors.format_exc_info,
        *([add_trace_ids] if trace_ids else []),
        *([redactor] if redactor is not None else []),
        *sinks,
        renderer,
    ]
    logger: FilteringBoundLogger = structlog.wrap_logger(
        # One write per line (print() makes two: the text, then the newline), so that the
        # lines of processes sharing a stream (--workers) do not run into each other even
        # when it is unbuffered (PYTHONUNBUFFERED=1, as in deploy/Dockerfile).
        structlog.WriteLogger(output),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_level_number(level)),
        cache_logger_on_first_use=True,
    )
    return logger


def logfmt_value(value: Any) -> str:
    """``value`` as a logfmt value: bare when it can be, else quoted and escaped as JSON.

    The one quoting of ``key=value`` pairs, on the console and in Loki lines alike, and the
    one Loki's ``| logfmt`` parser reads back (an empty value stays bare: ``key=``).
    """
    text = value if isinstance(value, str) else str(value)
    # Letters and digits never need quotes; the pattern decides for everything else.
    if text.isalnum() or not _NEEDS_QUOTES.search(text):
        return text
    # Printable text without quotes or backslashes is its own JSON string body.
    if text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return orjson.dumps(text).decode()


_NEEDS_QUOTES = re.compile(r'[\s="\\]')


def _console_renderer(*, colors: bool) -> Processor:
    """structlog's console renderer, with its ``key=value`` pairs quoted by :func:`logfmt_value`."""
    renderer = structlog.dev.ConsoleRenderer(colors=colors)
    renderer.columns = [
        structlog.dev.Column(
            column.key, dataclasses.replace(column.formatter, value_repr=logfmt_value)
        )
        if column.key == "" and isinstance(column.formatter, structlog.dev.KeyValueColumnFormatter)
        else column
        for column in renderer.columns
    ]
    return renderer


class _UtcTimestamper:
    """``timestamp`` as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it.

    That one builds an aware datetime and its ISO text for every line, a large share of a
    log call (``bench/README.md``); here the date and time of day are formatted once a
    second and only the microseconds per line. The cache is keyed by the second it renders,
    so it cannot go stale, and it is swapped as one tuple, so threads logging at once never
    mix halves.
    """

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        cached = self._second
        if cached[0] != second:
            moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
            cached = self._second = (second, moment.strftime("%Y-%m-%dT%H:%M:%S"))
        micros = nanos // 1000
        # isoformat() leaves out a zero fraction; so must we, to write the same text.
        event_dict["timestamp"] = f"{cached[1]}.{micros:06d}Z" if micros else f"{cached[1]}Z"
        return event_dict


def render_message(event_dict: Mapping[str, Any]) -> str:
    """The event text followed by its own ``key=value`` pairs (the run's keys left out).

    This is the text of a NATS ``Log`` entry, a line for people in Conveyor's log view, not
    a logfmt record for a parser: values are written as they are, unquoted
    (``command=sh -c make``), where the console and Loki quote with :func:`logfmt_value`.
    """
    parts = [str(event_dict.get("event", ""))]
    level = event_dict.get("level")
    if level not in (None, "info"):
        parts.append(f"level={level}")
    for key, value in event_dict.items():
        if key in RUN_KEYS or key in _NOT_IN_MESSAGE:
            continue
        parts.append(f"{key}={value}")
    text = " ".join(parts)
    exception = event_dict.get("exception")
    return f"{text}\n{exception}" if exception else text


_NOT_IN_MESSAGE = frozenset({"event", "level", "timestamp", "exception", "trace_id", "span_id"})

#: Ends a line cut to fit a receiver's limit, naming the size of the whole line.
TRUNCATED_MARKER = " …[truncated: the line was {size} bytes]"


def truncate_line(text: str, limit: int) -> str:
    """``text`` if its UTF-8 form fits in ``limit`` bytes; else its head and the marker.

    Receivers refuse an over-long line whole (NATS closes the connection over a message
    above ``max_payload``, Loki answers 400 above ``max_line_size``), and a refused line is
    lost for good. Cut, the line keeps what usually matters (its start) and says that it
    was cut and how big it was; the console still prints it whole. The result never exceeds
    ``limit`` bytes, and the cut falls between characters, never inside one.
    """
    if len(text) * 4 <= limit:  # even four bytes a character fit: no need to encode
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    marker = TRUNCATED_MARKER.format(size=len(data))
    room = limit - len(marker.encode())
    if room <= 0:
        return marker.encode()[: max(limit, 0)].decode("utf-8", "ignore")
    return data[:room].decode("utf-8", "ignore") + marker


def _level_number(level: str) -> int:
    return logging.getLevelNamesMapping()[level.upper()]


def _json_dumps(value: object, **_: object) -> str:
    return orjson.dumps(value, default=str).decode()
