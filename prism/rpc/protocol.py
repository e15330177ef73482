"""gRPC over HTTP/2, sans I/O.

``GrpcProtocol`` wraps one server-side ``h2`` connection. Feed it bytes with
:meth:`GrpcProtocol.receive_data`; it answers a list of ``(kind, call)``
events. Answer calls with the ``send_*`` methods and drain the bytes to write
with :meth:`GrpcProtocol.data_to_send`. No sockets, no trio: the trio server
(``server.py``) owns those, and passes in the clock the flood limits read.

What this layer decides itself, so that every server gets it right:
request header checks (RFC 9113's in ``headers``, a malformed request reset
with PROTOCOL_ERROR; then method, path, content-type -> HTTP 415, grpc-timeout),
message framing with the size limit checked on the 5-byte prefix (a lying
length is refused before anything is allocated for it), the concurrent-call
limit (REFUSED_STREAM for the extra stream only), outbound flow control, and
the HTTP/2 flood limits (``prism.rpc.flood``: GOAWAY(ENHANCE_YOUR_CALM)).
The cheap paths for the frames of ordinary calls (reading a request, writing
a successful unary answer from cached header blocks) are ``h2conn``'s.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState

from prism import metrics
from prism.errors import StatusCode
from prism.rpc.budget import INITIAL_STREAM_WINDOW, ConnectionBudget, unlimited
from prism.rpc.call import Call
from prism.rpc.compression import ACCEPT_ENCODING, ENCODINGS, IDENTITY, accepts, preferred
from prism.rpc.flood import Flood, FloodGuard
from prism.rpc.h2conn import (
    DATA_READ,
    HEADERS_READ,
    RESPONSE_HEADERS,
    TRAILERS_OK,
    WINDOW_READ,
    PlainFrame,
    ServerConnection,
)
from prism.rpc.h2send import ENCODED_RESPONSE_HEADERS, Chunk
from prism.rpc.headers import parse_timeout
from prism.rpc.hpack_cache import FixedBlockEncoder
from prism.rpc.inbound import CALL_END as CALL_END  # (event kinds of receive_data, as the others)
from prism.rpc.inbound import CALL_MESSAGE as CALL_MESSAGE
from prism.rpc.inbound import Requests
from prism.rpc.refuse_read import Refusing, refuse_leading
from prism.rpc.respond import Responses

# Event kinds returned by receive_data.
CALL_START: Final = 0  # headers accepted; call.path, metadata, timeout_s set
# CALL_MESSAGE = 1: call.messages grew by one (a streaming call: its buffer did)
# CALL_END = 2: the client half-closed: call.messages is complete
CALL_RESET: Final = 3  # the client reset the stream: cancel its work
CONNECTION_CLOSED: Final = 4  # peer went away or broke the protocol (call is None)
Events = list[tuple[int, Call | None]]  # (kind, call) in the order they happened
Trailers = tuple[tuple[bytes, bytes], ...]

_RESERVED_HEADERS: Final = frozenset(
    (b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding")
)
# The connection's receive window: handed back as bytes arrive (prism.rpc.budget).
_CONNECTION_WINDOW: Final = 4 * 1024 * 1024


class GrpcProtocol(Requests, Responses):
    """The gRPC server side of one HTTP/2 connection (input here, answers in ``Responses``)."""

    def __init__(
        self,
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_concurrent_streams: int = 100,
        initial_window_bytes: int = INITIAL_STREAM_WINDOW,
        max_header_list_bytes: int = 16 * 1024,
        clock: Callable[[], float] = time.monotonic,
        budget: ConnectionBudget | None = None,
        streaming_paths: AbstractSet[bytes] = frozenset(),
        compression_min_bytes: int = 1024,
        compress_accepted: bool = False,
        piecewise_paths: AbstractSet[bytes] = frozenset(),
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # We check what gRPC needs ourselves (see _start_call); h2's
            # generic validation was a quarter of the per-call CPU.
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        s = h2.settings.SettingCodes
        self._h2 = ServerConnection(
            config,
            max_header_list_bytes,
            FixedBlockEncoder((RESPONSE_HEADERS, TRAILERS_OK, *ENCODED_RESPONSE_HEADERS.values())),
            # Sent in our SETTINGS (initiate).
            (
                (s.MAX_CONCURRENT_STREAMS, max_concurrent_streams),
                (s.INITIAL_WINDOW_SIZE, initial_window_bytes),
                (s.MAX_HEADER_LIST_SIZE, max_header_list_bytes),
            ),
        )
        self.max_message_bytes = max_message_bytes
        # Answers of compressed calls this large or more are compressed (prism.rpc.compression).
        self.compression_min_bytes = compression_min_bytes
        # Those of uncompressed calls too, if their client accepts gzip or deflate.
        self.compress_accepted = compress_accepted
        self.max_concurrent_streams = max_concurrent_streams
        self._initial_window = initial_window_bytes
        self.max_header_list_bytes = max_header_list_bytes
        self.calls: dict[int, Call] = {}
        self._blocked: dict[int, Call] = {}  # calls with output waiting for window
        # What this connection holds against its buffer budgets (prism.rpc.budget).
        self.budget = budget if budget is not None else unlimited()
        self._waiting: dict[int, Call] = {}  # streams waiting for the budget to grant window
        self.out_held = 0  # response bytes queued behind the client's flow control
        self.writing = 0  # bytes the server is writing now (set by its writer)
        self.on_output: Callable[[], None] = _nothing
        self._admit_bytes = max(initial_window_bytes, max_message_bytes + 5)
        # The methods whose requests stream: their messages wait in the call's buffer.
        self._streaming_paths = streaming_paths
        # The methods whose decoders take a large message as its pieces (prism.rpc.pieces).
        self._piecewise_paths = piecewise_paths
        self._viewers: list[Call] = []  # calls that took views of this read (prism.rpc.inbound)
        self._unacked = 0  # DATA bytes of this read, given back to the connection's window at its end
        self._pinned = {}
        self._pinned_bytes = self._view_bytes = 0
        self.draining = False  # we sent GOAWAY: refuse new streams
        self.peer_gone = False  # the client sent GOAWAY
        self.broken = False  # protocol error: the connection is finished
        # Flood limits (prism.rpc.flood) on every frame h2 parses; ``clock``
        # (the server's) times the control-frame and idle-PING windows.
        self._clock = clock
        self._flood = self.flood = FloodGuard(self._h2, self.calls, clock)
        self._flood.watch()
        # Set by the connection while overload shedding is enabled: given a
        # new request's headers, the trailers of its refusal, or None to serve
        # it (``Call.judged``). A stream refused so never becomes a Call: its
        # answer is written here, its DATA dropped as any closed stream's.
        self.shed: Callable[[Any], Trailers | None] | None = None
        # The same for a whole read, while the door is shut (prism.rpc.refuse_read),
        # and whether it lets in all of a read's ``n`` new calls (then none is judged).
        self.refuse_read: Callable[[], Refusing | None] | None = None
        self.admit_read: Callable[[int], bool] | None = None
        # The same for quotas (set by the connection), given the read's frames too.
        self.limit: Callable[[Any, list[PlainFrame], int], Trailers | None] | None = None
        # How long the bytes being taken in waited unread in the kernel
        # (prism.rpc.arrival; set by the reader, 0.0 where it cannot tell), and
        # so when they reached the machine (``clock``'s; the door judges by it).
        self.arrival_lag = 0.0
        self.arrived = 0.0
        # The streams the plain path opened in the last read: many in a full
        # read, a backlog of small calls; few, a large message.
        self.read_opened = 0

    # -- connection ----------------------------------------------------------

    def initiate(self) -> None:
        """Queue the server preface (SETTINGS) and open the receive window."""
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(_CONNECTION_WINDOW - 65_535)

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def buffers_to_send(self) -> list[Chunk]:
        """What ``data_to_send`` gives, as buffers in order, uncopied (``prism.rpc.h2send``)."""
        return self._h2.buffers_to_send()

    def start_drain(self) -> None:
        """Send GOAWAY: streams already started finish, new ones are refused."""
        if self.draining or self.broken:
            return
        self.draining = True
        self._h2.close_connection()
        self._reopen_for_answers()

    def ping(self) -> None:
        """Queue a keepalive PING (``prism.rpc.keepalive``); its ACK comes back as any frame would."""
        self._h2.ping(b"keepaliv")

    def _reopen_for_answers(self) -> None:
        # After a GOAWAY in either direction h2 marks the whole connection
        # CLOSED and refuses to send anything, but HTTP/2 (RFC 9113 6.8) lets
        # the streams already started finish: python-hyper/h2#1181 (open
        # upstream). We keep h2's stream machinery usable and do the refusing
        # of new streams ourselves (draining / peer_gone).
        self._h2.state_machine.state = ConnectionState.SERVER_OPEN

    def _calm_down(self, debug: bytes) -> Events:
        """End the connection of a flooding peer: GOAWAY(ENHANCE_YOUR_CALM)
        naming the flood, and nothing more read from it. Its calls are the
        server's to cancel; none of this read's frames reach them."""
        self._h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, additional_data=debug)
        self._break()
        return [(CONNECTION_CLOSED, None)]

    def _break(self) -> None:
        # After a connection error h2 sends nothing more: every call is over,
        # so that a handler ending before the server cancels it sends nothing
        # (h2 would raise) and its answer is dropped.
        self.broken = True
        for call in self.calls.values():
            call.done = True
        self.calls.clear()
        self._blocked.clear()

    def discard(self) -> None:
        """The connection is gone: let go of every buffer now, and break the
        cycles between its objects. (Without this a connection's queued
        answers, and the connection itself, waited for the cycle collector:
        minutes on a busy worker.)"""
        self.budget.close()
        for call in self.calls.values():
            call._out = bytearray()
            call._parts = call._inq = None
            call.messages.clear()
        self.calls.clear()
        self._blocked.clear()
        self._waiting.clear()
        self._pinned.clear()
        self._h2.buffers_to_send()
        self._h2.let_go()
        self.on_output = _nothing  # (a bound method of the connection: a cycle)
        self.shed = self.limit = self.refuse_read = self.admit_read = None  # (the same)

    @property
    def idle(self) -> bool:
        return not self.calls

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> Events:
        """Feed bytes from the peer; return what happened to which call."""
        if self.broken:
            return []
        out: Events = []
        plain: list[PlainFrame] = []
        flood = self._flood
        conn = self._h2
        read = data
        try:
            if not (self.draining or self.peer_gone):
                if self.refuse_read is not None and (refusing := self.refuse_read()) is not None:
                    data = refuse_leading(self, data, refusing)
                data = conn.receive_plain(data, plain, flood)
            events = conn.receive_data(data) if data else []
        except h2.exceptions.ProtocolError:
            # h2 has queued a GOAWAY with the right error code already.
            self._break()
            out.append((CONNECTION_CLOSED, None))
            return out
        except Flood as exc:
            return self._calm_down(exc.debug)
        if conn.state_machine.state is ConnectionState.CLOSED:
            # The client's GOAWAY came in this read, after requests that are
            # answered below, some at once (a refusal): reopen before that.
            self._reopen_for_answers()
        self.read_opened = 0
        if plain:
            opened = 0
            shed, limit = self.shed, self.limit
            judged = shed is not None
            if judged and conn.plain_opened > 1 and self.admit_read and self.admit_read(conn.plain_opened):
                shed = None
            for index, (kind, sid, value, length, ended) in enumerate(plain):
                if kind == HEADERS_READ:
                    opened += 1
                    if (shed is not None and (refusal := shed(value)) is not None) or (
                        limit is not None and (refusal := limit(value, plain, index)) is not None
                    ):
                        self._refuse_read(sid, refusal)  # no Call: nothing else to let go
                        continue
                    conn.open_pending(sid)
                    self._start_call(sid, value, ended, out, judged)
                elif kind == DATA_READ:
                    self._on_data(sid, value, length, ended, out)
                elif kind == WINDOW_READ:
                    if self._blocked:
                        self._pump_blocked()
                else:  # H2_READ: the events of a frame h2 read among them
                    self._on_events(value, out)
            flood.opened += opened
            self.read_opened = opened
            conn.plain_opened = 0
            conn.materialize()  # (none left: each HEADERS read above took its own)
        if events:
            self._on_events(events, out)
        if self._unacked:
            self._h2.ack_connection(self._unacked)
            self._unacked = 0
        if self._viewers:  # pieces of messages took views of this read (prism.rpc.inbound)
            self._settle_views(read)
        return out

    def _on_events(self, events: list[h2.events.Event], out: Events) -> None:
        for ev in events:
            if type(ev) is h2.events.DataReceived:
                self._on_data(ev.stream_id, ev.data, ev.flow_controlled_length, False, out)
            elif type(ev) is h2.events.RequestReceived:
                self._start_call(ev.stream_id, ev.headers, False, out)
            elif type(ev) is h2.events.StreamEnded:
                self._end_call(ev.stream_id, out)
            elif type(ev) is h2.events.StreamReset:
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    self._finish(call)
                    out.append((CALL_RESET, call))
            elif type(ev) is h2.events.WindowUpdated or type(ev) is h2.events.RemoteSettingsChanged:
                self._pump_blocked()
            elif type(ev) is h2.events.ConnectionTerminated:
                self.peer_gone = True
                self._reopen_for_answers()
                if not self.calls:
                    out.append((CONNECTION_CLOSED, None))
            elif type(ev) is h2.events.TrailersReceived:
                # Clients do not send trailers in gRPC; END_STREAM comes with
                # them and is reported as StreamEnded, next. Malformed ones
                # (RFC 9113 8.1, judged by h2conn) make the request malformed.
                malformed = self._h2.malformed
                if malformed and malformed.pop(ev.stream_id, None) is not None:
                    self._reset_malformed(ev.stream_id, out)

    def _start_call(self, sid: int, headers: Any, ended: bool, out: Events, judged: bool = False) -> None:
        # Judged by prism.rpc.headers when its block was decoded; only
        # requests h2 read can be malformed (the plain path reads no others).
        malformed = self._h2.malformed
        if malformed and malformed.pop(sid, None) is not None:
            self._reset_new_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)  # RFC 9113 8.1.1
            return
        if self.draining or self.peer_gone or len(self.calls) >= self.max_concurrent_streams:
            self._reset_new_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        budget = self.budget
        # A stream is taken only while there is room for a whole message
        # besides what every open stream may already send: so some stream can
        # always complete its message (prism.rpc.budget); gRPC clients retry a
        # refused stream.
        refusal = budget.refuses(self._admit_bytes, self.out_held, self.unwritten())
        if refusal is not None:
            metrics.call_refused(refusal)
            self._reset_new_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        call = Call(sid)
        call.judged = judged
        call.opened = self._clock() - self.arrival_lag  # when its bytes reached the machine
        # What the stream may send before anything is granted is charged now
        # (as window granted, ``_credit``): the budget bounds what may come.
        call._charged = call._credit = self._initial_window
        budget.charge(self._initial_window)
        method = path = content_type = timeout = encoding = accept = None
        metadata = call.metadata
        for name, value in headers or ():
            n = bytes(name)
            if n[:1] == b":":
                if n == b":path":
                    path = value
                elif n == b":method":
                    method = value
                elif n == b":authority":
                    call.authority = bytes(value)
            elif n == b"content-type":
                content_type = value
            elif n == b"grpc-timeout":
                timeout = value
            elif n in _RESERVED_HEADERS:
                if n == b"grpc-encoding":
                    encoding = bytes(value)
                elif n == b"grpc-accept-encoding":
                    accept = value
            elif n.endswith(b"-bin"):
                try:
                    metadata.append((n.decode("ascii"), base64.b64decode(value + b"==")))
                except ValueError:
                    pass
            else:
                metadata.append((n.decode("latin-1"), bytes(value).decode("latin-1")))
        self.calls[sid] = call
        if method != b"POST":
            self._refuse_http(call, b"405", "only POST is supported")
            return
        if content_type is None or not bytes(content_type).startswith(b"application/grpc"):
            self._refuse_http(call, b"415", "content-type must be application/grpc")
            return
        if not path:
            self.send_error(call, StatusCode.UNIMPLEMENTED, "missing :path")
            return
        call.path = bytes(path)
        if call.path in self._streaming_paths:
            call._inq = bytearray()
        if timeout is not None:
            try:
                call.timeout_s = parse_timeout(bytes(timeout))
            except ValueError:
                self.send_error(call, StatusCode.INVALID_ARGUMENT, f"invalid grpc-timeout {timeout!r}")
                return
        if encoding is not None and encoding != IDENTITY:
            if encoding not in ENCODINGS:
                self.send_error(
                    call,
                    StatusCode.UNIMPLEMENTED,
                    f"grpc-encoding {encoding.decode('latin-1')} is not supported "
                    f"(supported: {ACCEPT_ENCODING.decode()})",
                    ((b"grpc-accept-encoding", ACCEPT_ENCODING),),
                )
                return
            call._encoding = encoding
            if accepts(accept, encoding):
                call._answer_encoding = encoding
        elif accept is not None and self.compress_accepted:
            call._answer_encoding = preferred(bytes(accept))
        out.append((CALL_START, call))
        if ended:
            self._end_call(sid, out)

    def _reset_malformed(self, sid: int, out: Events) -> None:
        self._reset_new_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        call = self.calls.pop(sid, None)
        if call is not None:  # its work is cancelled, as if the client had reset it
            call.done = True
            self._blocked.pop(sid, None)
            out.append((CALL_RESET, call))

    def _reset_new_stream(self, sid: int, code: h2.errors.ErrorCodes) -> None:
        stream = self._h2.streams.get(sid)
        if stream is not None and not stream.closed:  # else the client reset it already
            self._h2.reset_stream(sid, code)


def _nothing() -> None:
    pass
