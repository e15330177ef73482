"""What every connection of a server shares: ``ServerSettings``.

The method table, the limits, the worker's connections and calls in flight,
the drain, the hooks the worker sets (hand-off, observer, security). One
object per serving process; ``prism.rpc.server.Connection`` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from prism.config.limits import Http2Config
from prism.errors import StatusCode
from prism.limits.admission import Admission
from prism.rpc.budget import WorkerBudget
from prism.rpc.call import Call, CallContext
from prism.rpc.methods import Method, MethodTable
from prism.security.runtime import Security

if TYPE_CHECKING:
    from prism.rpc.accept_share import AcceptShare
    from prism.rpc.held import Held
    from prism.rpc.keepalive import TimerHeap
    from prism.tracing.calls import CallTracing

_DEFAULT_HTTP2 = Http2Config()

# Called once per answered call, with how long it took (seconds).
Observer = Callable[[CallContext, Method, StatusCode, float], None]

# How a forwarded call's answer comes back (``ForwardNow``): the response
# bytes (and None), or (None and) the error to answer with.
Answered = Callable[[bytes | None, Exception | None], None]


def _holds_all(_namespace: str) -> bool:
    return True


class ForwardNow(Protocol):
    """Sends a unary call for another tenant's namespace to its owner
    without a task (``prism.router.remote.Forwarding.forward_now``)."""

    def __call__(self, call: Call, request: object, answered: Answered) -> bool:
        """True if the call went (``answered`` is called once, later);
        False: the call takes the handler's path (a namespace held here or
        nowhere, no owner serving yet...)."""
        ...


class Handoff(Protocol):
    """Moves a connection that names another tenant to a worker of that tenant."""

    async def hand_off(self, first: Call, stream: trio.SocketStream, buffered: bytes, answered: int) -> bool:
        """True if another worker took the socket (and ``buffered``) over."""
        ...

    def elsewhere(self) -> bool:
        """Whether another tenant has workers (if not, a connection is served where it lands)."""
        ...

    async def hand_off_tls(self, server_name: str, stream: trio.SocketStream) -> bool:
        """The same for a TLS connection, by its ClientHello's server name, before the handshake."""
        ...


class Served(Protocol):
    """A connection as the settings see it (``prism.rpc.server.Connection``)."""

    def start_drain(self) -> None: ...


class ServerSettings:
    """What every connection of a server shares."""

    def __init__(
        self,
        methods: MethodTable,
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        compression_min_bytes: int = 1024,
        compress_accepted: bool = False,
        max_concurrent_streams: int = 100,
        max_header_list_bytes: int = 16 * 1024,
        http2: Http2Config = _DEFAULT_HTTP2,
        max_inflight: int = 4096,
        drain_timeout_s: float = 10.0,
    ) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        # Answers this large or more are compressed: those of compressed calls,
        # and with ``compress_accepted`` any call's whose client accepts it
        # (prism.rpc.compression).
        self.compression_min_bytes = compression_min_bytes
        self.compress_accepted = compress_accepted
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_bytes = max_header_list_bytes
        self.http2 = http2  # per connection: timers, buffers, headers ([http2])
        # Calls whose handler is running or about to (a task each, streaming
        # calls while open), on every connection of this worker: a counter, so
        # admission costs a comparison, not a sum over the connections.
        self.max_inflight = max_inflight
        self.inflight = 0
        # Of those, the streaming calls: a subscription's task lives as long
        # as its stream, queued for nothing; the overload shedder counts the
        # others (prism.limits.shed).
        self.streams_open = 0
        # How long a connection that has said GOAWAY for its age (or a
        # worker's drain) waits for its calls: the server's graceful_timeout_s.
        self.drain_timeout_s = drain_timeout_s
        # Connections accepted by this process and not yet closed (TLS
        # handshakes included): max_connections is checked against it.
        self.accepted = 0
        self.connections: set[Served] = set()
        self.draining = False
        self.accept_scope: trio.CancelScope | None = None
        self.handoff: Handoff | None = None
        # The connections this worker and its tenant's other workers hold,
        # shared (prism.rpc.accept_share); None: this process accepts alone.
        self.accept_share: AcceptShare | None = None
        # The connections' timers, while a listener serves them (prism.rpc.listen).
        self.timer_heap: TimerHeap | None = None
        # The connections whose refusals are held a moment, likewise (prism.rpc.held).
        self.held: Held | None = None
        # Request and response bytes held for every connection (prism.rpc.budget).
        self.buffers = WorkerBudget(http2.max_worker_buffer_bytes)
        # Bytes read and written on every connection, ever (prism.workers.heap
        # tells from it whether large messages are still coming and going).
        self.traffic_bytes = 0
        # When the next read of a connection resting for a quota's refusal may
        # be made (trio's clock; prism.rpc.server.LIMITED_READ_GAP_S).
        self.limited_read_at = -math.inf

        # Called once per answered call (metrics); None costs nothing.
        self.observer: Observer | None = None
        # Traces and the access log ([tracing]); None (off) costs nothing:
        # a connection tests it once, when it is made (prism.tracing.traced).
        self.tracing: CallTracing | None = None
        self.forward_now: ForwardNow | None = None
        # Whether this process has a namespace open (set with forward_now):
        # a call for one it holds is never forwarded.
        self.holds: Callable[[str], bool] = _holds_all
        # Called when the drain starts: long-lived streams (PubSub's
        # Subscribe) end themselves so that the drain need not wait for them.
        self.on_drain: list[Callable[[], None]] = []
        # TLS and who may call: rebuilt by the worker from the routing table.
        self.security = Security()
        # Quotas and overload shedding (prism.limits): the worker sets which
        # namespaces it holds and their limits; until then it admits all.
        self.admission = Admission()

    @property
    def unary_inflight(self) -> int:
        """The calls in flight that are not streaming: what the overload shedder counts."""
        return self.inflight - self.streams_open

    def start_drain(self) -> None:
        """Stop accepting, GOAWAY on every connection: in-flight calls finish, new ones go elsewhere."""
        self.draining = True
        for hook in self.on_drain:
            hook()
        if self.accept_scope is not None:
            self.accept_scope.cancel()
        for conn in list(self.connections):
            conn.start_drain()

    @property
    def active_calls(self) -> int:
        """Calls in flight on this worker (its heartbeat reports them)."""
        return self.inflight
