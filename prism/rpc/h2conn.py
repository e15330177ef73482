"""h2's server connection, with the frames of ordinary calls read and written cheaply.

h2 turns every frame it receives into a hyperframe object, dispatches it,
builds events and runs generic header processing, and builds frames the
same way to send: for a gRPC call, more CPU than the rest of the call.
``ServerConnection`` reads the leading frames of each received chunk
itself while they are the plain frames of ordinary calls
(``prism.rpc.h2read``), and writes OK answers and DATA frames itself
(``prism.rpc.h2send``); everything else is h2's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.connection import H2ConnectionStateMachine
from h2.frame_buffer import FrameBuffer
from h2.stream import H2Stream
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

from prism.rpc.h2read import DATA_READ, H2_READ, HEADERS_READ, WINDOW_READ, PlainFrame, PlainReader
from prism.rpc.h2send import RESPONSE_HEADERS, TRAILERS_OK, PlainSender
from prism.rpc.headers import malformed_trailers
from prism.rpc.hpack_cache import CachingDecoder

if TYPE_CHECKING:
    from typing_extensions import Buffer


# RFC 9113's initial values, h2's before any SETTINGS.
_DEFAULT_WINDOW: Final = 65_535
_DEFAULT_FRAME_SIZE: Final = 16_384


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


class ServerConnection(PlainReader, PlainSender):
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
        self._pending = {}  # streams the plain path opened, not yet h2's
        # WINDOW_UPDATE frames receive_plain took in since the caller last
        # looked (prism.rpc.flood counts them; the caller sends what they let out).
        self.plain_window_updates = 0
        self.plain_opened = 0
        self._plain_payload = False

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
        self.materialize()  # (h2 may act on any stream)
        events: list[h2.events.Event] = super().receive_data(data)
        return events

    def ack_connection(self, length: int) -> None:
        """Hand ``length`` received bytes back to the connection's window (h2
        batches the WINDOW_UPDATEs); the streams' windows are the caller's."""
        increment = self._inbound_flow_control_window_manager.process_bytes(length)
        if increment:
            frame = WindowUpdateFrame(0)
            frame.window_increment = increment
            self._prepare_for_sending([frame])


__all__ = [
    "DATA_READ",
    "H2_READ",
    "HEADERS_READ",
    "RESPONSE_HEADERS",
    "TRAILERS_OK",
    "WINDOW_READ",
    "PlainFrame",
    "ServerConnection",
]


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
