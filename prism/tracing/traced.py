"""A connection's calls, traced: the wrappers ``CallTracing`` puts on a
``prism.rpc.server.Connection`` when tracing is on.

They are instance attributes that shadow the class's methods, set once per
connection: with tracing off no connection has them and a call runs exactly
the code it ran before (no test per call). On, a call's request end
(``_on_end``; a client-streaming call's start) makes its trace current
around the step that answers it or starts its task (which inherits it), and
with the access log, the answers count their bytes.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from prism.tracing import context

if TYPE_CHECKING:
    from prism.rpc.call import Call
    from prism.rpc.calls import Calls
    from prism.tracing.calls import CallTracing


def instrument(conn: Calls, tracing: CallTracing, peer: str) -> None:
    """Wire ``tracing`` into ``conn``'s call steps and answers (``peer``: its client's address)."""
    on_start, on_end = conn._on_start, conn._on_end
    proto = conn.proto
    send_unary, send_message = proto.send_unary, proto.send_message
    enter, current = tracing.enter, context.current
    # Most calls: no traceparent, not sampled, no access log. They skip
    # ``enter`` (this is its outcome for them, drawn the same way).
    draw, ratio = random.random, tracing.config.sample_ratio
    untraced_unless_drawn = tracing.access is None

    def traced_on_start(call: Call) -> None:
        if call._inq is None:
            on_start(call)  # a unary request: its trace begins when it is complete
            return
        token = enter(call, peer)
        try:
            on_start(call)
        finally:
            if token is not None:
                current.reset(token)

    def traced_on_end(call: Call) -> None:
        if call._inq is not None:
            on_end(call)  # a client stream: traced from its start
            return
        drawn = False
        if untraced_unless_drawn and not call.metadata:
            if draw() >= ratio:
                call.trace = None
                on_end(call)
                return
            drawn = True
        token = enter(call, peer, drawn)
        try:
            on_end(call)
        finally:
            if token is not None:
                current.reset(token)

    def counted_unary(call: Call, payload: bytes) -> None:
        _count(call, payload)
        send_unary(call, payload)

    def counted_message(call: Call, payload: bytes) -> None:
        _count(call, payload)
        send_message(call, payload)

    conn._on_start = traced_on_start  # type: ignore[method-assign]
    conn._on_end = traced_on_end  # type: ignore[method-assign]
    if tracing.access is not None:  # the access log's bytes_out
        proto.send_unary = counted_unary  # type: ignore[method-assign]
        proto.send_message = counted_message  # type: ignore[method-assign]


def _count(call: Any, payload: bytes) -> None:
    trace = getattr(call, "trace", None)  # unset: answered before its request's end
    if trace is not None:
        trace.bytes_out += len(payload)
