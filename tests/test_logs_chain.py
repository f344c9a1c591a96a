"""The structlog chain: the message text sinks publish, and the console/JSON output."""

from __future__ import annotations

import io
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from structlog.typing import EventDict, WrappedLogger

from conveyor_driver.logs.chain import RUN_KEYS, build_logger, render_message, truncate_line

RUN = {
    "driver": "runner",
    "run_id": "run-1",
    "pipeline": "ci",
    "event_name": "create",
    "resource_type": "pipeline",
    "resource_name": "app",
    "message_id": "m-1",
}


def test_render_message_leaves_run_keys_out_and_keeps_the_event_pairs() -> None:
    event = {
        **RUN,
        "event": "cloning",
        "level": "info",
        "timestamp": "2024-01-02T03:04:05Z",
        "repo": "https://example.com/app.git",
        "depth": 1,
    }
    assert render_message(event) == "cloning repo=https://example.com/app.git depth=1"


def test_render_message_names_a_level_other_than_info() -> None:
    assert render_message({**RUN, "event": "slow", "level": "warning", "n": 3}) == (
        "slow level=warning n=3"
    )


def test_render_message_appends_the_exception_text() -> None:
    event = {
        **RUN,
        "event": "run raised",
        "level": "error",
        "attempt": 2,
        "exception": "Traceback (most recent call last):\nValueError: bad spec",
    }
    assert render_message(event) == (
        "run raised level=error attempt=2\nTraceback (most recent call last):\nValueError: bad spec"
    )


def test_render_message_of_a_bare_event() -> None:
    assert render_message({"event": "hello"}) == "hello"


def test_run_keys_are_the_ones_the_runtime_binds() -> None:
    assert set(RUN) == RUN_KEYS


def read_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def assert_recent_utc(timestamp: str) -> None:
    moment = datetime.fromisoformat(timestamp)
    assert moment.utcoffset() == timedelta(0)
    assert abs(datetime.now(moment.tzinfo) - moment) < timedelta(hours=1)


def test_json_format_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    log = build_logger(fmt="json", stream=stream).bind(driver="runner", run_id="run-1")
    log.info("cloning", repo="x")
    log.warning("slow", seconds=2.5)
    lines = read_lines(stream)
    assert len(lines) == 2
    for line in lines:
        assert_recent_utc(line.pop("timestamp"))
    assert lines == [
        {"driver": "runner", "run_id": "run-1", "event": "cloning", "level": "info", "repo": "x"},
        {
            "driver": "runner",
            "run_id": "run-1",
            "event": "slow",
            "level": "warning",
            "seconds": 2.5,
        },
    ]


@pytest.mark.parametrize("trace_ids", [True, False])
def test_trace_ids_of_the_current_span_are_added_unless_left_out(trace_ids: bool) -> None:
    span = trace.NonRecordingSpan(
        trace.SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=trace.TraceFlags(1))
    )
    stream = io.StringIO()
    log = build_logger(fmt="json", stream=stream, trace_ids=trace_ids)
    with trace.use_span(span):
        log.info("in a span")
    [line] = read_lines(stream)
    ids = {"trace_id": f"{0xABC:032x}", "span_id": f"{0xDEF:016x}"}
    assert {key: line[key] for key in ids if key in line} == (ids if trace_ids else {})


def test_json_format_renders_values_that_are_not_json_as_text() -> None:
    stream = io.StringIO()
    build_logger(fmt="json", stream=stream).info("saw", path=PurePosixPath("/src/app"))
    (line,) = read_lines(stream)
    assert line["path"] == "/src/app"


def test_json_format_carries_the_traceback() -> None:
    stream = io.StringIO()
    log = build_logger(fmt="json", stream=stream)
    try:
        raise ValueError("bad spec")
    except ValueError:
        log.exception("run raised")
    (line,) = read_lines(stream)
    assert line["level"] == "error"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert line["exception"].endswith("ValueError: bad spec")


def test_auto_format_on_a_stream_that_is_not_a_terminal_is_json() -> None:
    stream = io.StringIO()
    build_logger(stream=stream).info("hello", k=1)
    (line,) = read_lines(stream)
    assert (line["event"], line["k"], line["level"]) == ("hello", 1, "info")


def test_console_format_is_plain_text_without_colours_off_a_terminal() -> None:
    stream = io.StringIO()
    build_logger(fmt="console", stream=stream).info("hello", k=1)
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert "hello" in text and "k=1" in text and "info" in text
    assert "\x1b[" not in text


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", ["d", "i", "w", "e"]),
        ("info", ["i", "w", "e"]),
        ("WARNING", ["w", "e"]),
        ("error", ["e"]),
    ],
)
def test_level_filtering(level: str, expected: list[str]) -> None:
    stream = io.StringIO()
    log = build_logger(level=level, fmt="json", stream=stream)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line["event"] for line in read_lines(stream)] == expected


def test_sinks_see_level_timestamp_and_keys_before_rendering() -> None:
    seen: list[dict[str, Any]] = []

    def sink(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        seen.append(dict(event_dict))
        return event_dict

    stream = io.StringIO()
    log = build_logger(level="info", fmt="json", stream=stream, sinks=[sink])
    log.bind(run_id="run-1").info("hello", k=1)
    log.debug("filtered out before any sink")
    (entry,) = seen
    assert_recent_utc(entry.pop("timestamp"))
    assert entry == {"run_id": "run-1", "event": "hello", "level": "info", "k": 1}
    assert len(read_lines(stream)) == 1


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("x" * 5000, 1000),  # one byte a character
        ("é" * 5000, 1001),  # two: the cut must not split one
        ("😀" * 5000, 1003),  # four
        ("a" + "€" * 5000, 1000),  # three, off by one
    ],
)
def test_truncate_line_fits_the_limit_names_the_size_and_cuts_between_characters(
    text: str, limit: int
) -> None:
    size = len(text.encode())
    marker = f" …[truncated: the line was {size} bytes]"
    cut = truncate_line(text, limit)
    assert cut.endswith(marker)
    assert limit - 4 < len(cut.encode()) <= limit
    assert text.startswith(cut.removesuffix(marker))


def test_truncate_line_leaves_a_line_that_fits_alone() -> None:
    assert truncate_line("é" * 500, 1000) == "é" * 500
    assert truncate_line("x" * 1000, 1000) == "x" * 1000
    # Below the marker's own size, the result still keeps to the limit.
    assert len(truncate_line("x" * 1000, 10).encode()) <= 10
