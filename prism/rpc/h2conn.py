"""h2's server connection, with the frames of ordinary calls read and written cheaply.

h2 turns every frame it receives into a hyperframe object, dispatches it,
builds events and runs generic header processing. For a gRPC call that is
two frames (HEADERS, DATA) and, even with our HPACK cache, it was over a
third of the CPU a whole call cost the server; reading those frames as below
cut the server's CPU per call by about a quarter (what a call costs now is
measured in ``bench/results/kv_get.json``).

``ServerConnection.receive_plain`` reads the leading frames of a received
chunk itself, as long as they are the plain frames of ordinary calls:

- HEADERS opening a new client stream, END_HEADERS set (no CONTINUATION),
  no padding or priority, whose header block ``CachingDecoder`` has already
  decoded once (the same bytes mean the same headers while the HPACK table
  is unchanged), a well-formed request (``prism.rpc.headers``) with a
  well-formed content-length if any;
- DATA without padding on a stream that is open, within both flow-control
  windows and within the stream's content-length if it declared one, and
  not empty unless it ends the stream (``prism.rpc.flood`` counts those).

For those it changes h2's state exactly as h2's own ``receive_data`` would:
the stream is created by h2's ``_begin_new_stream``, its state machine is
driven by the same inputs, flow-control windows are consumed the same way.
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

import functools
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.connection import AllowedStreamIDs, ConnectionState, H2ConnectionStateMachine
from h2.frame_buffer import FrameBuffer
from h2.stream import H2Stream, StreamInputs, StreamState
from h2.utilities import SizeLimitDict
from h2.windows import WindowManager
from hyperframe.frame import (
    AltSvcFrame,
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from prism.rpc.h2send import RESPONSE_HEADERS, TRAILERS_OK, PlainSender
from prism.rpc.headers import malformed_trailers
from prism.rpc.hpack_cache import CachingDecoder

if TYPE_CHECKING:
    from typing_extensions import Buffer


_DATA: Final = 0x0
_HEADERS: Final = 0x1
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
_FRAME_HEAD: Final = 9

# RFC 9113's initial values, h2's before any SETTINGS.
_DEFAULT_WINDOW: Final = 65_535
_DEFAULT_FRAME_SIZE: Final = 16_384

# Closed streams are forgotten once the connection holds this many.
_SWEEP_STREAMS_AT: Final = 128

# What receive_plain read, frame by frame: [HEADERS_READ, stream id, header
# list, 0, end of stream] or [DATA_READ, stream id, data, flow-controlled
# length, end of stream]; the data a memoryview of the bytes read, or a list
# of them for a stream's DATA frames in one read (one entry, grown in place).
HEADERS_READ: Final = 0
DATA_READ: Final = 1
PlainFrame = list[Any]
# A frame's 9-byte header: length (24 bits) and type, flags, stream id (31 bits).
_FRAME_HEADER: Final = struct.Struct(">IBI")


def _length(view: memoryview, pos: int) -> int:
    """The length field of the frame header at ``pos``."""
    return int.from_bytes(view[pos : pos + 3], "big")


class _Values(list[int]):
    """What h2's ``Settings`` keeps per setting (the current value, then those
    sent and not yet acknowledged), as a list: h2 uses a deque, which
    allocates a 64-slot block for each of a connection's ~16 settings (12 KB
    of a connection's ~30 KB)."""

    __slots__ = ()

    def popleft(self) -> int:
        return self.pop(0)


@functools.cache
def _settings_template(client: bool, values: tuple[tuple[int, int], ...]) -> h2.settings.Settings:
    return h2.settings.Settings(client=client, initial_values=dict(values))  # type: ignore[arg-type]


def lean_settings(client: bool, values: tuple[tuple[int, int], ...]) -> h2.settings.Settings:
    """h2's ``Settings(client, values)`` (validated by h2 once per distinct
    ``values``), each setting's values in a list (``_Values``)."""
    template = _settings_template(client, values)
    settings = h2.settings.Settings.__new__(h2.settings.Settings)
    settings._client = client
    settings._settings = {key: _Values(v) for key, v in template._settings.items()}  # type: ignore[misc]
    return settings


