"""The trio side of the gRPC server: a connection's stream, tasks, deadlines.

One ``Connection`` owns one byte stream. Its reader task feeds
``GrpcProtocol`` and starts a task per call; its writer task is the only code
that writes to the stream, and it writes everything the protocol has queued
in one ``send_all`` after each scheduling batch, so that concurrent calls on a
connection share writes. ``failure_status`` is the error boundary: the one
place where exceptions become a ``grpc-status`` (for calls forwarded here from
another worker too). Accepting connections is ``prism.rpc.listen``'s job,
and a TLS connection's handshake ``prism.rpc.handshake``'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import trio
from google.protobuf.message import DecodeError

from prism.errors import PrismError, StatusCode
from prism.rpc.call import Call, CallContext
from prism.rpc.methods import CLIENT_STREAM, SEND_HEADERS, UNARY, Method, MethodTable
from prism.rpc.protocol import CALL_END, CALL_MESSAGE, CALL_RESET, CALL_START, GrpcProtocol
from prism.security.identity import PeerIdentity
from prism.security.runtime import Security

log = logging.getLogger("prism.rpc")

_READ_SIZE = 65536
# A connection's first request is looked at (for hand-off) within these bounds;
# past them it is served where it landed.
_SNIFF_TIMEOUT_S = 1.0
_SNIFF_LIMIT_BYTES = 64 * 1024
# Streaming responses wait for the client to read once this much is queued.
_STREAM_HIGH_WATER = 256 * 1024
# A connection error's GOAWAY gets this long to be written (as in Go's net/http2).
_GOAWAY_GRACE_S = 1.0
# An enum member read from its class is an attribute lookup through the enum
# machinery, several times a dict lookup's cost: the unary path reads this.
_OK = StatusCode.OK


# Called once per answered call, with how long it took (seconds).
Observer = Callable[[CallContext, Method, StatusCode, float], None]


class Handoff(Protocol):
    """Moves a connection that names another tenant to a worker of that tenant."""

    async def hand_off(self, first: Call, stream: trio.SocketStream, buffered: bytes) -> bool:
        """True if another worker took the socket (and ``buffered``) over."""
        ...

    async def hand_off_tls(self, server_name: str, stream: trio.SocketStream) -> bool:
        """The same for a TLS connection, by its ClientHello's server name, before the handshake."""
        ...


class ServerSettings:
    """What every connection of a server shares."""

    def __init__(
        self,
        methods: MethodTable,
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_concurrent_streams: int = 100,
    ) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.connections: set[Connection] = set()
        self.draining = False
        self.accept_scope: trio.CancelScope | None = None
        self.handoff: Handoff | None = None
        # Per connection already held, how long to wait before accepting the
        # next one (0: this process accepts alone; see prism.rpc.listen).
        self.accept_backoff_s = 0.0
        # Called once per answered call (metrics); None costs nothing.
        self.observer: Observer | None = None
        # Called when the drain starts: long-lived streams (PubSub's
        # Subscribe) end themselves so that the drain need not wait for them.
        self.on_drain: list[Callable[[], None]] = []
        # TLS and who may call: rebuilt by the worker from the routing table.
        self.security = Security()

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
        return sum(len(c.proto.calls) for c in self.connections)


