"""A trace as a timeline image, the way Jaeger or Tempo draw it, written as plain SVG text.

The documentation shows what a user sees when a run's trace reaches their tracing backend;
no such backend runs here, so ``tests/test_trace_image.py`` records the spans of a real run
(``emit --wait`` publishing on NATS, the driver's consumer span, its commands) and this
module draws them: one row per span, indented under its parent, a bar from its start to its
end on a shared time axis. No plotting library: the picture is a few rectangles and labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Span:
    """What the picture needs of a span: times in nanoseconds, its parent by id."""

    name: str
    span_id: int
    parent_id: int | None
    start: int
    end: int
    service: str
    error: bool = False


_ROW = 30
_LABEL = 330
_BAR = 560
_TOP = 44
_INDENT = 16
_COLOURS = {"emit": "#5c6bc0", "driver": "#26a69a", "command": "#ffa726"}


def rows(spans: Sequence[Span]) -> list[tuple[Span, int]]:
    """The spans in the order a trace view lists them: each under its parent, by start."""
    ids = {s.span_id for s in spans}
    children: dict[int | None, list[Span]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in ids else None
        children.setdefault(parent, []).append(span)
    ordered: list[tuple[Span, int]] = []

    def visit(parent: int | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s.start):
            ordered.append((span, depth))
            visit(span.span_id, depth + 1)

    visit(None, 0)
    return ordered


def render(spans: Sequence[Span], title: str) -> str:
    """The SVG document of the trace."""
    listed = rows(spans)
    start = min(s.start for s in spans)
    total = max(max(s.end for s in spans) - start, 1)
    width = _LABEL + _BAR + 100
    height = _TOP + _ROW * len(listed) + 36
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="12" y="24" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    for tick in range(5):
        x = _LABEL + _BAR * tick / 4
        label = _duration(total * tick // 4)
        out.append(
            f'<line x1="{x:.1f}" y1="{_TOP - 6}" x2="{x:.1f}" y2="{height - 30}" stroke="#e0e0e0"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{height - 14}" text-anchor="middle" fill="#757575">'
            f"{label}</text>"
        )
    for i, (span, depth) in enumerate(listed):
        y = _TOP + i * _ROW
        x = _LABEL + _BAR * (span.start - start) / total
        bar = max(_BAR * (span.end - span.start) / total, 2.0)
        colour = "#e53935" if span.error else _COLOURS.get(span.service, "#78909c")
        out.append(
            f'<text class="span" x="{12 + depth * _INDENT}" y="{y + 19}">'
            f'<tspan fill="#757575">{escape(span.service)}</tspan> {escape(span.name)}</text>'
        )
        out.append(
            f'<rect x="{x:.1f}" y="{y + 6}" width="{bar:.1f}" height="{_ROW - 12}" '
            f'rx="3" fill="{colour}"/>'
        )
        out.append(
            f'<text x="{x + bar + 6:.1f}" y="{y + 19}" fill="#424242">'
            f"{_duration(span.end - span.start)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _duration(nanoseconds: int) -> str:
    if nanoseconds >= 1_000_000_000:
        return f"{nanoseconds / 1e9:.2f} s"
    return f"{nanoseconds / 1e6:.1f} ms"
