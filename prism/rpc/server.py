"""The trio side of the gRPC server: a connection's stream, tasks, deadlines.

One ``Connection`` owns one byte stream. Its reader task feeds
``GrpcProtocol`` and starts a task per call; what the protocol queues to send
is written by the writer task, or by the reader after a read
(``prism.rpc.writing``). Exceptions become a ``grpc-status`` in one place,
``prism.rpc.boundary``; the connection's timers are ``prism.rpc.keepalive``'s, and
running its calls is ``prism.rpc.calls``'s.
Accepting connections is ``prism.rpc.listen``'s job, and a TLS connection's
handshake ``prism.rpc.handshake``'s.
"""

from __future__ import annotations

import logging
import os

import trio

from prism import metrics
from prism.limits import shed
from prism.rpc import arrival, keepalive, rest
from prism.rpc.boundary import shed_trailers
from prism.rpc.budget import ConnectionBudget
from prism.rpc.call import Call
from prism.rpc.calls import Calls
from prism.rpc.h2send import final_block
from prism.rpc.opening import close, closed_by_server, linger, opening_events
from prism.rpc.protocol import CALL_END, CALL_MESSAGE, CALL_RESET, CALL_START, GrpcProtocol
from prism.rpc.refuse_read import Refusing
from prism.rpc.settings import Handoff, Observer, ServerSettings
from prism.rpc.writing import Writing
from prism.security.identity import PeerIdentity
from prism.tracing.traced import instrument

__all__ = ["Connection", "Handoff", "Observer", "ServerSettings"]

log = logging.getLogger("prism.rpc")

_READ_SIZE = 16384
# A read that fills its buffer with a large message (it opened at most
# _LARGE_READ_OPENED streams) doubles the next one's size, up to this; one that
# fills less than a quarter halves it, down to _READ_SIZE. Large requests
# then arrive in a few reads instead of one per 64 KiB (a 1 MiB message took
# 16, each a trip through trio and the kernel); small calls keep reading
# 16 KiB, even from a backlog: grown for them, reads of up to 1 MiB on every
# connection of an overloaded worker (PostgreSQL at 2x its saturation) grew
# its RSS by a third, each read a few thousand calls taken in at once.
_MAX_READ_SIZE = 1 << 20
_LARGE_READ_OPENED = 8
# A read of more control frames than this (SETTINGS, PING...: ~14 us each in
# h2) makes the next reads this small, each a schedule point: a flood is
# taken in slices of ~6 ms, not in reads of 100 ms that the worker's other
# connections wait behind (a SETTINGS flood kept a neighbour's call waiting
# 150 ms), until it trips its limit (prism.rpc.flood).
_CONTROL_BURST = 256
_CONTROL_READ_SIZE = 4096
# Our GOAWAY gets this long to be read, the peer's last requests drained (as in Go's net/http2).
_GOAWAY_GRACE_S = 1.0