class Connection:
    """One client connection: the reader, the writer and the calls' tasks. ``peer``: the client's
    "host:port"; ``peer_principal``: the identity of its verified TLS client certificate, or None."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        settings: ServerSettings,
        *,
        handed_in: bytes | None = None,
        peer: str = "",
        peer_principal: str | None = None,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.peer_principal = peer_principal
        self._handed_in = handed_in
        self.settings = settings
        self.proto = GrpcProtocol(
            max_message_bytes=settings.max_message_bytes,
            max_concurrent_streams=settings.max_concurrent_streams,
            clock=trio.current_time,
        )
        self._scopes: dict[int, trio.CancelScope] = {}
        self._inbound: dict[int, trio.MemorySendChannel[bytes]] = {}
        self._dirty = False
        self._lot = trio.lowlevel.ParkingLot()
        self._window_lot = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self.identity = PeerIdentity(peer)  # what the access check remembers of it

    async def serve(self) -> None:
        """Serve until the peer leaves, the protocol breaks, or drain ends."""
        self.settings.connections.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.proto.initiate()
                events: list[tuple[int, Call | None]] | None = []
                if self._handed_in is not None:
                    # The worker that accepted this connection sent our preface
                    # (the same bytes) and read these: take over from there.
                    self.proto.data_to_send()
                    events = self.proto.receive_data(self._handed_in)
                elif self.settings.handoff is not None and isinstance(self.stream, trio.SocketStream):
                    # (TLS is not sniffed: its ClientHello placed it, prism.rpc.handshake.)
                    events = await self._sniff(self.settings.handoff)
                    if events is None:
                        return  # handed to another worker, which now owns the socket
                if self.settings.draining:  # accepted just before the drain began
                    self.proto.start_drain()
                nursery.start_soon(self._writer)
                if self._dispatch(events or []):
                    await self._reader()
                if not self._closing:
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away: nothing left to answer
        finally:
            self.settings.connections.discard(self)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def _sniff(self, handoff: Handoff) -> list[tuple[int, Call | None]] | None:
        """Read up to the first request, and hand the connection to another
        worker if that request names another tenant. Returns the events read
        (to serve here), or None once handed off.

        Only our SETTINGS preface goes out before the decision (grpcio waits
        for it before sending a request); nothing the receiving worker would
        send differently. Not even a SETTINGS ACK: that worker replays the
        bytes read here and acknowledges them itself.
        """
        assert isinstance(self.stream, trio.SocketStream)
        await self.stream.send_all(self.proto.data_to_send())
        buffered = bytearray()
        events: list[tuple[int, Call | None]] = []
        with trio.move_on_after(_SNIFF_TIMEOUT_S):
            while len(buffered) < _SNIFF_LIMIT_BYTES:
                data = await self.stream.receive_some(_READ_SIZE)
                if not data:
                    break
                buffered += data
                events += self.proto.receive_data(data)
                first = next((c for k, c in events if k == CALL_START), None)
                if first is not None:
                    if await handoff.hand_off(first, self.stream, bytes(buffered)):
                        return None
                    break
                if self.proto.broken:
                    break
        return events

    def _dispatch(self, events: list[tuple[int, Call | None]]) -> bool:
        """Act on protocol events; False once the connection is finished."""
        proto = self.proto
        for kind, call in events:
            if call is None:  # CONNECTION_CLOSED
                if proto.broken:
                    self._closing = True
                    self.wake()
                    # A flooding peer may never read the GOAWAY: close anyway.
                    assert self._nursery is not None
                    self._nursery.cancel_scope.deadline = trio.current_time() + _GOAWAY_GRACE_S
                    return False
                self._maybe_close()
            elif kind == CALL_END:
                self._on_end(call)
            elif kind == CALL_START:
                self._on_start(call)
            elif kind == CALL_MESSAGE:
                self._on_message(call)
            elif kind == CALL_RESET:
                self._on_reset(call)
        self.wake()
        if self._window_lot:
            # Streaming handlers waiting for the client to read go on.
            self._window_lot.unpark_all()
        if proto.peer_gone:
            self._maybe_close()
        return True

    def start_drain(self) -> None:
        self.proto.start_drain()
        self.wake()
        self._maybe_close()

    def wake(self) -> None:
        """Ask the writer to flush what the protocol has queued."""
        if not self._dirty:
            self._dirty = True
            self._lot.unpark()

    def _maybe_close(self) -> None:
        # A connection that the client or we have said goodbye to closes once
        # its last call is answered; the writer flushes first.
        if (self.proto.draining or self.proto.peer_gone) and self.proto.idle:
            self._closing = True
            self.wake()

    async def _writer(self) -> None:
        proto = self.proto
        send_all = self.stream.send_all
        while True:
            if not self._dirty:
                await self._lot.park()
            self._dirty = False
            data = proto.data_to_send()
            if data:
                await send_all(data)
            if self._closing and not self._dirty:
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return

    async def _reader(self) -> None:
        receive_data = self.proto.receive_data
        receive_some = self.stream.receive_some
        while True:
            data = await receive_some(_READ_SIZE)
            if not data or not self._dispatch(receive_data(data)):
                return

    # -- call lifecycle --------------------------------------------------------

    def _on_start(self, call: Call) -> None:
        if call.timeout_s is not None:
            call.deadline = trio.current_time() + call.timeout_s
        method = self.settings.methods.get(call.path)
        if method is None:
            self.proto.send_error(
                call, StatusCode.UNIMPLEMENTED, f"unknown method {call.path.decode('latin-1')}"
            )
            return
        if method.kind == CLIENT_STREAM:
            send, receive = trio.open_memory_channel[bytes](math.inf)
            self._inbound[call.stream_id] = send
            assert self._nursery is not None
            self._nursery.start_soon(self._run_streaming, call, method, _requests(receive, method))

    def _on_message(self, call: Call) -> None:
        channel = self._inbound.get(call.stream_id)
        if channel is not None:
            channel.send_nowait(call.messages.pop())
        elif len(call.messages) > 1:
            self.proto.send_error(
                call, StatusCode.INVALID_ARGUMENT, "a unary request must carry exactly one message"
            )

    def _on_end(self, call: Call) -> None:
        call.started = time.perf_counter()
        channel = self._inbound.pop(call.stream_id, None)
        if channel is not None:
            channel.close()
            return
        method = self.settings.methods.get(call.path)
        if method is None:
            return
        if len(call.messages) != 1:
            self.proto.send_error(
                call,
                StatusCode.INVALID_ARGUMENT,
                f"a unary request must carry exactly one message, got {len(call.messages)}",
            )
            return
        assert self._nursery is not None
        if method.kind == UNARY:
            if method.now is None or not self._answer_now(call, method):
                self._nursery.start_soon(self._run_unary, call, method)
        else:
            self._nursery.start_soon(self._run_streaming, call, method, None)

    def _answer_now(self, call: Call, method: Method) -> bool:
        """Answer a unary call whose answer needs no waiting (``Method.now``)
        here, in the reader's step, without a task, a cancel scope or a
        coroutine: a task per call was a tenth of a shared-cache hit's CPU.
        A call the access check refuses is answered here too."""
        try:
            call.request = method.decode(call.messages[0])
        except Exception:
            return False  # the handler's path answers with the decoding error
        try:
            if self.settings.security.secured:
                self._authorize(call, method, call.request)
        except PrismError as exc:
            self._answer_failure(call, method, exc)
        else:
            answer = method.answer_now(call.request, call)
            if answer is None:
                return False
            self.proto.send_unary(call, answer)
            self._observe(call, method, _OK)
        if self.proto.draining:
            self._maybe_close()
        return True

    def _on_reset(self, call: Call) -> None:
        scope = self._scopes.get(call.stream_id)
        if scope is not None:
            scope.cancel()
        channel = self._inbound.pop(call.stream_id, None)
        if channel is not None:
            channel.close()

    async def _run_unary(self, call: Call, method: Method) -> None:
        sid = call.stream_id
        proto = self.proto
        try:
            with trio.CancelScope(deadline=call.deadline) as scope:
                self._scopes[sid] = scope
                request = call.request if call.request is not None else method.decode(call.messages[0])
                if self.settings.security.secured and call.caller is None:  # else _answer_now checked it
                    self._authorize(call, method, request)
                proto.send_unary(call, await method.invoke(request, call))
                status = _OK
            if scope.cancelled_caught:
                status = StatusCode.DEADLINE_EXCEEDED if not call.done else StatusCode.CANCELLED
                proto.send_error(call, status, "deadline exceeded")
            self._observe(call, method, status)
        except Exception as exc:
            self._answer_failure(call, method, exc)
        finally:
            del self._scopes[sid]
            self.wake()
            if proto.draining or proto.peer_gone:
                self._maybe_close()

    async def _run_streaming(self, call: Call, method: Method, requests: AsyncIterator[Any] | None) -> None:
        sid = call.stream_id
        proto = self.proto
        try:
            with trio.CancelScope(deadline=call.deadline) as scope:
                self._scopes[sid] = scope
                if requests is None:
                    arg: Any = method.decode(call.messages[0])
                    if self.settings.security.secured:
                        self._authorize(call, method, arg)
                else:
                    arg = requests
                responses: AsyncIterator[Any] = method.handler(arg, call)
                # Closed here, not by the garbage collector, whatever ends the
                # call: a handler's ``finally``/``async with`` (a PubSub
                # subscription giving back unacked messages) runs in this task.
                async with contextlib.aclosing(responses):  # type: ignore[type-var]
                    async for response in responses:
                        if response is SEND_HEADERS:
                            proto.send_headers(call)
                            self.wake()
                            continue
                        proto.send_message(call, response.SerializeToString())
                        self.wake()
                        while call.pending_bytes > _STREAM_HIGH_WATER and not call.done:
                            await self._window_lot.park()
                proto.send_status(call, StatusCode.OK)
            if scope.cancelled_caught:
                proto.send_error(call, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except Exception as exc:
            self._answer_failure(call, method, exc)
        finally:
            del self._scopes[sid]
            self._inbound.pop(sid, None)
            self.wake()
            if proto.draining or proto.peer_gone:
                self._maybe_close()

    def _authorize(self, call: Call, method: Method, request: Any) -> None:
        """The access check (``prism.security.runtime``) of a call on this connection,
        every call path's: sets ``call.caller``, or raises Unauthenticated or PermissionDenied."""
        if method.action is not None:  # else open to every caller
            call.caller = self.settings.security.check_call(
                call, method, request.namespace, self.identity, self.peer_principal
            )

    def _answer_failure(self, call: Call, method: Method, exc: Exception) -> None:
        status, message = failure_status(exc, method)
        self.proto.send_error(call, status, message)
        self._observe(call, method, status)

    def _observe(self, call: Call, method: Method, status: StatusCode) -> None:
        observer = self.settings.observer
        if observer is not None:
            observer(call, method, status, time.perf_counter() - call.started)


def failure_status(exc: Exception, method: Method) -> tuple[StatusCode, str]:
    """The error boundary: PrismError -> its status; a bug -> INTERNAL, logged once."""
    if isinstance(exc, PrismError):
        return exc.grpc_status, str(exc)
    if isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        return failure_status(exc.exceptions[0], method)  # one error, wrapped by a nursery
    if isinstance(exc, DecodeError):
        return StatusCode.INVALID_ARGUMENT, f"malformed request message: {exc}"
    log.error("unexpected error in %s", method.name, exc_info=exc)
    return StatusCode.INTERNAL, "internal error"


async def _requests(receive: trio.MemoryReceiveChannel[bytes], method: Method) -> AsyncIterator[Any]:
    async with receive:
        async for raw in receive:
            yield method.decode(raw)
