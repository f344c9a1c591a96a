"""The trace picture of docs/explanation/what-you-see.md is drawn from a real run's spans.

A run is traced end to end here: a traced publisher (what ``emit --wait`` or a traced
Conveyor server is) sends the event on NATS with its ``traceparent`` and waits for the
result; the driver's consumer span and its commands' spans join that trace. The spans are
drawn by ``tools/trace_svg.py``, and the committed ``docs/images/trace.svg`` must show the
same rows (times differ at every run, so only the spans and their nesting are compared).
``UPDATE_DOCS_IMAGES=1 pytest tests/test_trace_image.py`` rewrites the picture.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trace_svg
from _helpers import TIMEOUT, driver_message, resource_json
from _otel import Recorder, install
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from conveyor_driver import Context, Driver, Result, protocol
from conveyor_driver.embedded import EmbeddedNats
from conveyor_driver.testing.fixtures import running

IMAGE = Path(__file__).resolve().parent.parent / "docs" / "images" / "trace.svg"
_ROW = re.compile(r'<text class="span" x="(\d+)"[^>]*><tspan[^>]*>([^<]*)</tspan> ([^<]*)</text>')


@pytest.fixture
def otel() -> Iterator[Recorder]:
    with install().tracing() as recorder:
        yield recorder


def _service(span: ReadableSpan) -> str:
    if span.kind is SpanKind.PRODUCER:
        return "emit"
    if span.kind is SpanKind.CONSUMER:
        return "driver"
    return "command"


def _drawn(span: ReadableSpan) -> trace_svg.Span:
    assert span.start_time is not None and span.end_time is not None
    return trace_svg.Span(
        name=span.name,
        span_id=span.context.span_id,
        parent_id=span.parent.span_id if span.parent is not None else None,
        start=span.start_time,
        end=span.end_time,
        service=_service(span),
        error=span.status.status_code is StatusCode.ERROR,
    )


def _rows(svg: str) -> list[tuple[str, str, str]]:
    return _ROW.findall(svg)


async def test_the_trace_picture_is_a_run_crossing_nats(
    otel: Recorder, nats_server: EmbeddedNats, nats_client: Client
) -> None:
    driver = Driver("greeter")

    @driver.on("greeting")
    async def greet(ctx: Context) -> Result:
        await ctx.run(["echo", f"hello, {ctx.resource.name}"])
        await ctx.run("sleep 0.05")
        return Result.ok(f"hello, {ctx.resource.name}")

    run_id, body = driver_message(resource_json("world", "greeting"))
    # Woken by the result itself, not a poll: the sender's span must end when the result
    # arrives, or the picture would show the test's polling as the way back.
    answered = asyncio.Event()

    async def on_result(msg: Msg) -> None:
        if json.loads(msg.data).get("run_id") == run_id:
            answered.set()

    tracer = trace.get_tracer("docs")
    async with running(driver, nats_server.url):
        sub = await nats_client.subscribe(protocol.RESULT_SUBJECT, cb=on_result)
        with tracer.start_as_current_span(
            "send resources.greeting", kind=SpanKind.PRODUCER
        ) as span:
            context = span.get_span_context()
            traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
            await nats_client.jetstream().publish(
                "resources.greeting", body, headers={"traceparent": traceparent}
            )
            await asyncio.wait_for(answered.wait(), TIMEOUT)
        await sub.unsubscribe()

    spans = [_drawn(s) for s in otel.spans()]
    svg = trace_svg.render(spans, "One run: emit --wait, across NATS, to the driver")
    drawn = [(depth, f"{s.service} {s.name}") for s, depth in trace_svg.rows(spans)]
    assert drawn == [
        (0, "emit send resources.greeting"),
        (1, "driver process greeting"),
        (2, "command run echo"),
        (2, "command run sleep"),
    ]
    if os.environ.get("UPDATE_DOCS_IMAGES") == "1":
        IMAGE.write_text(svg)
    assert _rows(IMAGE.read_text()) == _rows(svg), (
        f"{IMAGE} is out of date: UPDATE_DOCS_IMAGES=1 pytest {Path(__file__).name}"
    )


def test_rows_nest_children_under_parents_and_bars_scale_with_time() -> None:
    spans = [
        trace_svg.Span("child", 2, 1, start=500, end=1_000, service="driver"),
        trace_svg.Span("root", 1, None, start=0, end=1_000, service="emit"),
        trace_svg.Span("late", 4, 2, start=900, end=1_000, service="command", error=True),
        trace_svg.Span("early", 3, 2, start=600, end=700, service="command"),
    ]
    assert [(s.name, d) for s, d in trace_svg.rows(spans)] == [
        ("root", 0),
        ("child", 1),
        ("early", 2),
        ("late", 2),
    ]
    svg = trace_svg.render(spans, "a <trace>")
    widths = [float(w) for w in re.findall(r'<rect x="[\d.]+" y="\d+" width="([\d.]+)"', svg)]
    assert widths == [560.0, 280.0, 56.0, 56.0]
    assert "a &lt;trace&gt;" in svg
    assert svg.count('fill="#e53935"') == 1
