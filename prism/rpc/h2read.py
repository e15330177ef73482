"""Reading the frames of ordinary calls without h2's parser (``PlainReader``).

h2 turns every frame it receives into a hyperframe object, dispatches it,
builds events and runs generic header processing. For a gRPC call that was,
even with our HPACK cache, over a third of the CPU a whole call cost the
server; reading those frames as below cut the server's CPU per call by
about a quarter (what a call costs now is measured in
``bench/results/kv_get.json``).

``PlainReader.receive_plain`` reads the leading frames of a received
chunk itself, as long as they are the plain frames of ordinary calls:

- HEADERS opening a new client stream, END_HEADERS set (no CONTINUATION),
  no padding or priority, whose header block ``CachingDecoder`` has already
  decoded once (the same bytes mean the same headers while the HPACK table
  is unchanged), a well-formed request (``prism.rpc.headers``) with a
  well-formed content-length if any;
- DATA without padding on a stream that is open, within both flow-control
  windows and within the stream's content-length if it declared one, and
  not empty unless it ends the stream (``prism.rpc.flood`` counts those);
- WINDOW_UPDATE for the connection, or for a stream that is open or
  half-closed, whose increment is valid and keeps the window within 2^31-1,
  while the flood guard allows it:
  grpc-core (C++, Python, Ruby... clients) sends two with every call, one
  for the stream between its HEADERS and DATA, one for the connection after
  them; read by h2, they made the call's DATA h2's too, and each call cost
  the server about twice what one from h2load did.

For those it changes h2's state exactly as h2's own ``receive_data`` would:
its state machine is driven by the same inputs, flow-control windows are
consumed the same way. A stream opened here is h2's only once the caller
takes its call (``open_pending``), or before h2 itself reads a frame
(``materialize``): until then its state is five numbers (``Pending``). A
call refused as it is read (the overload door, a quota) whose request came
whole in the read then never is h2's: a stream's life in h2 (its object, its
state machine's four inputs, the sweep that forgets it) cost 5.3 us, over
half of what such a refusal cost the protocol.
The first frame that is anything else, and every byte after it, goes to h2
itself, so every unusual case (new HPACK entries, SETTINGS, PING,
WINDOW_UPDATE, RST_STREAM, GOAWAY, errors of every kind) is handled by h2 in
order. The caller acts on the frames read here only after h2 has taken in
the rest of the read, as h2's own user would, so every reply and window
update goes out in the same order with the same values.
``tests/unit/test_plain_frames.py`` holds this against h2 itself. The send
side does the same for OK answers and for DATA frames (``prism.rpc.h2send``).
"""

from __future__ import annotations

import struct
from typing import Any, Final, Protocol

import h2.connection
from h2.connection import ConnectionState
from h2.stream import H2Stream, StreamInputs, StreamState

from prism.rpc.hpack_cache import CachingDecoder

_DATA: Final = 0x0
_HEADERS: Final = 0x1
_WINDOW_UPDATE: Final = 0x8
_LARGEST_WINDOW: Final = 2**31 - 1  # RFC 9113 6.9.1
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
_FRAME_HEAD: Final = 9

# Closed streams are forgotten once the connection holds this many more than
# after the last sweep: a sweep walks every stream h2 holds, and the streams
# of one read are all still open while it is taken in (their answers are
# written after), so sweeping at a fixed count walked a hundred open streams
# for each new one of a large read: a third of the worker's CPU when shedding.
_SWEEP_STREAMS_AT: Final = 128


# A stream opened by the plain path that h2 does not hold yet: its declared
# content length (or None), the body bytes read, whether the client ended
# it, and what is left of its inbound and outbound windows.
Pending = list[Any]
_EXPECTED, _BODY, _ENDED, _INBOUND, _OUTBOUND = range(5)


class PlainGuard(Protocol):
    """What the plain path tells the flood guard (``prism.rpc.flood.FloodGuard``)."""

    empty_run: int

    def window_updates_allowed(self, n: int, streams: int) -> bool: ...

    def window_updates(self, n: int) -> None: ...


# What receive_plain read, frame by frame: [HEADERS_READ, stream id, header
# list, 0, end of stream], [DATA_READ, stream id, data, flow-controlled
# length, end of stream], a WINDOW_UPDATE's entry, or [H2_READ, 0, h2's
# events for one frame h2 read, 0, False]; the data a memoryview of the
# bytes read, or a list of them for a stream's DATA frames in one read (one
# entry, grown in place).
HEADERS_READ: Final = 0
DATA_READ: Final = 1
WINDOW_READ: Final = 2  # a WINDOW_UPDATE: the caller sends what it lets out, where h2's event would
H2_READ: Final = 3
PlainFrame = list[Any]
_WINDOW_ENTRY: Final[PlainFrame] = [WINDOW_READ, 0, None, 0, False]  # (shared: never changed)
# Where a stream's WINDOW_UPDATE only moves its window (h2's stream state machine).
_WINDOW_STATES: Final = frozenset(
    {StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE, StreamState.HALF_CLOSED_LOCAL}
)
# A frame's 9-byte header: length (24 bits) and type, flags, stream id (31 bits).
_FRAME_HEADER: Final = struct.Struct(">IBI")


