"""A call's trace as every module sees it, without OpenTelemetry.

``CallTrace`` is what a traced call carries: its trace id (the client's,
from its W3C ``traceparent`` metadata, or one of its own when sampled), the
client's span it continues, whether it is sampled, and its span once one is
made. While a call runs, ``current`` holds it: tasks the call starts inherit
it (trio copies the context at ``start_soon``), so the backends' child spans
(``child``) and log lines (``TraceIdFilter``) find it.

With tracing off ``spans`` is None and ``current`` is never set: ``child``
is one global test and a shared no-op context manager.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

# W3C trace-context: "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>".
_TRACEPARENT_LEN = 55
_HEX = frozenset("0123456789abcdef")
SAMPLED_FLAG = 0x01


class Parent:
    """The client's span a call continues: a parsed ``traceparent``."""

    __slots__ = ("sampled", "span_id", "trace_id")

    def __init__(self, trace_id: int, span_id: int, sampled: bool) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled


def parse_traceparent(value: str | bytes) -> Parent | None:
    """A ``traceparent`` header's parent, or None if it is malformed (a
    malformed header is ignored, as the W3C spec asks: the call starts a
    trace of its own). Versions after 00 are read as 00, if their first
    fields are well formed."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    if len(value) < _TRACEPARENT_LEN or (len(value) > _TRACEPARENT_LEN and value[_TRACEPARENT_LEN] != "-"):
        return None
    version, trace_hex, span_hex, flags_hex = value[:2], value[3:35], value[36:52], value[53:55]
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    if not _HEX.issuperset(value[:_TRACEPARENT_LEN].replace("-", "")):
        return None  # upper case, or not hex at all
    if version == "ff" or (version == "00" and len(value) != _TRACEPARENT_LEN):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return Parent(trace_id, span_id, bool(int(flags_hex, 16) & SAMPLED_FLAG))


def find_traceparent(metadata: Iterable[tuple[str, str | bytes]]) -> Parent | None:
    """The parent a call's metadata names (its first ``traceparent``), or None."""
    for key, value in metadata:
        if key == "traceparent":
            return parse_traceparent(value)
    return None


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


class CallTrace:
    """One call's trace (see the module docstring)."""

    __slots__ = ("bytes_in", "bytes_out", "maker", "parent", "peer", "span", "started_ns", "trace_id")

    def __init__(self, trace_id: int, parent: Parent | None, started_ns: int) -> None:
        self.trace_id = trace_id  # 0: none (not sampled, and the client sent none)
        self.parent = parent
        self.started_ns = started_ns  # time.time_ns() when the request was complete
        self.span: Any = None  # the call's OpenTelemetry span, if sampled (prism.tracing.spans)
        self.maker: Spans | None = None  # what made it, and makes its children
        self.bytes_in = 0  # request messages' bytes
        self.bytes_out = 0  # response messages' bytes
        self.peer = ""  # the client's address (for the access log)

    @property
    def trace_id_hex(self) -> str | None:
        return f"{self.trace_id:032x}" if self.trace_id else None


# The call running in this context (a call's task, or the reader's step
# that answers it); never set while tracing is off.
current: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar("prism_call_trace", default=None)


class Spans(Protocol):
    """What makes child spans (``prism.tracing.spans.OtelSpans``)."""

    def child(self, parent: Any, name: str, attributes: dict[str, Any]) -> AbstractContextManager[Any]: ...

    def start_forward(self, trace: CallTrace, namespace: str) -> tuple[Any, str]:
        """A forwarding hop's span (its ``end_with(error)`` ends it) and the ``traceparent`` it sends."""
        ...


class _NoSpan(AbstractContextManager[None]):
    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()
# How many ``prism.tracing.spans.OtelSpans`` this process has open (one in a
# worker; 0: tracing off, and ``child`` returns at once).
makers = 0


def child(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A span for ``name`` under the current call's span (a queue's wait, a
    backend's statement), ended on leaving the ``with``; a no-op unless the
    current call is sampled."""
    if not makers:
        return _NO_SPAN
    trace = current.get()
    if trace is None or trace.span is None or trace.maker is None:
        return _NO_SPAN
    return trace.maker.child(trace.span, name, attributes)


Metadata = list[tuple[str, Any]]


def forwarding(metadata: Metadata, namespace: str) -> tuple[Any, Metadata]:
    """A span for sending the current call to another worker (None unless
    the call is sampled), and the metadata to send: its ``traceparent``
    names that span, so the owner's span continues the trace under it."""
    if not makers:
        return None, metadata
    trace = current.get()
    if trace is None or trace.span is None or trace.maker is None:
        return None, metadata
    span, traceparent = trace.maker.start_forward(trace, namespace)
    return span, [*(entry for entry in metadata if entry[0] != "traceparent"), ("traceparent", traceparent)]


def end(span: Any, error: BaseException | None = None) -> None:
    """End a span ``forwarding`` made (failed if ``error``)."""
    if span is not None:
        span.end_with(error)


class TraceIdFilter(logging.Filter):
    """Adds the current call's trace id to each log record (``trace_id``;
    ``prism.log.JsonFormatter`` writes it): installed while tracing is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace = current.get()
        if trace is not None and trace.trace_id:
            record.trace_id = trace.trace_id_hex
        return True


def install_log_filter() -> None:
    """Put ``TraceIdFilter`` on the handlers of prism's logger (once)."""
    for handler in logging.getLogger("prism").handlers:
        if not any(isinstance(f, TraceIdFilter) for f in handler.filters):
            handler.addFilter(TraceIdFilter())
