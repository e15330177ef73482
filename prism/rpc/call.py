"""What a call is: the ``CallContext`` handlers see, and the HTTP/2 ``Call``.

A handler is ``async def Rpc(request, call)``. ``call`` is a ``CallContext``:
either a ``Call`` (a stream of a client's connection, read by
``GrpcProtocol``) or a ``ForwardedCall`` (``prism.router.remote``: a call
another worker forwarded here over nng). Handlers use only what both have.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from prism.rpc.pieces import Pieces


class Caller(NamedTuple):
    """Who made a call, as the access check (``prism.security``) established it."""

    # The token's subject or the client certificate's identity; None on a
    # call forwarded by a worker that ran no check (security was off there).
    principal: str | None
    address: str  # the client's address, for the audit log ("" if unknown)


class CallContext(Protocol):
    """A call as handlers, the observer and the forwarding policy see it."""

    # The service's namespace, set by the handler once it has read the
    # request (for metrics and logs); "" until then.
    namespace: str
    # Who made the call: set by the access check when security is on (a
    # forwarded call carries its sender's); None otherwise.
    caller: Caller | None

    @property
    def path(self) -> bytes:
        """``/package.Service/Method``, as it arrived in ``:path``."""
        ...

    @property
    def messages(self) -> list[bytes | bytearray | Pieces]:
        """The request messages, undecoded: a unary call's one message is
        ``messages[0]`` (``Pieces`` only for a method whose decoder takes them)."""
        ...

    @property
    def metadata(self) -> list[tuple[str, str | bytes]]:
        """Custom metadata: str values, bytes for ``-bin`` keys."""
        ...

    @property
    def deadline(self) -> float:
        """When the call must be answered, on trio's clock (``inf``: no deadline)."""
        ...

    @property
    def started(self) -> float:
        """When the request was complete (``time.perf_counter``), for the call's duration."""
        ...

    @property
    def forwarded(self) -> bool:
        """True if another worker forwarded this call here: it must not be forwarded again."""
        ...


class Call:
    """One gRPC call: the state of one HTTP/2 stream as the server sees it.

    The underscored fields belong to ``GrpcProtocol`` (prism.rpc.protocol);
    the rest is the ``CallContext`` handlers use, plus what the server needs.
    """

    __slots__ = (
        "_answer_encoding",
        "_charged",
        "_credit",
        "_encoding",
        "_failed",
        "_fresh",
        "_headers_sent",
        "_holds",
        "_inlen",
        "_inpos",
        "_inq",
        "_need",
        "_out",
        "_parts",
        "_trailers",
        "_wants",
        "authority",
        "caller",
        "deadline",
        "done",
        "half_closed",
        "judged",
        "messages",
        "metadata",
        "namespace",
        "opened",
        "path",
        "request",
        "started",
        "stream_id",
        "timeout_s",
        "trace",  # prism.tracing.context.CallTrace, set only while tracing is on
    )

    forwarded = False  # arrived on a client connection
    trace: Any  # (a slot) prism.tracing.context.CallTrace or None, set only while tracing is on

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.path = b""
        self.authority = b""
        self.deadline = float("inf")  # set by the server from timeout_s (its clock)
        self.metadata: list[tuple[str, str | bytes]] = []
        self.timeout_s: float | None = None
        self.messages: list[bytes | bytearray | Pieces] = []
        self.request: Any = None  # the decoded request, once the server has decoded it
        self.judged = False  # the shedder's door let it in as its headers were read
        # A request message that spans DATA frames (None: none under way): the
        # pieces of it that came (prism.rpc.inbound), how many bytes they
        # hold, and the whole message's size with its prefix once the prefix
        # is in (``_need``; 0 until then).
        self._parts: list[Any] | None = None
        self._inlen = 0
        self._need = 0
        # Of its pieces, the bytes that are views of the current read, and the
        # (read, bytes) it holds views of since (prism.rpc.inbound's ``_Read``).
        self._fresh = 0
        self._holds: list[Any] = []
        # A streaming request's bytes not yet taken by its handler (None: a
        # unary call), from ``_inpos`` on.
        self._inq: bytearray | None = None
        self._inpos = 0
        self.half_closed = False  # the client ended its side (END_STREAM)
        # Budget (prism.rpc.budget): request bytes charged (received, plus
        # window granted and not yet used, ``_credit``), and the window the
        # stream waits for (0: not waiting).
        self._charged = 0
        self._credit = 0
        self._wants = 0
        self._failed = False  # we already answered (with an error): ignore input
        # The request messages' grpc-encoding (None: identity), and the one
        # its answers are compressed with (None: sent as they are);
        # prism.rpc.compression.
        self._encoding: bytes | None = None
        self._answer_encoding: bytes | None = None
        self._headers_sent = False
        self._out = bytearray()  # outbound DATA waiting for flow-control window
        self._trailers: tuple[tuple[bytes, bytes], ...] | None = None
        self.done = False  # end of stream sent (or stream reset): nothing more to send
        self.opened = 0.0  # when its HEADERS were read (the server's clock: trio's)
        self.started = 0.0  # when the request was complete (perf_counter, for metrics)
        self.namespace = ""  # set by handlers, for metrics and logs
        self.caller: Caller | None = None  # set by the access check

    @property
    def pending_bytes(self) -> int:
        """Response bytes queued behind flow control."""
        return len(self._out)
