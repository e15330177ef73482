"""What the calls of a connection, and of a worker, may make the server hold.

``[http2] max_connection_buffer_bytes`` and ``max_worker_buffer_bytes``
bound the request and response bytes the server holds for clients: request
bytes received and not yet consumed (and the flow-control window granted
for bytes still to come), and response bytes queued behind the client's
flow control. ``GrpcProtocol`` charges and releases them; this module only
counts, and says whether there is room.

How the bytes stay bounded (``prism.rpc.protocol`` does each step):

- A stream starts with HTTP/2's default 64 KiB receive window. A request
  message larger than that gets window for the rest of itself, charged in
  full when its 5-byte prefix arrives, only if both budgets have room; else
  the stream waits (FIFO) and its sender is stopped by flow control until a
  release makes room. A reserved message always completes, so waiting
  streams cannot deadlock the ones holding the budget.
- A streaming request's window is topped up as its handler consumes
  messages, never beyond 64 KiB unconsumed (or one message): a fast sender
  is slowed by flow control, not buffered.
- A unary call's bytes are released when its answer is sent (or it ends
  otherwise); a connection's, all at once when it closes.
- A stream's initial window is charged when it opens (and what it did not
  use given back when it ends its side). New streams are refused
  (REFUSED_STREAM: gRPC clients retry them) unless both budgets have room
  for one whole message (max_message_bytes) besides what they hold: then the
  open streams' initial windows plus any one message always fit, so the
  stream at the head of the wait can always be granted once the reserved
  messages before it are answered. An answer that does not fit
  while the connection already holds undelivered output is
  RESOURCE_EXHAUSTED naming the limit; a streaming handler is not asked for
  its next message until its output has drained.

The connection window itself is handed back as bytes arrive: every byte
that arrives is accounted above (or discarded, on a closed stream), so the
per-stream windows and the reservations are what bound a connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

# What a stream may send before anything is granted (RFC 9113's initial
# SETTINGS_INITIAL_WINDOW_SIZE, which the server advertises unchanged).
INITIAL_STREAM_WINDOW: Final = 65_535


class WorkerBudget:
    """The bytes held for every connection of one worker, against ``max_worker_buffer_bytes``."""

    __slots__ = ("held", "limit", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        # Connections with streams waiting for room, each with what to call
        # once there may be some (their protocol's retry).
        self.waiting: dict[ConnectionBudget, Callable[[], None]] = {}

    def released(self) -> None:
        if self.waiting and self.held < self.limit:
            for retry in list(self.waiting.values()):
                retry()


class ConnectionBudget:
    """The bytes held for one connection, against ``max_connection_buffer_bytes``;
    every charge and release is also the worker's."""

    __slots__ = ("closed", "held", "limit", "worker")

    def __init__(self, limit: int, worker: WorkerBudget) -> None:
        self.limit = limit
        self.worker = worker
        self.held = 0
        self.closed = False

    def room(self, n: int) -> bool:
        """Whether ``n`` more bytes fit in both budgets."""
        return self.held + n <= self.limit and self.worker.held + n <= self.worker.limit

    def full(self, extra: int = 0) -> str | None:
        """The limit (its config name) that ``extra`` more bytes would pass,
        or that is reached; None if neither."""
        if self.held + extra > self.limit or self.held >= self.limit:
            return "max_connection_buffer_bytes"
        if self.worker.held + extra > self.worker.limit or self.worker.held >= self.worker.limit:
            return "max_worker_buffer_bytes"
        return None

    def refuses(self, admit: int, output: int, unwritten: int) -> str | None:
        """Why a new stream may not open (the limit's config name), or None.
        ``admit``: what it may bring (a whole message); ``output``: of what is
        held, the answers queued behind the client's flow control;
        ``unwritten``: answers queued for the socket, not charged. Room for a
        whole message is needed beside the request bytes held (what keeps the
        reservations deadlock-free); answers, which drain as the client reads,
        only must not have filled the budget."""
        if self.held - output + admit > self.limit or self.held + unwritten >= self.limit:
            return "max_connection_buffer_bytes"
        if self.worker.held + admit > self.worker.limit:
            return "max_worker_buffer_bytes"
        return None

    def charge(self, n: int) -> None:
        self.held += n
        if not self.closed:
            self.worker.held += n

    def release(self, n: int) -> None:
        if n:
            self.held -= n
            if not self.closed:
                self.worker.held -= n
                self.worker.released()

    def close(self) -> None:
        """The connection is gone: what it held goes back to the worker."""
        if not self.closed:
            self.closed = True
            self.worker.waiting.pop(self, None)
            self.worker.held -= self.held
            self.worker.released()


def unlimited() -> ConnectionBudget:
    """A budget that never fills (a protocol used alone, in tests and previews)."""
    return ConnectionBudget(1 << 62, WorkerBudget(1 << 62))