class Connection(Writing, Calls):
    """One client connection: the reader, the writer and the calls' tasks. ``peer``: the client's
    "host:port"; ``peer_principal``: the identity of its verified TLS client certificate, or None."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        settings: ServerSettings,
        *,
        handed_in: tuple[bytes, int] | None = None,
        received: bytes = b"",
        handshake_by: float | None = None,
        peer: str = "",
        peer_principal: str | None = None,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.peer_principal = peer_principal
        self._handed_in = handed_in
        self._received = received  # read already (prism.rpc.keepalive.client_magic)
        self._handshake_by = handshake_by
        self.settings = settings
        self.proto = GrpcProtocol(
            max_message_bytes=settings.max_message_bytes,
            compression_min_bytes=settings.compression_min_bytes,
            compress_accepted=settings.compress_accepted,
            max_concurrent_streams=settings.max_concurrent_streams,
            max_header_list_bytes=settings.max_header_list_bytes,
            clock=trio.current_time,
            budget=ConnectionBudget(settings.http2.max_connection_buffer_bytes, settings.buffers),
            streaming_paths=settings.methods.streaming_paths,
            piecewise_paths=settings.methods.piecewise_paths,
        )
        self.proto.on_output = self.wake
        self.shed_counts: dict[str, int] = {}
        self.quota_ahead = {}
        self.quota_counts = {}
        if settings.admission.shedder.enabled:
            self.proto.shed = self._shed_new
            self.proto.refuse_read = self._refusing_read
            self.proto.admit_read = self._admit_read
        # (The table's method, not the connection's: a connection is freed without the collector.)
        self._refusing = Refusing(settings.methods.data_operation, self.shed_counts)
        self._scopes: dict[int, trio.CancelScope] = {}
        self._init_writing()
        # Streaming handlers waiting for the client to read, and for requests:
        # made by the first streaming call (a ParkingLot is ~0.9 KB, and most
        # connections never stream).
        self._window_lot: trio.lowlevel.ParkingLot | None = None
        self._input_lot: trio.lowlevel.ParkingLot | None = None
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._grace_until = 0.0  # a connection error's GOAWAY: when it is closed anyway
        self._timer_slot: keepalive.Slot | None = None
        self.identity = PeerIdentity(peer)  # what the access check remembers of it
        # trio.current_time() without its lookups: one read per call with a deadline.
        self._now = trio.lowlevel.current_clock().current_time
        # For the connection's timers (prism.rpc.keepalive): a count, not a clock read, per read and call.
        self.reads = 0
        self.opened = 0
        self._resting = False  # rest before the next read (prism.rpc.rest)
        self._preface = keepalive.Preface()
        if settings.tracing is not None:
            instrument(self, settings.tracing, peer)

    async def serve(self) -> None:
        """Serve until the peer leaves, the protocol breaks, or drain ends."""
        settings = self.settings
        settings.connections.add(self)
        handshake_by = self._handshake_by
        if handshake_by is None:
            handshake_by = trio.current_time() + settings.http2.handshake_timeout_s
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.proto.initiate()
                events = await opening_events(
                    self.stream, self.proto, self._preface, settings, self._handed_in, self._received
                )
                if events is None:
                    return  # handed to another worker, which now owns the socket (or closed)
                if self.settings.draining:  # accepted just before the drain began
                    self.proto.start_drain()
                nursery.start_soon(self._writer)
                if self._dispatch(events) and await self._handshake(handshake_by):
                    self._start_timers()
                    await self._reader()
                if not self._closing:
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away: nothing left to answer
        finally:
            self.ended = True
            self.settings.connections.discard(self)
            if self._timer_slot is not None:
                self._timer_slot.timers = None
            proto = self.proto
            proto.discard()
            if proto.broken or proto.draining:
                # After our GOAWAY (a connection error's, or a drain's, an
                # age's, an idle one's) the peer may still send requests it
                # started before reading it: read and drop them (linger) so
                # that the kernel does not reset the connection. A broken
                # connection's calls are cancelled: its GOAWAY's grace is what
                # is left; a drained one has a grace of its own.
                grace = self._grace_until if proto.broken else trio.current_time() + _GOAWAY_GRACE_S
                with trio.CancelScope(deadline=grace, shield=True):
                    await linger(self.stream)
            await close(self.stream)

    def _dispatch(self, events: list[tuple[int, Call | None]]) -> bool:
        """Act on protocol events; False once the connection is finished."""
        proto = self.proto
        self.let_in = 0
        if self.quota_counts:  # the calls of the read a quota refused as they were read
            for (namespace, operation, reason), n in self.quota_counts.items():
                metrics.calls_refused_by_quota(namespace, operation, reason, n)
            self.quota_counts.clear()
        self.quota_ahead.clear()
        self.peeked = None
        if self._refusing.refused:  # (refused whole: prism.rpc.refuse_read)
            self.settings.admission.shedder.count_refused(self._refusing.refused)
            self._refusing.refused = 0
        if self.shed_counts:  # the calls of the read refused at the door, counted once a read
            for operation, n in self.shed_counts.items():
                metrics.call_shed(operation, n)
            self.shed_counts.clear()
        for kind, call in events:
            if call is None:  # CONNECTION_CLOSED
                if proto.broken:
                    self._closing = True
                    self.wake()
                    # A flooding peer may never read the GOAWAY: close anyway.
                    assert self._nursery is not None
                    self._grace_until = trio.current_time() + _GOAWAY_GRACE_S
                    self._nursery.cancel_scope.deadline = self._grace_until
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
        window_lot, input_lot = self._window_lot, self._input_lot
        if window_lot:
            # Streaming handlers waiting for the client to read go on.
            window_lot.unpark_all()
        if input_lot:
            input_lot.unpark_all()
        if proto.peer_gone:
            self._maybe_close()
        return True

    def _refusing_read(self) -> Refusing | None:
        """``GrpcProtocol.refuse_read``: while the door is shut, whether it
        refuses every new data call of the read being taken in, and with
        what (``prism.rpc.refuse_read``); None to judge each call."""
        shedder = self.settings.admission.shedder
        if not shedder.shut:
            return None
        now = trio.current_time()
        if not shedder.refuses_all(self.settings.unary_inflight, now, now - self.proto.arrived):
            return None
        refusing = self._refusing
        trailers = shed_trailers(shedder.target_s, shedder.pushback_ms)
        if trailers is not refusing.trailers:
            refusing.trailers, refusing.block = trailers, final_block(trailers)
        return refusing

    async def _handshake(self, deadline: float) -> bool:
        """Read (and serve) until the client's preface and first SETTINGS are
        in; False if the connection ended first, or the deadline came."""
        if self._preface.done:  # (read with the preface: what clients do)
            return True
        with trio.move_on_at(deadline):
            while not self._preface.done:
                try:
                    data = await self.stream.receive_some(_READ_SIZE)
                except trio.BrokenResourceError:
                    return False  # reset by the peer (see _reader)
                if not data or not self._dispatch(self.proto.receive_data(data)):
                    return False
                self._preface.feed(data)
            return True
        self._closed("handshake_timeout")
        return False

    def _start_timers(self) -> None:
        """The connection's timers: in the listener's heap, else (a connection
        served on its own, as tests do) in a task of its own."""
        settings = self.settings
        heap = settings.timer_heap
        if heap is None:
            assert self._nursery is not None
            self._nursery.start_soon(keepalive.watch, self, settings.http2, settings.drain_timeout_s)
            return
        now = trio.current_time()
        self._timer_slot = heap.add(
            keepalive.Timers(self, settings.http2, settings.drain_timeout_s, now), now
        )

    def start_drain(self) -> None:
        self.proto.start_drain()
        self.wake()
        self._maybe_close()

    # -- what the timers do (prism.rpc.keepalive) -------------------------------

    def ping(self) -> None:
        self.proto.ping()
        self.wake()

    def go_away(self, reason: str) -> None:
        self._closed(reason)
        self.start_drain()

    def abort(self, reason: str) -> None:
        self._closed(reason)
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    def _closed(self, reason: str) -> None:
        closed_by_server(self.peer, reason)

    def _maybe_close(self) -> None:
        # A connection that the client or we have said goodbye to closes once
        # its last call is answered; the writer flushes first.
        if (self.proto.draining or self.proto.peer_gone) and self.proto.idle:
            self._closing = True
            self.wake()

    async def _reader(self) -> None:
        if type(self.stream) is trio.SocketStream:
            await self._read_socket(self.stream.socket)
            return
        receive_some = self.stream.receive_some
        size = _READ_SIZE
        while size:
            try:
                data = await receive_some(size)
                self.proto.arrived = self._now()
            except trio.BrokenResourceError:
                # Reset by the peer (a client closing with our bytes unread):
                # an end, as EOF is. Raised out of the nursery, it left the
                # connection in reference cycles (~25 KB, until a full collection).
                return
            size = self._took(data, size)
            if self._resting:
                await self._rest_a_while()

    async def _read_socket(self, sock: trio.socket.SocketType) -> None:
        """The reader of a plain socket: trio's ``receive_some`` without its
        two costs per call on a connection with one call at a time: a read
        that finds nothing (after each read, before waiting) and a pass of
        the scheduler after each read that found something. Here a read that
        left the socket empty is followed by a wait, one that filled its
        buffer by a schedule point (so a fast sender takes its turn), and
        nothing else."""
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        read = os.read
        size = _READ_SIZE
        drained = True  # (the opening took what had come)
        # With the kernel's receive timestamps, each read says how long its
        # bytes waited unread (prism.rpc.arrival): to the shedder, and to the
        # calls it opens.
        stamped = arrival.stamp(sock)
        self._sock = sock
        proto = self.proto
        now = self._now
        # While the shedder's door is shut: when the last read filled its
        # buffer (None if not). The kernel stamps a read with its newest
        # packet, so a read of a standing backlog looks fresh; but its first
        # bytes were already waiting when that read was made. (Only while
        # shut: a burst, 32 connections opening at once, fills reads too,
        # and judged so it shut the door at half the load a worker serves.)
        shedding = proto.shed is not None
        admission = self.settings.admission
        full_at: float | None = None
        rested_at: float | None = None  # when a rest before this read ended (prism.rpc.rest)
        while size:
            try:
                if drained:
                    await wait_readable(sock)
                elif rested_at is None:  # (after a rest, the rest was the schedule point)
                    await checkpoint()
                if stamped is not None:
                    data, ancillary, _, _ = stamped.recvmsg(size, arrival.SPACE)
                    lag = arrival.lag(ancillary)
                    read_at = now()
                    if rested_at is not None:
                        # What waited out a rest waited for its own client's
                        # quota, not for this worker: from the rest's end.
                        lag = min(lag, read_at - rested_at)
                        rested_at = None
                    proto.arrival_lag = lag
                    if full_at is not None and read_at - full_at > lag:
                        lag = read_at - full_at  # (for the shedder: a deadline counts from the stamp)
                    proto.arrived = read_at - lag
                    shed.observe_read(lag)
                    if shedding:
                        full_at = read_at if len(data) == size and admission.shedder.shut else None
                else:
                    data = read(sock.fileno(), size)  # a closed socket's fileno() is -1: EBADF
                    proto.arrived = now()
            except BlockingIOError:
                drained = True
                continue
            except (OSError, trio.ClosedResourceError):
                return  # reset by the peer, or closed: an end (see _reader)
            drained = len(data) < size
            self._holding = True
            try:
                size = self._took(data, size)
            finally:
                self._holding = False
            if self._dirty:
                self._after_read(sock)
            if self._resting:
                await self._rest_a_while()
                rested_at = now()
                drained = False

    async def _rest_a_while(self) -> None:
        """Wait before the next read, a quota having refused a call (prism.rpc.rest)."""
        self._resting = False
        await trio.sleep_until(rest.turn(self.settings, self._now()))

    def _took(self, data: bytes | bytearray, size: int) -> int:
        """Act on a read of ``data`` (asked: ``size`` bytes); the next read's
        size, 0 once the connection is finished."""
        self.reads += 1
        self.settings.traffic_bytes += len(data)
        flood = self.proto.flood
        control = flood.control
        limited = self.limited
        if not data or not self._dispatch(self.proto.receive_data(data)):
            return 0
        if self.limited != limited:
            self._resting = True
        if flood.control - control > _CONTROL_BURST:
            return _CONTROL_READ_SIZE
        if len(data) == size:
            if self.settings.admission.shedder.shut or self.proto.read_opened > _LARGE_READ_OPENED:
                return _READ_SIZE  # (shut: each small read of a backlog is judged, _read_socket)
            return min(2 * size, _MAX_READ_SIZE)
        if size > _READ_SIZE and 4 * len(data) < size:
            return size // 2
        return size
