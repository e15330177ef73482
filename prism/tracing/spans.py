"""The OpenTelemetry SDK side of tracing: spans made, batched and exported.

Imported only by a process whose config sets ``[tracing] otlp_endpoint``
(or by a test that passes its own exporter). Finished spans go to the SDK's
``BatchSpanProcessor``: a bounded queue (``export_queue``; a span that finds
it full is dropped, never waited for) drained by a background thread that
POSTs them to the OTLP/HTTP endpoint as protobuf. The event loop never
blocks on the collector.

Sampling is decided by ``prism.tracing.calls`` before a span is made (an
unsampled call makes none), so the provider samples everything it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from prism.config.tracing import TracingConfig
from prism.tracing import context
from prism.tracing.context import CallTrace, format_traceparent

__all__ = ["OtelSpans"]

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# How often the export thread sends what has queued (or sooner, a full batch).
EXPORT_EVERY_MS = 1000


class _Child:
    """A child span, ended on leaving the ``with``; an exception marks it failed."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def __enter__(self) -> trace.Span:
        return self._span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.end_with(exc)

    def end_with(self, error: BaseException | None) -> None:
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self._span.end()


def _log_like_prism() -> None:
    """The SDK's own warnings (an export that failed: the collector is down)
    as prism's JSON lines, not Python's plain last-resort ones."""
    sdk = logging.getLogger("opentelemetry")
    ours = logging.getLogger("prism")
    if ours.handlers and not sdk.handlers:
        sdk.handlers[:] = ours.handlers
        sdk.setLevel(logging.WARNING)
        sdk.propagate = False


class OtelSpans:
    """One process's tracer: call spans and their children."""

    def __init__(
        self,
        config: TracingConfig,
        *,
        tenant: str,
        worker: str = "",
        exporter: SpanExporter | None = None,
    ) -> None:
        attributes: dict[str, Any] = {"service.name": "prism", "prism.tenant": tenant}
        if worker:
            attributes["prism.worker"] = worker
        self.provider = TracerProvider(resource=Resource.create(attributes), sampler=ALWAYS_ON)
        if exporter is None:
            # Imported here: a process given its own exporter (a test) needs no HTTP client.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=config.export_timeout_s)
            self.provider.add_span_processor(
                BatchSpanProcessor(
                    exporter,
                    max_queue_size=config.export_queue,
                    schedule_delay_millis=EXPORT_EVERY_MS,
                    max_export_batch_size=min(512, config.export_queue),
                    export_timeout_millis=int(config.export_timeout_s * 1000),
                )
            )
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = self.provider.get_tracer("prism")
        _log_like_prism()
        context.makers += 1
        self._open = True

    def start_call(self, name: str, trace_: CallTrace, attributes: Mapping[str, Any]) -> trace.Span:
        """The server span of a call, continuing its client's span if it names one."""
        parent = trace_.parent
        context = None
        if parent is not None:
            remote = SpanContext(parent.trace_id, parent.span_id, is_remote=True, trace_flags=_SAMPLED)
            context = trace.set_span_in_context(NonRecordingSpan(remote))
        span = self._tracer.start_span(
            name, context, kind=SpanKind.SERVER, attributes=attributes, start_time=trace_.started_ns
        )
        trace_.trace_id = span.get_span_context().trace_id
        trace_.maker = self
        return span

    def child(
        self, parent: trace.Span, name: str, attributes: dict[str, Any], kind: SpanKind = SpanKind.INTERNAL
    ) -> _Child:
        return _Child(self.start_child(parent, name, attributes, kind))

    def start_child(
        self, parent: trace.Span, name: str, attributes: dict[str, Any], kind: SpanKind = SpanKind.INTERNAL
    ) -> trace.Span:
        """A span under ``parent``, ended by the caller."""
        return self._tracer.start_span(
            name, trace.set_span_in_context(parent), kind=kind, attributes=attributes
        )

    def start_forward(self, trace_: CallTrace, namespace: str) -> tuple[_Child, str]:
        span = self.start_child(trace_.span, "prism.forward", {"prism.namespace": namespace}, SpanKind.CLIENT)
        ids = span.get_span_context()
        return _Child(span), format_traceparent(ids.trace_id, ids.span_id, True)

    @staticmethod
    def end_call(span: trace.Span, status_name: str, ok: bool, attributes: Mapping[str, Any]) -> None:
        span.set_attributes(attributes)
        if not ok:
            span.set_status(Status(StatusCode.ERROR, status_name))
        span.end()

    def shutdown(self) -> None:
        """Export what is queued (at most ``export_timeout_s``) and stop the thread."""
        if self._open:
            self._open = False
            context.makers -= 1
            self.provider.shutdown()
