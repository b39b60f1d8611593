"""OpenTelemetry tracing (W3C trace context), off by default.

When ``tracing.enabled`` is set, each service gets its own ``TracerProvider`` (its own
``service.name``, so one process running all three under ``qmtl up`` still reports three
services) exporting over OTLP/HTTP to ``tracing.otlp_endpoint``, and:

* every HTTP request gets a server span (OpenTelemetry's ASGI middleware, outermost),
  continuing the caller's ``traceparent``;
* every call the Gateway makes to WorldService / the DAG Manager (httpx) gets a client
  span and carries ``traceparent``;
* a control event carries the context of the request that caused it as ``traceparent``
  (and ``tracestate``) headers on the ControlBus (Kafka headers; the in-process bus keeps
  them on the message) — WorldService stores them with the event in its outbox, so a
  publish after the commit still belongs to the request's trace;
* the Gateway's consumer continues that context (a consumer span when tracing is on) and
  the WebSocket frame it relays carries it as the CloudEvents distributed-tracing extension
  ``traceparent``, so a client can join an event to the request that caused it.

Off, none of the wrappers is installed (nothing runs per request), and the relay only
copies a ``traceparent`` that an event already carries: one dictionary lookup per event.
"""

from __future__ import annotations

import contextlib
import typing as t

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace.propagation import _SPAN_KEY  # the context key of the current span

from qmtl.common.config import TracingConfig

__all__ = [
    "TRACEPARENT",
    "TracingConfig",
    "consumed",
    "frame_extensions",
    "inject",
    "instrument_asgi",
    "instrument_httpx",
    "make_tracer_provider",
]

TRACEPARENT = "traceparent"


def make_tracer_provider(cfg: TracingConfig, service: str, *, span_processor: t.Any = None) -> t.Any:
    """The service's provider, or None when tracing is off. ``span_processor`` replaces the
    OTLP exporter (tests pass an in-memory exporter's processor)."""
    if not cfg.enabled and span_processor is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"{cfg.service_name_prefix}{service}"}),
        sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
    )
    if span_processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        span_processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint))
    provider.add_span_processor(span_processor)
    return provider


def instrument_asgi(app: t.Any, provider: t.Any) -> t.Any:
    """``app`` wrapped in a server span per HTTP request (WebSocket sessions: one span per
    session, no span per message)."""
    if provider is None:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, tracer_provider=provider, exclude_spans=["receive", "send"])


def instrument_httpx(client: t.Any, provider: t.Any) -> None:
    """Client spans (and ``traceparent``) on every request ``client`` sends."""
    if provider is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=provider)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (``traceparent``/``tracestate``) to ``headers``; a
    no-op when no span is current."""
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)
    return headers


@contextlib.contextmanager
def consumed(headers: t.Mapping[str, str] | None, name: str, provider: t.Any = None) -> t.Iterator[None]:
    """Within the block, the context an event carried in its headers is current (a consumer
    span under it when ``provider`` is set). Nothing happens for an event without one."""
    if not headers or TRACEPARENT not in headers:
        yield
        return
    token = otel_context.attach(propagate.extract(dict(headers)))
    try:
        if provider is None:
            yield
        else:
            with provider.get_tracer("qmtl.controlbus").start_as_current_span(name, kind=trace.SpanKind.CONSUMER):
                yield
    finally:
        otel_context.detach(token)


def frame_extensions() -> dict[str, str]:
    """The CloudEvents distributed-tracing extension for a frame relayed now: the current
    span's ``traceparent`` (empty when there is none)."""
    span = t.cast("trace.Span | None", otel_context.get_value(_SPAN_KEY))
    if span is None:  # the common case with tracing off: nothing current, one context lookup
        return {}
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return {}
    return {TRACEPARENT: f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"}


@contextlib.contextmanager
def continued(headers: t.Mapping[str, str]) -> t.Iterator[None]:
    """Make the ``traceparent`` of an incoming request current when no server span did
    (tracing off at this service): the frames a callback causes still carry the caller's context."""
    if trace.get_current_span().get_span_context().is_valid or TRACEPARENT not in headers:
        yield
        return
    token = otel_context.attach(propagate.extract(dict(headers)))
    try:
        yield
    finally:
        otel_context.detach(token)