def _length(view: memoryview, pos: int) -> int:
    """The length field of the frame header at ``pos``."""
    return int.from_bytes(view[pos : pos + 3], "big")


class PlainReader(h2.connection.H2Connection):
    """h2's connection, reading the plain frames of ordinary calls itself
    (``receive_plain``); ``prism.rpc.h2conn.ServerConnection`` sets up what
    is declared here."""

    _decoder: CachingDecoder
    # The start of a frame a read ended inside of (``receive_plain``).
    _held: bytes
    # WINDOW_UPDATE frames receive_plain took in since the caller last
    # looked (prism.rpc.flood counts them; the caller sends what they let out).
    plain_window_updates: int
    plain_opened: int  # streams receive_plain opened in the read being taken in
    _plain_payload: bool  # a HEADERS or DATA frame read plainly since the guard was last told

    _sweep_at = _SWEEP_STREAMS_AT  # the next sweep, in streams held
    # Streams opened by the plain path, not yet h2's (``Pending``), by id, in order.
    _pending: dict[int, Pending]

    def _forget_closed_streams(self) -> None:
        if len(self.streams) >= self._sweep_at:
            self._open_streams(1)
            self._sweep_at = len(self.streams) + _SWEEP_STREAMS_AT

    def open_pending(self, sid: int) -> None:
        """Make the stream ``sid`` the plain path opened h2's, as h2 would
        have made it when its frames were read (nothing if it is already)."""
        pending = self._pending.pop(sid, None)
        if pending is None:
            return
        self._forget_closed_streams()
        # What h2's _begin_new_stream makes (its id checks were made when the
        # HEADERS was read), then what the stream's frames did to it.
        stream = H2Stream(
            sid,
            config=self.config,
            inbound_window_size=self.local_settings.initial_window_size,
            outbound_window_size=pending[_OUTBOUND],
        )
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        self.streams[sid] = stream
        stream._inbound_window_manager.current_window_size = pending[_INBOUND]
        stream._expected_content_length = pending[_EXPECTED]
        stream._actual_content_length = pending[_BODY]
        # What its state machine's RECV_HEADERS (and RECV_END_STREAM) inputs
        # do, less the events they make, which nobody reads: ~1.4 us a call.
        machine = stream.state_machine
        machine.client = False
        machine.headers_received = True
        machine.state = StreamState.HALF_CLOSED_REMOTE if pending[_ENDED] else StreamState.OPEN

    def materialize(self) -> None:
        """Make every stream the plain path opened h2's: before h2 reads a
        frame (which may act on any stream), and once a read's calls are
        taken."""
        while self._pending:
            self.open_pending(next(iter(self._pending)))

    def pending_ended(self, sid: int) -> bool:
        """Whether ``sid`` is a stream the plain path opened, not h2's, that
        the client has ended: one a refusal can close without h2 (``forget_pending``)."""
        pending = self._pending.get(sid)
        return pending is not None and pending[_ENDED]

    def forget_pending(self, sid: int) -> None:
        """A stream the client ended (``pending_ended``) that is answered and
        closed without h2 ever holding it: to h2, a stream it has forgotten."""
        del self._pending[sid]

    def receive_plain(
        self,
        data: bytes | bytearray | memoryview,
        read: list[PlainFrame],
        guard: PlainGuard,
    ) -> bytes | bytearray | memoryview:
        """Take in the leading plain call frames of ``data`` (see the module
        docstring), appending each to ``read``; return the bytes left for
        ``receive_data``, which the caller must feed to it before acting on
        ``read``: h2 takes in a whole read before its events are acted on,
        and so must we, for the same frames to have the same effects.

        A read that ends inside a DATA or HEADERS frame leaves that frame's
        start here (``_held``, as h2's own buffer would hold it), so that the
        next read goes on with the plain path: given to h2, a partial frame
        made h2 parse every later frame of the connection until a read
        happened to end on a frame boundary, which large request messages
        (many 16 KiB frames per 64 KiB read) almost never do. ``receive_data``
        puts the held bytes in front of whatever it is given next.
        """
        self.plain_opened = 0
        buffer = self.incoming_buffer
        if (
            buffer._preamble_len
            or buffer._headers_buffer
            or self.state_machine.state is not ConnectionState.SERVER_OPEN
        ):
            return data
        if buffer._data:
            # h2 took the last read (from a PING, a SETTINGS ACK... on) and it
            # ended inside a frame: taken back as held (nothing is held here
            # meanwhile), h2 does not go on parsing every frame until a read
            # ends on a frame boundary (~3% of 1 MiB puts' bytes did).
            self._held = bytes(buffer._data)
            buffer._data = bytearray()
        held = self._held
        if held:
            # The rest of the held frame, then this read (a view of it: a
            # slice of the bytes would copy up to a whole read).
            data = memoryview(data)
            missing = _FRAME_HEAD - len(held)
            if missing > 0:
                held += bytes(data[:missing])
                data = data[missing:]
            if len(held) >= _FRAME_HEAD:
                if not self._holdable(held):
                    self._held = b""
                    return held + data  # not a frame the plain path reads: h2's
                missing = _FRAME_HEAD + int.from_bytes(held[:3], "big") - len(held)
                if missing > len(data):
                    self._held = held + data
                    return b""
                held += bytes(data[:missing])
                data = data[missing:]
                if self._read_plain(memoryview(held), read, guard) < len(held):
                    self._held = b""
                    return held + data  # not a plain frame: h2 reads it, and the rest
            else:
                self._held = held
                return b""
            self._held = b""
        view = memoryview(data)
        pos = self._read_plain(view, read, guard)
        end = len(view)
        buffer = self.incoming_buffer
        while end - pos >= _FRAME_HEAD:
            # A whole frame the plain path does not read goes to h2, alone, and
            # the plain path goes on after it, as long as h2 is left at a frame
            # boundary on an open connection (not inside a header block).
            stop = pos + _FRAME_HEAD + _length(view, pos)
            if stop > end or stop - pos - _FRAME_HEAD > self.max_inbound_frame_size:
                break
            self._settle(guard)
            self.materialize()
            events = _H2_RECEIVE(self, bytes(view[pos:stop]))
            if events:
                read.append([H2_READ, 0, events, 0, False])
            pos = stop
            if buffer._headers_buffer or self.state_machine.state is not ConnectionState.SERVER_OPEN:
                return view[pos:]
            pos += self._read_plain(view[pos:], read, guard)
        self._settle(guard)
        rest = end - pos
        if rest and (
            rest < _FRAME_HEAD or (self._holdable(view[pos:]) and rest < _FRAME_HEAD + _length(view, pos))
        ):
            self._held = bytes(view[pos:])  # the start of a frame, no more: the loop took all it could
            return b""
        return view[pos:] if pos else data

    def _settle(self, guard: PlainGuard) -> None:
        """Tell the flood guard what it would have seen of the frames read
        plainly since it was last told, before h2 parses another frame: a
        non-empty payload (which ends a run of empty frames) and the
        WINDOW_UPDATEs (each allowed, in order, as it was read)."""
        if self._plain_payload:
            self._plain_payload = False
            guard.empty_run = 0
        if self.plain_window_updates:
            n, self.plain_window_updates = self.plain_window_updates, 0
            guard.window_updates(n)

    def _holdable(self, head: bytes | memoryview) -> bool:
        """Whether the frame of this 9-byte header is one to hold the start of:
        DATA or HEADERS, within the frame size limit."""
        return head[3] in (_DATA, _HEADERS) and int.from_bytes(head[:3], "big") <= self.max_inbound_frame_size

    def _read_plain(self, view: memoryview, read: list[PlainFrame], guard: PlainGuard) -> int:
        """Read the leading plain frames of ``view`` (see ``receive_plain``);
        how many bytes they took. A WINDOW_UPDATE is read only if
        ``guard.window_updates_allowed(n, streams)``: n of them so far not counted,
        this one included, with ``streams`` opened before it in this read (the
        flood guard's rule, ``prism.rpc.flood``); one it refuses is h2's, so the
        guard judges it in order, as it does every frame h2 reads."""
        end = len(view)
        pos = 0
        max_length = self.max_inbound_frame_size
        conn_window = self._inbound_flow_control_window_manager
        plain_block = self._decoder.plain
        streams = self.streams
        fresh = self._pending
        inbound = outbound = 0  # a new stream's windows (read once, if a stream opens)
        unpack = _FRAME_HEADER.unpack_from
        data_at: dict[int, PlainFrame] = {}  # stream id -> its DATA entry in ``read``
        streams_opened = 0
        payload = False  # a HEADERS or DATA frame read
        while end - pos >= _FRAME_HEAD:
            head, flags, sid = unpack(view, pos)
            length = head >> 8
            stop = pos + _FRAME_HEAD + length
            if stop > end or length > max_length:
                break
            sid &= 0x7FFFFFFF
            kind = head & 0xFF
            if kind == _DATA:  # (first: a large request is made of them)
                if (
                    flags & ~_END_STREAM
                    or not (length or flags)  # empty: h2's, for prism.rpc.flood to count
                    or length > conn_window.current_window_size
                ):
                    break
                end_stream = flags == _END_STREAM
                opening = fresh.get(sid) if fresh else None
                if opening is not None:  # (a stream of this read: what h2 would check, of its numbers)
                    body_length = opening[_BODY] + length
                    expected_length = opening[_EXPECTED]
                    if (
                        opening[_ENDED]
                        or length > opening[_INBOUND]
                        or (
                            expected_length is not None
                            and (
                                body_length > expected_length
                                or (end_stream and body_length != expected_length)
                            )
                        )
                    ):
                        break
                    conn_window.current_window_size -= length
                    opening[_INBOUND] -= length
                    opening[_BODY] = body_length
                    opening[_ENDED] = end_stream
                else:
                    stream = streams.get(sid)
                    if stream is None or stream.state_machine.state is not StreamState.OPEN:
                        break
                    window = stream._inbound_window_manager
                    if length > window.current_window_size:
                        break
                    body_length = stream._actual_content_length + length
                    expected_length = stream._expected_content_length
                    if expected_length is not None and (
                        body_length > expected_length or (end_stream and body_length != expected_length)
                    ):
                        break
                    # h2's window_consumed and RECV_DATA, less their checks (above).
                    conn_window.current_window_size -= length
                    window.current_window_size -= length
                    stream._actual_content_length = body_length
                    if end_stream:
                        stream.state_machine.process_input(StreamInputs.RECV_END_STREAM)
                payload = True
                piece = view[pos + _FRAME_HEAD : stop]
                entry = data_at.get(sid)
                if entry is None:
                    data_at[sid] = entry = [DATA_READ, sid, piece, length, end_stream]
                    read.append(entry)
                else:
                    # A stream's DATA frames of one read are one entry, its data
                    # the list of their pieces (only a stream's own order matters).
                    pieces = entry[2]
                    if type(pieces) is list:
                        pieces.append(piece)
                    else:
                        entry[2] = [pieces, piece]
                    entry[3] += length
                    entry[4] = end_stream
            elif kind == _HEADERS:
                end_stream = bool(flags & _END_STREAM)
                if (
                    flags & ~_END_STREAM != _END_HEADERS
                    or not sid & 1
                    or sid <= self.highest_inbound_stream_id
                ):
                    break
                block = plain_block(bytes(view[pos + _FRAME_HEAD : stop]))
                if block is None:
                    break
                headers, expected_length = block
                if not inbound:
                    inbound = self.local_settings.initial_window_size
                    outbound = self.remote_settings.initial_window_size
                # h2's _begin_new_stream, deferred (``open_pending``), less its checks (above).
                self.highest_inbound_stream_id = sid
                fresh[sid] = [expected_length, 0, end_stream, inbound, outbound]
                read.append([HEADERS_READ, sid, headers, 0, end_stream])
                streams_opened += 1
                payload = True
            elif kind == _WINDOW_UPDATE:
                pending, before = self.plain_window_updates + 1, self.plain_opened + streams_opened
                if length != 4 or not guard.window_updates_allowed(pending, before):
                    break
                increment = int.from_bytes(view[pos + _FRAME_HEAD : stop], "big") & 0x7FFFFFFF
                if not increment:
                    break
                if sid:
                    # h2's receive_window_update, less the event: the state
                    # machine's window_updated changes no state.
                    opening = fresh.get(sid) if fresh else None
                    if opening is not None:  # (open or half-closed: a window that moves)
                        if opening[_OUTBOUND] + increment > _LARGEST_WINDOW:
                            break
                        opening[_OUTBOUND] += increment
                    else:
                        stream = streams.get(sid)
                        if (
                            stream is None
                            or stream.state_machine.state not in _WINDOW_STATES
                            or stream.outbound_flow_control_window + increment > _LARGEST_WINDOW
                        ):
                            break
                        stream.outbound_flow_control_window += increment
                else:
                    if self.outbound_flow_control_window + increment > _LARGEST_WINDOW:
                        break
                    self.outbound_flow_control_window += increment
                self.plain_window_updates += 1
                read.append(_WINDOW_ENTRY)
                data_at.clear()  # a stream's DATA after it is a new entry, as h2's events would be
            else:
                break
            pos = stop
        self.plain_opened += streams_opened
        if payload:
            self._plain_payload = True
        return pos


_H2_RECEIVE: Final = h2.connection.H2Connection.receive_data  # h2's own, not the held bytes' override
