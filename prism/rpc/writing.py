"""A connection's writes: its writer task, and the reader's own write after a read.

The writer task (``_writer``) is the only code that waits to write: it
writes everything the protocol has queued after each scheduling batch, so
that concurrent calls on a connection share writes. After a read, the
reader writes what the read's calls queued itself, when the writer is idle
and the kernel takes it all (``_after_read``): a connection with one call
at a time costs no wake-up of the writer per call. What a read queued that
is refusals alone is held a moment instead (``prism.rpc.held``).
"""

from __future__ import annotations

import trio

from prism.rpc.h2send import Chunk
from prism.rpc.protocol import GrpcProtocol
from prism.rpc.settings import ServerSettings
from prism.rpc.writev import rest_of, send_buffers, write_now


class Writing:
    """The writing half of ``prism.rpc.server.Connection``."""

    proto: GrpcProtocol
    stream: trio.abc.Stream
    settings: ServerSettings
    ended: bool
    _closing: bool
    _resting: bool
    _nursery: trio.Nursery | None

    def _init_writing(self) -> None:
        self._dirty = False
        self._lot = trio.lowlevel.ParkingLot()
        # The writer is parked with nothing to write: the reader may write
        # itself (_after_read). While the reader acts on a read, wake()
        # leaves the writer be (_holding) and the reader decides after.
        self._writer_idle = False
        self._holding = False
        self._rest: list[Chunk] = []  # what the reader could not write at once: the writer's first
        self.held = False  # refusals queued, held a moment (prism.rpc.held)
        self._sock: trio.socket.SocketType | None = None  # (the plain reader's)

    def wake(self) -> None:
        """Ask the writer to flush what the protocol has queued."""
        if not self._dirty:
            self._dirty = True
            if not self._holding:
                self._writer_idle = False
                self._lot.unpark()

    def _after_read(self, sock: trio.socket.SocketType, hold: bool = True) -> None:
        """What a read's calls queued: written now from the reader, when the
        writer is idle and the kernel takes it all (the common case), else
        the writer's. A connection with one call at a time then costs no
        wake-up of the writer per call (~10 us of scheduling)."""
        if self._writer_idle and not self._closing:
            proto = self.proto
            held = self.settings.held
            # (Not a read a quota refused: its connection rests, and the
            # worker's reads of resting connections take turns 2 ms apart,
            # prism.rpc.rest; held, their writes would all go at once.)
            if hold and held is not None and proto.refusals_only and not self._resting:
                self._dirty = False  # (the next wake writes them, or the held task does)
                held.hold(self)
                return
            buffers = proto.buffers_to_send()
            if not buffers:
                self._dirty = False
                return
            sent = write_now(sock.fileno(), buffers)
            self.settings.traffic_bytes += sent
            rest = rest_of(buffers, sent)
            if not rest:
                self._dirty = False
                return
            self._rest = rest
        self._writer_idle = False
        self._lot.unpark()

    def write_held(self) -> None:
        """Write held refusals (``prism.rpc.held``), unless something else has."""
        if self._sock is not None and not self._dirty and not self.ended:
            self._dirty = True
            self._after_read(self._sock, hold=False)

    async def _writer(self) -> None:
        proto = self.proto
        stream = self.stream
        sock = stream.socket if type(stream) is trio.SocketStream else None
        while True:
            if not self._dirty:
                self._writer_idle = True
                await self._lot.park()
            self._dirty = False
            buffers = proto.buffers_to_send()  # a large answer's message as it is, no copy
            if self._rest:
                buffers, self._rest = self._rest + buffers, []
            if buffers:
                size = proto.writing = sum(map(len, buffers))  # held until the kernel has it (budget)
                try:
                    if sock is not None:  # as much as the kernel takes now, without a schedule point
                        sent = write_now(sock.fileno(), buffers)  # (closed: -1, nothing written)
                        proto.written(sent)
                        buffers = rest_of(buffers, sent)
                    if buffers:
                        await send_buffers(stream, buffers, proto.written)
                except trio.BrokenResourceError:
                    self._closing = True  # the peer is gone (see _reader)
                    self._dirty = False
                self.settings.traffic_bytes += size
                proto.writing = 0
            if self._closing and not self._dirty:
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return