class ServerConnection(PlainSender):
    """``h2.connection.H2Connection`` for the server side of gRPC.

    ``max_header_list_bytes`` bounds the decoded size of a header block (as
    HPACK counts it), in place of h2's own default (64 KiB), from the first
    block on: before the client has seen the SETTINGS that advertise it
    (``GrpcProtocol.initiate``), and after, since h2 moves the bound only when
    an acknowledged SETTINGS changes it and ours are initial values. The
    decoder stops at the bound, so a block's decoding never grows past it;
    the HPACK state is then unusable, and h2 ends the connection with
    GOAWAY(ENHANCE_YOUR_CALM), which RFC 9113 10.5.1 allows: the block must
    be processed "unless the connection is closed".
    """

    def __init__(
        self,
        config: h2.config.H2Configuration,
        max_header_list_bytes: int,
        encoder: hpack.Encoder,
        local_settings: tuple[tuple[int, int], ...],
    ) -> None:
        # What h2's H2Connection.__init__ sets (h2 4.4.1, pinned), built here
        # without what it makes only for us to replace: its HPACK encoder and
        # decoder (ours: ``encoder``, a CachingDecoder), its two Settings of
        # deques (ours: lists, copied from one validated template per
        # process, ``lean_settings``) and its frame dispatch table of bound
        # methods (ours is one table for every connection, ``_DISPATCH``):
        # a new connection cost ~56 us with them, and held ~3 KB more,
        # in a reference cycle.
        self.state_machine = H2ConnectionStateMachine()
        self.streams: dict[int, H2Stream] = {}
        self.highest_inbound_stream_id = 0
        self.highest_outbound_stream_id = 0
        self.encoder = encoder
        decoder = CachingDecoder()
        decoder.max_header_list_size = max_header_list_bytes
        self.decoder = self._decoder = decoder
        self.config = config
        self.local_settings = lean_settings(False, local_settings)
        self.remote_settings = lean_settings(True, ())
        self.outbound_flow_control_window = _DEFAULT_WINDOW
        self.max_outbound_frame_size = self.max_inbound_frame_size = _DEFAULT_FRAME_SIZE
        self.incoming_buffer = FrameBuffer(server=True)
        self._header_frames: list[Any] = []
        self._data_to_send = bytearray()
        self._closed_streams = SizeLimitDict(size_limit=self.MAX_CLOSED_STREAMS)
        # (h2 sizes it by its local settings' window before ours apply: the default.)
        self._inbound_flow_control_window_manager = WindowManager(max_window_size=_DEFAULT_WINDOW)
        self._init_sender()
        # Stream id -> why its request (or its trailers) is malformed, for the
        # blocks h2 read (the plain path reads well-formed requests only, and
        # no trailers); taken by the caller.
        self.malformed: dict[int, str] = {}
        # The start of a frame a read ended inside of (``receive_plain``).
        self._held: bytes = b""

    # h2 turns a stream over SETTINGS_MAX_CONCURRENT_STREAMS into a connection
    # error (TooManyStreamsError). gRPC wants only that stream refused, so we
    # count calls ourselves and keep h2's check from firing. The property's
    # side effect, forgetting closed streams, walks every stream h2 holds; it
    # was 4% of a call's CPU done on every new stream, so it is done only once
    # closed streams have piled up (h2 treats a closed stream it still holds
    # as closed either way).
    @property
    def open_inbound_streams(self) -> int:
        self._forget_closed_streams()
        return 0

    def _forget_closed_streams(self) -> None:
        if len(self.streams) >= _SWEEP_STREAMS_AT:
            self._open_streams(1)

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        # h2 formats repr(frame) for a trace log line on every frame it
        # receives, log level or not: 5% of a call's CPU. The usual path is
        # taken here without it; a frame h2 refuses goes back through h2's own
        # handling, which is given the same exception to handle.
        events: list[h2.events.Event]
        try:
            frames, events = _DISPATCH[frame.__class__](self, frame)
        except (h2.exceptions.StreamClosedError, h2.exceptions.StreamIDTooLowError) as exc:
            return self._refused_frame(frame, exc)
        self._prepare_for_sending(frames)
        return events

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        frames, events = super()._receive_headers_frame(frame)
        verdict = self._decoder.verdict  # of this frame's block, just decoded
        for event in events:
            if type(event) is h2.events.RequestReceived:
                if verdict is not None:
                    self.malformed[event.stream_id] = verdict
            elif type(event) is h2.events.TrailersReceived:
                # (In the read that opened the stream, _start_call takes this
                # and refuses the request; later, the trailers' own branch.)
                why = malformed_trailers(event.headers or ())
                if why is not None:
                    self.malformed[event.stream_id] = why
        return frames, events

    def send_data(
        self, stream_id: int, data: bytes | memoryview, end_stream: bool = False, pad_length: Any = None
    ) -> None:
        # h2 sends one DATA frame per call (more data than a frame raises).
        self.data_frames_sent += 1
        super().send_data(stream_id, data, end_stream, pad_length)

    def let_go(self) -> None:
        """The connection is over: break the cycle through the frame
        buffer's parse hook (``prism.rpc.flood``), so that it is freed when
        the last reference goes, not at the next full collection."""
        self.incoming_buffer.__dict__.pop("_update_header_buffer", None)

    def _refused_frame(self, frame: Any, exc: Exception) -> list[h2.events.Event]:
        def reraise(_frame: Any) -> Any:
            raise exc

        # h2's own _receive_frame reads this table: for this one frame, it holds the refusal.
        self._frame_dispatch_table = {frame.__class__: reraise}
        try:
            events: list[h2.events.Event] = super()._receive_frame(frame)
            return events
        finally:
            del self._frame_dispatch_table

    def receive_data(self, data: Buffer) -> list[h2.events.Event]:
        # A frame that ``receive_plain`` holds the start of comes first.
        held = self._held
        if held:
            self._held = b""
            data = held + data
        events: list[h2.events.Event] = super().receive_data(data)
        return events

    def receive_plain(
        self, data: bytes | bytearray | memoryview, read: list[PlainFrame]
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
                if self._read_plain(memoryview(held), read) < len(held):
                    self._held = b""
                    return held + data  # not a plain frame: h2 reads it, and the rest
            else:
                self._held = held
                return b""
            self._held = b""
        view = memoryview(data)
        pos = self._read_plain(view, read)
        rest = len(view) - pos
        if rest and (
            rest < _FRAME_HEAD or (self._holdable(view[pos:]) and rest < _FRAME_HEAD + _length(view, pos))
        ):
            self._held = bytes(view[pos:])  # the start of a frame, no more: the loop took all it could
            return b""
        return view[pos:] if pos else data

    def _holdable(self, head: bytes | memoryview) -> bool:
        """Whether the frame of this 9-byte header is one to hold the start of:
        DATA or HEADERS, within the frame size limit."""
        return head[3] in (_DATA, _HEADERS) and int.from_bytes(head[:3], "big") <= self.max_inbound_frame_size

    def _read_plain(self, view: memoryview, read: list[PlainFrame]) -> int:
        """Read the leading plain frames of ``view`` (see ``receive_plain``);
        how many bytes they took."""
        end = len(view)
        pos = 0
        max_length = self.max_inbound_frame_size
        conn_window = self._inbound_flow_control_window_manager
        plain_block = self._decoder.plain
        streams = self.streams
        unpack = _FRAME_HEADER.unpack_from
        data_at: dict[int, PlainFrame] = {}  # stream id -> its DATA entry in ``read``
        while end - pos >= _FRAME_HEAD:
            head, flags, sid = unpack(view, pos)
            length = head >> 8
            stop = pos + _FRAME_HEAD + length
            if stop > end or length > max_length:
                break
            sid &= 0x7FFFFFFF
            kind = head & 0xFF
            if kind == _DATA:  # (first: a large request is made of them)
                stream = streams.get(sid)
                if (
                    flags & ~_END_STREAM
                    or not (length or flags)  # empty: h2's, for prism.rpc.flood to count
                    or stream is None
                    or stream.state_machine.state is not StreamState.OPEN
                    or length > conn_window.current_window_size
                ):
                    break
                window = stream._inbound_window_manager
                if length > window.current_window_size:
                    break
                body_length = stream._actual_content_length + length
                expected_length = stream._expected_content_length
                end_stream = flags == _END_STREAM
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
                self._forget_closed_streams()
                opened = self._begin_new_stream(sid, AllowedStreamIDs.ODD)
                opened._expected_content_length = expected_length
                machine = opened.state_machine
                machine.process_input(StreamInputs.RECV_HEADERS)
                if end_stream:
                    machine.process_input(StreamInputs.RECV_END_STREAM)
                read.append([HEADERS_READ, sid, headers, 0, end_stream])
            else:
                break
            pos = stop
        return pos

    def ack_connection(self, length: int) -> None:
        """Hand ``length`` received bytes back to the connection's window (h2
        batches the WINDOW_UPDATEs); the streams' windows are the caller's."""
        increment = self._inbound_flow_control_window_manager.process_bytes(length)
        if increment:
            frame = WindowUpdateFrame(0)
            frame.window_increment = increment
            self._prepare_for_sending([frame])


__all__ = ["DATA_READ", "HEADERS_READ", "RESPONSE_HEADERS", "TRAILERS_OK", "PlainFrame", "ServerConnection"]


# h2's dispatch table, as functions: one for every connection.
_DISPATCH: Final[dict[type, Callable[[ServerConnection, Any], Any]]] = {
    HeadersFrame: ServerConnection._receive_headers_frame,
    PushPromiseFrame: ServerConnection._receive_push_promise_frame,
    SettingsFrame: ServerConnection._receive_settings_frame,
    DataFrame: ServerConnection._receive_data_frame,
    WindowUpdateFrame: ServerConnection._receive_window_update_frame,
    PingFrame: ServerConnection._receive_ping_frame,
    RstStreamFrame: ServerConnection._receive_rst_stream_frame,
    PriorityFrame: ServerConnection._receive_priority_frame,
    GoAwayFrame: ServerConnection._receive_goaway_frame,
    ContinuationFrame: ServerConnection._receive_naked_continuation,
    AltSvcFrame: ServerConnection._receive_alt_svc_frame,
    ExtensionFrame: ServerConnection._receive_unknown_frame,
}
