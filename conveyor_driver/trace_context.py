"""Trace context on the wire: what a message brings in, what a result and a log entry take out.

A run's span is the child of the context its message carries (``traceparent``), and the
result it publishes, like each of its log lines, carries the run's span on to whoever
reads it next: the Conveyor server, the next step's driver, a log viewer. This goes
through the globally configured propagator, as OpenTelemetry's API means it to, except
for the common case written by hand for speed: the default W3C propagators and no baggage.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import baggage, propagate, trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.trace import NonRecordingSpan, SpanContext
from structlog.typing import EventDict, WrappedLogger


def extract(headers: Mapping[str, str] | None) -> OtelContext | None:
    """The trace context a message carries, through the globally configured propagator."""
    if not headers:
        return None
    return propagate.extract(headers)


def inject(headers: dict[str, str], span_context: SpanContext | None) -> dict[str, str]:
    """Add ``span_context`` to outgoing headers (a no-op when it is not valid).

    With the default propagators (W3C trace context and baggage) and no baggage in the
    current context, the headers are written here, exactly as those would write them.
    Otherwise the propagators are called.
    """
    if span_context is not None and span_context.is_valid:
        if _w3c_only(propagate.get_global_textmap()) and not baggage.get_all():
            ids = (span_context.trace_id, span_context.span_id, span_context.trace_flags)
            headers["traceparent"] = "00-%032x-%016x-%02x" % ids  # noqa: UP031  # the quickest
            if span_context.trace_state:
                headers["tracestate"] = span_context.trace_state.to_header()
        else:
            context = trace.set_span_in_context(NonRecordingSpan(span_context))
            propagate.inject(headers, context=context)
    return headers


#: The last global propagator looked at, and whether it is the default W3C pair.
_textmap_seen: list[tuple[object, bool]] = [(None, False)]


def _w3c_only(textmap: object) -> bool:
    seen, verdict = _textmap_seen[0]
    if textmap is not seen:
        verdict = _is_default_w3c(textmap)
        _textmap_seen[0] = (textmap, verdict)
    return verdict


def _is_default_w3c(textmap: object) -> bool:
    """Whether ``textmap`` is trace context, alone or with baggage (``OTEL_PROPAGATORS``'s
    default), with these classes' own behaviour (not subclasses)."""
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if type(textmap) is TraceContextTextMapPropagator:
        return True
    if type(textmap) is not CompositePropagator:
        return False
    kinds = [type(p) for p in getattr(textmap, "_propagators", ())]
    return TraceContextTextMapPropagator in kinds and set(kinds) <= {
        TraceContextTextMapPropagator,
        W3CBaggagePropagator,
    }


def current_span_context() -> SpanContext:
    """The span context current here (invalid outside any span)."""
    return trace.get_current_span().get_span_context()


def add_trace_ids(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: ``trace_id``/``span_id`` of the current span, when there is one."""
    span_context = current_span_context()
    if span_context.is_valid:
        event_dict["trace_id"] = format(span_context.trace_id, "032x")
        event_dict["span_id"] = format(span_context.span_id, "016x")
    return event_dict
