"""``CallTracing``: one process's tracing of calls, built when ``[tracing]`` is on.

A call is followed from its complete request (``enter``) to its answer
(``end``, from the observer):

- It continues the client's trace when its metadata carries a well-formed
  W3C ``traceparent`` (sampled as the client says), and else is sampled
  with ``sample_ratio``. A sampled call gets a server span named
  ``package.Service/Method``, with ``rpc.*`` attributes and Prism's
  ``prism.namespace``, ``prism.tenant`` and ``prism.status``; its children
  are the forwarding hop, the queues' waits and the backend's statements
  (``prism.tracing.context.child``).
- While it runs, ``context.current`` holds its ``CallTrace``: log lines
  carry its trace id.
- With ``access_log``, its answer writes one access-log line.

An unsampled call whose client sent no ``traceparent`` costs a random draw
(plus, with the access log, its line).
"""

from __future__ import annotations

import contextvars
import random
import time
from typing import TYPE_CHECKING, Any

from prism.config.tracing import TracingConfig
from prism.errors import StatusCode
from prism.tracing import context
from prism.tracing.accesslog import AccessLog
from prism.tracing.context import CallTrace, find_traceparent

if TYPE_CHECKING:
    from prism.rpc.call import CallContext
    from prism.rpc.methods import Method
    from prism.tracing.spans import OtelSpans

_STATUS_NAMES = {status: status.name for status in StatusCode}
_OK = StatusCode.OK


class CallTracing:
    """See the module docstring. ``exporter``: where spans go instead of
    OTLP (a test's in-memory exporter); with it, spans are made even
    without ``otlp_endpoint``."""

    def __init__(self, config: TracingConfig, *, tenant: str, worker: str = "", exporter: Any = None) -> None:
        self.config = config
        self.tenant = tenant
        self._ratio = config.sample_ratio
        self._random = random.random
        self.spans: OtelSpans | None = None
        if config.spans or exporter is not None:
            from prism.tracing.spans import OtelSpans  # OpenTelemetry: only where spans are made

            self.spans = OtelSpans(config, tenant=tenant, worker=worker, exporter=exporter)
        self.access = AccessLog() if config.access_log else None
        context.install_log_filter()

    def begin(self, call: CallContext, peer: str, drawn: bool = False) -> CallTrace | None:
        """The trace of a call whose request is complete, or None if it has
        none (not sampled, no client trace, no access log). ``drawn``: the
        caller has drawn this call into the sample already."""
        parent = find_traceparent(call.metadata) if call.metadata else None
        spans = self.spans
        sampled = spans is not None and (
            parent.sampled if parent is not None else drawn or self._random() < self._ratio
        )
        if not sampled and parent is None and self.access is None:
            return None
        trace = CallTrace(parent.trace_id if parent is not None else 0, parent, time.time_ns())
        trace.peer = peer
        for message in call.messages:
            trace.bytes_in += len(message)
        if sampled:
            assert spans is not None
            service, _, name = call.path.decode("latin-1").lstrip("/").partition("/")
            trace.span = spans.start_call(
                f"{service}/{name}",
                trace,
                {
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": name,
                    "prism.tenant": self.tenant,
                },
            )
        return trace

    def enter(self, call: Any, peer: str, drawn: bool = False) -> contextvars.Token[CallTrace | None] | None:
        """``begin``, and the trace made current (reset it with the token).
        ``call.trace`` is set either way (None: untraced), so ``end`` reads a
        slot, not a missing one."""
        trace = call.trace = self.begin(call, peer, drawn)
        if trace is None:
            return None
        return context.current.set(trace)

    def end(self, call: CallContext, method: Method, status: StatusCode, seconds: float) -> None:
        """A call was answered: end its span, write its access-log line."""
        trace: CallTrace | None = getattr(call, "trace", None)  # unset: a call refused before its end
        if trace is None:
            return
        name = _STATUS_NAMES[status]
        span = trace.span
        if span is not None and self.spans is not None:
            trace.span = None  # ended once, whatever observes the call again
            self.spans.end_call(
                span,
                name,
                status is _OK,
                {
                    "prism.namespace": call.namespace,
                    "rpc.grpc.status_code": int(status),
                    "prism.status": name,
                },
            )
        access = self.access
        if access is not None:
            caller = call.caller
            access.write(
                peer=trace.peer or (caller.address if caller is not None else ""),
                principal=caller.principal if caller is not None else None,
                namespace=call.namespace,
                method=call.path.decode("latin-1"),
                status=name,
                seconds=seconds,
                bytes_in=trace.bytes_in,
                bytes_out=trace.bytes_out,
                trace_id=trace.trace_id_hex,
            )

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocks up to ``export_timeout_s``: run it in a thread)."""
        if self.spans is not None:
            self.spans.shutdown()
