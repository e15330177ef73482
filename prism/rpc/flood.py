"""HTTP/2 flood limits, sans I/O: what one peer may make a connection do.

A ``FloodGuard`` looks at every frame h2 parses for one connection, before h2
acts on it, and raises ``Flood`` when the peer has crossed one of these lines
(``GrpcProtocol`` then answers GOAWAY(ENHANCE_YOUR_CALM) with the flood's
``debug`` bytes and stops reading):

- **Control frames**: more than ``CONTROL_FRAMES_PER_WINDOW`` PING, SETTINGS,
  PRIORITY or unknown frames within ``CONTROL_WINDOW_S``. PING and SETTINGS
  make h2 queue an acknowledgement; the others are work with no request in
  them. Frames are counted as they arrive, not as acknowledgements pile up:
  the kernel's socket buffers take megabytes of acks from a peer that does
  not read before any queue in this process would grow. A SETTINGS frame
  counts once per parameter, and one with more than ``MAX_SETTINGS_PARAMS``
  (Go's net/http2 limit) is a flood by itself: h2 works through every one.
- **WINDOW_UPDATE and PRIORITY frames**, Envoy's rules over the connection's
  life (``protocol_constraints.cc``, with its defaults): more WINDOW_UPDATE
  frames than ``1 + 2 * (streams opened + WINDOW_UPDATES_PER_DATA_FRAME_SENT
  * DATA frames sent)``, or more PRIORITY frames than
  ``PRIORITY_FRAMES_PER_STREAM * (1 + streams opened)``. A receiver sends
  WINDOW_UPDATEs for the data it is sent, so a client that sends far more
  than our DATA frames call for is making h2 walk its windows for nothing;
  PRIORITY frames mean nothing to this server (h2 ignores them) beyond the
  work of parsing them. ``ServerConnection.data_frames_sent`` counts the
  DATA frames of every send path (the plain ones and h2's ``send_data``).
- **Empty frames**: more than ``MAX_CONSECUTIVE_EMPTY_FRAMES`` HEADERS,
  CONTINUATION or DATA frames in a row with no payload (padding aside) and no
  END_STREAM; a non-empty one of those kinds ends the run. This is Envoy's
  ``max_consecutive_inbound_frames_with_empty_payload`` with its default.
- **Rapid reset**: the client resets more than half of the streams it opened
  before they were answered, once that is more than half of at least
  ``RAPID_RESET_MIN_STREAMS`` (Envoy's rule, which likewise closes early once
  so many resets are in that no later stream could bring the share back
  under half). A reset only counts if it is *premature*: the client
  abandons a request it has not finished sending within
  ``PREMATURE_RESET_S`` of opening it (Envoy's
  ``premature_reset_min_stream_lifetime_seconds``, 1 s), or cancels a
  request it has sent whole within ``MIN_PREMATURE_S`` (50 ms). gRPC clients
  cancel a sent call at its deadline (RST_STREAM(CANCEL)), and on a loaded
  server that comes before the answer, often soon after the server read the
  request (it waited in the socket); that is a slow server, not an attack,
  and closing the connection would fail every call on it. Calls cancelled
  50 ms or more after they were sent come no faster than
  ``max_concurrent_streams`` per 50 ms on a connection: the rate at which
  any client may send calls.
- **Pings on an idle connection** (gRPC's keepalive enforcement, as
  grpc-core's ``Chttp2PingAbusePolicy``): with no call open, a PING less than
  ``MIN_IDLE_PING_INTERVAL_S`` after the previous one is a strike, and the
  strike after ``MAX_PING_STRIKES`` is the end (debug data
  ``too_many_pings``, which gRPC clients read as "back off your keepalive").
  grpc-core forgets the strikes whenever the server sends HEADERS or DATA;
  here a call opened since the previous PING does the same (every stream is
  answered), and a PING while calls are open is never a strike: those are
  bounded by the control-frame count.

The ordinary call path pays little here: its HEADERS, DATA and
WINDOW_UPDATE frames are read by ``prism.rpc.h2conn``'s plain path, which
asks ``window_updates_allowed`` before it takes a WINDOW_UPDATE (one it
would refuse is left to h2, and so judged here in order) and whose count
``window_updates`` adds; each frame h2 parses costs one more function call
and a dict lookup, small beside h2's own work on it. The clock
is read once per ``_STAMP_EVERY`` control frames and on PINGs that arrive on
an idle connection, never per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from h2.stream import StreamState
from hyperframe.frame import (
    AltSvcFrame,
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from prism.rpc.h2conn import ServerConnection

if TYPE_CHECKING:
    from prism.rpc.call import Call

CONTROL_FRAMES_PER_WINDOW: Final = 10_000
CONTROL_WINDOW_S: Final = 10.0
MAX_SETTINGS_PARAMS: Final = 100
MAX_CONSECUTIVE_EMPTY_FRAMES: Final = 1
RAPID_RESET_MIN_STREAMS: Final = 500
MIN_IDLE_PING_INTERVAL_S: Final = 5.0
MAX_PING_STRIKES: Final = 2
# Envoy's max_inbound_window_update_frames_per_data_frame_sent and
# max_inbound_priority_frames_per_stream, at their defaults.
WINDOW_UPDATES_PER_DATA_FRAME_SENT: Final = 10
PRIORITY_FRAMES_PER_STREAM: Final = 100

PREMATURE_RESET_S: Final = 1.0
MIN_PREMATURE_S: Final = 0.05

# GOAWAY debug data, one per kind of flood; ``too_many_pings`` is gRPC's own.
TOO_MANY_PINGS: Final = b"too_many_pings"
CONTROL_FLOOD: Final = b"too_many_control_frames"
SETTINGS_TOO_LARGE: Final = b"too_many_settings_parameters"
EMPTY_FRAMES: Final = b"too_many_empty_frames"
RAPID_RESET: Final = b"too_many_resets"
WINDOW_UPDATE_FLOOD: Final = b"too_many_window_updates"
PRIORITY_FLOOD: Final = b"too_many_priority_frames"

# Control frames are timed in batches of this many: one clock read per batch,
# and a window is judged on CONTROL_FRAMES_PER_WINDOW frames to that accuracy.
_STAMP_EVERY: Final = 1000
_STAMPS: Final = CONTROL_FRAMES_PER_WINDOW // _STAMP_EVERY + 1
# A stream in these states was opened by the client and not answered yet.
_UNANSWERED: Final = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
_NEVER: Final = float("-inf")


class Flood(Exception):
    """The peer crossed a flood limit; ``debug`` goes in the GOAWAY."""

    def __init__(self, debug: bytes) -> None:
        super().__init__(debug.decode())
        self.debug = debug


class FloodGuard:
    """The flood counters of one connection.

    ``conn`` is the connection's h2 state (read, never changed), ``calls`` the
    calls open on it by stream (its emptiness, and a reset stream's call), ``clock`` a monotonic clock
    in seconds. ``watch`` puts the guard in front of h2's frame parsing.
    """

    def __init__(self, conn: ServerConnection, calls: Mapping[int, Call], clock: Callable[[], float]) -> None:
        self._conn = conn
        self._calls = calls
        self._clock = clock
        self.control = 0  # control frames read, ever
        self._next_stamp = 1
        self._stamps: list[float] = []  # the last _STAMPS (a list: a deque is ~0.8 KB per connection)
        # The plain path (prism.rpc.h2read) zeroes ``empty_run`` and counts
        # its WINDOW_UPDATEs here before h2 parses a frame after those it read;
        # the streams it opened in the read being taken in are the
        # connection's ``plain_opened`` until GrpcProtocol adds them to ``opened``.
        self.empty_run = 0
        self.opened = 0  # streams the client opened
        self._resets = 0
        self._last_ping = _NEVER
        self._ping_streams = 0
        self._strikes = 0
        self._window_updates = 0
        self._priorities = 0

    def watch(self) -> None:
        """See every frame h2 parses from now on, before h2 acts on it."""
        buffer = self._conn.incoming_buffer
        # FrameBuffer passes each parsed frame, CONTINUATIONs included, through
        # this method before h2 dispatches it: one place that sees them all,
        # in order, one at a time (h2 acts on a frame before parsing the next).
        parse = buffer._update_header_buffer
        checks = _CHECKS  # one table for every connection (bound methods were ~1 KB each)

        def checked(frame: Any) -> Any:
            check = checks.get(frame.__class__)
            if check is not None:
                check(self, frame)
            return parse(frame)

        buffer._update_header_buffer = checked  # type: ignore[method-assign,assignment]

    # -- per frame type ------------------------------------------------------

    def _data(self, frame: DataFrame) -> None:
        self._payload(frame.data, frame.flags)

    def _headers(self, frame: HeadersFrame) -> None:
        if frame.stream_id > self._conn.highest_inbound_stream_id:
            self.opened += 1
        self._payload(frame.data, frame.flags)

    def _continuation(self, frame: ContinuationFrame) -> None:
        self._payload(frame.data, frame.flags)

    def _payload(self, data: bytes, flags: Any) -> None:
        if data or "END_STREAM" in flags:
            self.empty_run = 0
            return
        self.empty_run += 1
        if self.empty_run > MAX_CONSECUTIVE_EMPTY_FRAMES:
            raise Flood(EMPTY_FRAMES)

    def _reset(self, frame: RstStreamFrame) -> None:
        stream = self._conn.streams.get(frame.stream_id)
        if stream is None or stream.state_machine.state not in _UNANSWERED:
            return
        call = self._calls.get(frame.stream_id)
        if call is not None and not _premature(call, self._clock()):
            return
        self._resets += 1
        doubled = 2 * self._resets
        if doubled > RAPID_RESET_MIN_STREAMS and doubled > self.opened + self._conn.plain_opened:
            raise Flood(RAPID_RESET)

    def _ping(self, frame: PingFrame) -> None:
        self._count_control(1)
        if "ACK" in frame.flags:
            return
        streams = self._conn.highest_inbound_stream_id
        if self._calls or streams != self._ping_streams:
            # Calls open, or answered since the last PING: the client is
            # working, and its pings are not keepalive abuse.
            self._ping_streams = streams
            self._strikes = 0
            self._last_ping = _NEVER
            if self._calls:
                return
        now = self._clock()
        if now - self._last_ping < MIN_IDLE_PING_INTERVAL_S:
            self._strikes += 1
            if self._strikes > MAX_PING_STRIKES:
                raise Flood(TOO_MANY_PINGS)
        self._last_ping = now

    def _settings(self, frame: SettingsFrame) -> None:
        n = len(frame.settings)
        if n > MAX_SETTINGS_PARAMS:
            raise Flood(SETTINGS_TOO_LARGE)
        self._count_control(n or 1)

    def _window_update(self, frame: WindowUpdateFrame) -> None:
        self.window_updates(1)

    def window_updates(self, n: int) -> None:
        """Count ``n`` WINDOW_UPDATE frames (h2's, one at a time; the plain
        path's, those of a read at once); too many raise ``Flood``."""
        if not self.window_updates_allowed(n, self._conn.plain_opened):
            raise Flood(WINDOW_UPDATE_FLOOD)
        self._window_updates += n

    def window_updates_allowed(self, n: int, streams: int) -> bool:
        """Whether ``n`` more WINDOW_UPDATE frames are within the rule, with
        ``streams`` opened besides those counted (``opened``)."""
        streams += self.opened
        allowed = 1 + 2 * (streams + WINDOW_UPDATES_PER_DATA_FRAME_SENT * self._conn.data_frames_sent)
        return self._window_updates + n <= allowed

    def _priority(self, frame: PriorityFrame) -> None:
        self._priorities += 1
        if self._priorities > PRIORITY_FRAMES_PER_STREAM * (1 + self.opened + self._conn.plain_opened):
            raise Flood(PRIORITY_FLOOD)
        self._count_control(1)

    def _control_frame(self, frame: Frame) -> None:
        self._count_control(1)

    def _count_control(self, n: int) -> None:
        self.control += n
        if self.control >= self._next_stamp:
            self._stamp()

    def _stamp(self) -> None:
        # Stamps are taken at the 1st, 1001st, 2001st... frame: the oldest of
        # a full deque is CONTROL_FRAMES_PER_WINDOW frames before the newest.
        now = self._clock()
        stamps = self._stamps
        stamps.append(now)
        if len(stamps) > _STAMPS:
            del stamps[0]
        self._next_stamp += _STAMP_EVERY  # (a frame counts at most MAX_SETTINGS_PARAMS: one batch)
        if len(stamps) == _STAMPS and now - stamps[0] < CONTROL_WINDOW_S:
            raise Flood(CONTROL_FLOOD)


# What each frame type is checked with (FloodGuard's methods, unbound).
def _premature(call: Call, now: float) -> bool:
    """Whether a reset of ``call``'s stream now is one a rapid reset counts."""
    return now - call.opened < (MIN_PREMATURE_S if call.half_closed else PREMATURE_RESET_S)


_CHECKS: dict[type[Frame], Callable[[FloodGuard, Any], None]] = {
    DataFrame: FloodGuard._data,
    HeadersFrame: FloodGuard._headers,
    ContinuationFrame: FloodGuard._continuation,
    RstStreamFrame: FloodGuard._reset,
    PingFrame: FloodGuard._ping,
    SettingsFrame: FloodGuard._settings,
    PriorityFrame: FloodGuard._priority,
    WindowUpdateFrame: FloodGuard._window_update,
    ExtensionFrame: FloodGuard._control_frame,
    AltSvcFrame: FloodGuard._control_frame,
}
