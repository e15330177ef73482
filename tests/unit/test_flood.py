"""HTTP/2 floods against GrpcProtocol, byte by byte, with a fake clock.

Each flood must end in GOAWAY(ENHANCE_YOUR_CALM) naming it, after no more
frames than its limit lets through; a client below each limit is never cut.
The trio server's side (the GOAWAY written, the connection closed, other
connections untouched) is in test_flood_server.py.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from prism.errors import StatusCode
from prism.rpc import flood
from prism.rpc.protocol import CALL_END, CALL_START, CONNECTION_CLOSED, GrpcProtocol

from .h2client import RAW_REQUEST_HEADERS, frame

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
HEADERS = RAW_REQUEST_HEADERS


def parse(data: bytes) -> list[Frame]:
    out = []
    view = memoryview(data)
    while view:
        f, length = Frame.parse_frame_header(view[:9])
        f.parse_body(view[9 : 9 + length])
        out.append(f)
        view = view[9 + length :]
    return out


class Peer:
    """A raw HTTP/2 client of one GrpcProtocol, on a clock the test moves."""

    def __init__(self, **kw: Any) -> None:
        self.now = 1000.0
        self.proto = GrpcProtocol(clock=lambda: self.now, **kw)
        self.proto.initiate()
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        self.proto.receive_data(client.data_to_send())
        client.receive_data(self.proto.data_to_send())
        self.proto.receive_data(client.data_to_send())  # our SETTINGS ACK
        self.encoder = hpack.Encoder()
        self.sid = -1
        self.out: list[Frame] = parse(self.proto.data_to_send())
        self.dispatched = 0  # frames h2 acted on (the plain path's not counted)
        receive_frame = self.proto._h2._receive_frame

        def counting(f: Frame) -> Any:
            self.dispatched += 1
            return receive_frame(f)

        self.proto._h2._receive_frame = counting  # type: ignore[method-assign]

    def send(self, raw: bytes) -> list[tuple[int, Any]]:
        events = self.proto.receive_data(raw)
        self.out += parse(self.proto.data_to_send())
        return events

    def headers(self, *, end: bool = True) -> bytes:
        self.sid += 2
        flags = ["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
        return HeadersFrame(self.sid, data=self.encoder.encode(HEADERS), flags=flags).serialize()

    def request(self) -> bytes:
        return (
            self.headers(end=False) + DataFrame(self.sid, data=frame(b""), flags=["END_STREAM"]).serialize()
        )

    def goaway(self) -> GoAwayFrame | None:
        found = [f for f in self.out if isinstance(f, GoAwayFrame)]
        assert len(found) <= 1
        return found[0] if found else None

    def acks(self) -> int:
        return sum(1 for f in self.out if isinstance(f, PingFrame) and "ACK" in f.flags)


def ping(n: int = 1) -> bytes:
    return PingFrame(0, opaque_data=n.to_bytes(8, "big")).serialize()


def assert_calm(peer: Peer, debug: bytes) -> GoAwayFrame:
    goaway = peer.goaway()
    assert goaway is not None, "no GOAWAY"
    assert (goaway.error_code, goaway.additional_data) == (CALM, debug)
    assert peer.proto.broken
    assert peer.send(ping()) == []  # nothing more is read
    return goaway


# -- control frames ------------------------------------------------------------


def test_a_ping_flood_ends_after_the_limit_with_no_more_acks() -> None:
    peer = Peer()
    peer.send(peer.headers(end=False))  # a call open: the idle-ping rule is not what cuts
    events = peer.send(ping() * 50_000)
    assert events == [(CONNECTION_CLOSED, None)]
    assert_calm(peer, flood.CONTROL_FLOOD)
    # Counted as they arrived: never more acknowledged than the limit.
    assert flood.CONTROL_FRAMES_PER_WINDOW - 100 <= peer.acks() <= flood.CONTROL_FRAMES_PER_WINDOW
    assert peer.dispatched <= flood.CONTROL_FRAMES_PER_WINDOW + 1


def test_pings_under_the_rate_are_answered_for_ever() -> None:
    peer = Peer()
    peer.send(peer.headers(end=False))
    for _ in range(40):  # 900 a second for 40 s: 36,000 PINGs, each acknowledged
        peer.send(ping() * 900)
        peer.now += 1.0
    assert peer.goaway() is None
    assert peer.acks() == 36_000


def test_a_settings_flood_is_a_control_flood() -> None:
    peer = Peer()
    peer.send(SettingsFrame(0).serialize() * 20_000)
    assert_calm(peer, flood.CONTROL_FLOOD)
    assert peer.dispatched <= flood.CONTROL_FRAMES_PER_WINDOW + 1


def test_settings_count_per_parameter_and_too_many_in_one_frame_end_it() -> None:
    peer = Peer()
    many = SettingsFrame(0, settings={0x4: 65535})
    many.settings = {0x10 + i: i for i in range(flood.MAX_SETTINGS_PARAMS)}  # unknown ids: ignored
    peer.send(many.serialize() * 5)
    assert peer.goaway() is None
    many.settings = {0x10 + i: i for i in range(flood.MAX_SETTINGS_PARAMS + 1)}
    peer.send(many.serialize())
    assert_calm(peer, flood.SETTINGS_TOO_LARGE)
    # 100 parameters a frame: the window fills in 100 frames.
    peer = Peer()
    many.settings = {0x10 + i: i for i in range(flood.MAX_SETTINGS_PARAMS)}
    peer.send(many.serialize() * 200)
    assert_calm(peer, flood.CONTROL_FLOOD)
    assert peer.dispatched <= flood.CONTROL_FRAMES_PER_WINDOW // flood.MAX_SETTINGS_PARAMS + 1


def priority(sid: int = 1) -> bytes:
    return PriorityFrame(sid, depends_on=0, stream_weight=16).serialize()


def test_priority_frames_count_as_control_frames() -> None:
    peer = Peer()
    for _ in range(100):  # streams enough for the per-stream limit to be above the window's
        peer.send(peer.headers())
    peer.send(priority() * 20_000)
    assert_calm(peer, flood.CONTROL_FLOOD)


# -- WINDOW_UPDATE and PRIORITY frames (Envoy's rules) ---------------------------


def window_update(sid: int = 0, increment: int = 1) -> bytes:
    return WindowUpdateFrame(sid, window_increment=increment).serialize()


def test_priority_frames_are_limited_per_stream_opened() -> None:
    peer = Peer()
    before = peer.dispatched
    peer.send(priority() * flood.PRIORITY_FRAMES_PER_STREAM)  # (1 + 0 streams) * 100
    assert peer.goaway() is None
    peer.send(priority())
    assert_calm(peer, flood.PRIORITY_FLOOD)
    assert peer.dispatched - before == flood.PRIORITY_FRAMES_PER_STREAM
    # Each stream opened, by h2 or the plain path, allows 100 more.
    peer = Peer()
    peer.send(peer.request())  # h2's path (a new header block)
    peer.send(peer.request() + peer.request())  # the plain path (the same block again)
    peer.send(priority() * (4 * flood.PRIORITY_FRAMES_PER_STREAM))
    assert peer.goaway() is None
    peer.send(priority())
    assert_calm(peer, flood.PRIORITY_FLOOD)


def test_window_updates_beyond_envoys_allowance_end_the_connection() -> None:
    peer = Peer()
    before = peer.dispatched
    events = peer.send(window_update() * 100_000)  # no stream, nothing sent: 1 allowed
    assert events == [(CONNECTION_CLOSED, None)]
    assert_calm(peer, flood.WINDOW_UPDATE_FLOOD)
    assert peer.dispatched - before == 1


def sent_data_frames(peer: Peer) -> int:
    return sum(1 for f in peer.out if isinstance(f, DataFrame))


def test_the_window_update_allowance_counts_streams_and_every_data_frame_sent() -> None:
    peer = Peer()
    for size in (10, 40_000):  # one frame (send_plain_unary); three (send_plain_data)
        events = peer.send(peer.request())
        (call,) = (c for k, c in events if k == CALL_END)
        peer.proto.send_unary(call, b"x" * size)
    events = peer.send(peer.request())
    (call,) = (c for k, c in events if k == CALL_END)
    peer.proto.send_headers(call)
    peer.proto._h2.send_data(call.stream_id, b"\x00\x00\x00\x00\x00")  # h2's own path
    peer.out += parse(peer.proto.data_to_send())
    frames = sent_data_frames(peer)
    assert frames == 1 + 3 + 1 == peer.proto._h2.data_frames_sent
    allowed = 1 + 2 * (3 + flood.WINDOW_UPDATES_PER_DATA_FRAME_SENT * frames)
    peer.send(window_update() * allowed)
    assert peer.goaway() is None
    peer.send(window_update(call.stream_id))  # stream-level ones count alike
    assert_calm(peer, flood.WINDOW_UPDATE_FLOOD)


def test_window_updates_read_plainly_count_as_h2s_do() -> None:
    # grpc-core's calls: HEADERS, the stream's WINDOW_UPDATE, DATA, the
    # connection's. Once the header block repeats, the plain path reads all
    # four; the allowance holds for its WINDOW_UPDATEs as for h2's, and the
    # one past it is refused in order, wherever in a read it comes.
    peer = Peer()
    for _ in range(3):  # the header block taught to the HPACK cache, then plain
        peer.send(peer.request())
    before = peer.dispatched
    head = peer.headers(end=False)
    body = DataFrame(peer.sid, data=frame(b""), flags=["END_STREAM"]).serialize()
    grpc_core_call = head + window_update(peer.sid, 5) + body + window_update(0, 100)
    events = peer.send(grpc_core_call)
    assert [k for k, _ in events].count(CALL_END) == 1
    assert peer.dispatched == before  # h2 parsed none of them
    opened = 4
    allowed = 1 + 2 * opened  # nothing sent yet
    peer.send(window_update() * (allowed - 2))  # the two above counted
    assert peer.goaway() is None
    assert peer.dispatched == before
    peer.send(window_update() * 2)
    assert_calm(peer, flood.WINDOW_UPDATE_FLOOD)
    assert peer.dispatched == before  # the one past it left to h2, whose parse it stopped


def test_a_refused_call_reset_and_forgotten_in_the_same_read_breaks_nothing() -> None:
    # Under overload: a call refused as its HEADERS are read (shedding), which
    # the client cancels (its deadline) in the same read, before more than
    # 128 new streams: h2 forgets the closed stream before the refusal is
    # written. It was sent to h2 as a HEADERS frame on an unknown stream,
    # which h2 takes for one the server opens: TooManyStreamsError, and the
    # connection, every call on it, failed.
    peer = Peer(max_concurrent_streams=1000)
    for _ in range(3):  # the header block taught to the HPACK cache, then plain
        peer.send(peer.request())
    refusal = ((b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"8"))
    peer.proto.shed = lambda headers: refusal
    first = peer.request()
    reset = RstStreamFrame(peer.sid, error_code=8).serialize()  # CANCEL
    events = peer.send(first + reset + b"".join(peer.request() for _ in range(140)))
    assert (CONNECTION_CLOSED, None) not in events
    assert peer.goaway() is None
    answered = {f.stream_id for f in peer.out if isinstance(f, HeadersFrame) and "END_STREAM" in f.flags}
    assert len(answered) == 140  # every call but the reset one refused, on a connection still open


def test_a_client_acknowledging_large_answers_is_never_cut() -> None:
    peer = Peer(max_concurrent_streams=1000)
    client_window = 0
    for _ in range(200):
        events = peer.send(peer.request())
        (call,) = (c for k, c in events if k == CALL_END)
        before = len(peer.out)
        peer.proto.send_unary(call, b"x" * 60_000)
        peer.out += parse(peer.proto.data_to_send())
        for f in peer.out[before:]:
            if isinstance(f, DataFrame):  # a WINDOW_UPDATE per frame, stream and connection
                client_window += f.flow_controlled_length
                peer.send(window_update(f.stream_id, f.flow_controlled_length))
                peer.send(window_update(0, f.flow_controlled_length))
    assert client_window == 200 * 60_005
    assert peer.goaway() is None


# -- pings on an idle connection (gRPC keepalive enforcement) ------------------


def test_idle_pings_every_5_s_are_never_cut() -> None:
    peer = Peer()
    for n in range(30):
        peer.send(ping(n))
        peer.now += flood.MIN_IDLE_PING_INTERVAL_S
    assert peer.goaway() is None and peer.acks() == 30


def test_idle_pings_too_often_get_too_many_pings_on_the_third_strike() -> None:
    peer = Peer()
    peer.send(ping())  # the first is free
    for strike in range(flood.MAX_PING_STRIKES):
        peer.now += 1.0
        peer.send(ping())
        assert peer.goaway() is None, f"cut at strike {strike + 1}"
    peer.now += 1.0
    peer.send(ping())
    assert_calm(peer, flood.TOO_MANY_PINGS)


def test_a_call_between_pings_forgives_the_strikes() -> None:
    peer = Peer()
    for _ in range(20):
        peer.send(ping())
        events = peer.send(peer.request())
        call = next(c for k, c in events if k == CALL_END)
        peer.proto.send_unary(call, b"")
        peer.now += 1.0
    assert peer.goaway() is None


def test_pings_while_a_call_is_open_are_not_strikes() -> None:
    peer = Peer()
    peer.send(peer.headers(end=False))
    for _ in range(20):
        peer.send(ping())
        peer.now += 0.1
    assert peer.goaway() is None and peer.acks() == 20


def test_ping_acks_count_but_are_no_strikes() -> None:
    peer = Peer()
    for _ in range(10):
        peer.send(PingFrame(0, flags=["ACK"]).serialize())
    assert peer.goaway() is None


# -- empty frames ----------------------------------------------------------------


def test_consecutive_empty_data_frames() -> None:
    peer = Peer()
    peer.send(peer.headers(end=False))
    empty = DataFrame(peer.sid).serialize()
    some = DataFrame(peer.sid, data=b"\x00").serialize()
    # One empty frame at a time, each followed by a payload (in the same
    # read or the next, read plainly or by h2): allowed.
    for _ in range(5):
        peer.send(empty + some)
        peer.send(empty)
        peer.send(some)
    assert peer.goaway() is None
    before = peer.dispatched
    events = peer.send(empty * 100_000)
    assert events == [(CONNECTION_CLOSED, None)]
    assert_calm(peer, flood.EMPTY_FRAMES)
    assert peer.dispatched - before == flood.MAX_CONSECUTIVE_EMPTY_FRAMES


def test_empty_frames_that_end_a_stream_are_fine() -> None:
    peer = Peer()
    for _ in range(20):
        peer.send(peer.headers(end=False) + DataFrame(peer.sid, flags=["END_STREAM"]).serialize())
    assert peer.goaway() is None


def test_padding_is_not_payload() -> None:
    peer = Peer()
    peer.send(peer.headers(end=False))
    padded = DataFrame(peer.sid, flags=["PADDED"])
    padded.pad_length = 10
    peer.send(padded.serialize() * 2)
    assert_calm(peer, flood.EMPTY_FRAMES)


def test_empty_continuation_frames() -> None:
    peer = Peer()
    block = peer.encoder.encode(HEADERS)
    peer.sid += 2
    raw = HeadersFrame(peer.sid, data=block[:3]).serialize()
    raw += ContinuationFrame(peer.sid).serialize() * 2
    peer.send(raw)
    assert_calm(peer, flood.EMPTY_FRAMES)


def test_empty_headers_frames() -> None:
    peer = Peer()
    peer.send(HeadersFrame(1, flags=["END_HEADERS"]).serialize() + HeadersFrame(3).serialize())
    assert_calm(peer, flood.EMPTY_FRAMES)


# -- rapid reset ---------------------------------------------------------------


def test_rapid_reset_is_cut_after_the_limit() -> None:
    peer = Peer()
    pairs = bytearray()
    for _ in range(200_000):
        pairs += peer.headers() + RstStreamFrame(peer.sid, error_code=8).serialize()
    events = peer.send(bytes(pairs))
    assert events == [(CONNECTION_CLOSED, None)]
    goaway = assert_calm(peer, flood.RAPID_RESET)
    limit = flood.RAPID_RESET_MIN_STREAMS // 2 + 1  # resets, one stream each
    assert goaway.last_stream_id <= 2 * limit - 1
    assert peer.dispatched <= 2 * limit


def test_resets_of_up_to_half_the_calls_are_fine() -> None:
    peer = Peer(max_concurrent_streams=10_000)
    for i in range(2000):
        events = peer.send(peer.request())
        (call,) = (c for k, c in events if k == CALL_START)
        if i % 2 == 0:  # answered first: never more than half reset
            peer.proto.send_unary(call, b"")
        else:
            peer.send(RstStreamFrame(peer.sid, error_code=8).serialize())
    assert peer.goaway() is None
    # Resets after the answer are not counted.
    for _ in range(600):
        events = peer.send(peer.request())
        (call,) = (c for k, c in events if k == CALL_START)
        peer.proto.send_unary(call, b"")
        peer.send(RstStreamFrame(peer.sid, error_code=8).serialize())
    assert peer.goaway() is None
    # One more unanswered reset than answered calls: the end.
    for n in range(601):
        peer.send(peer.request())
        assert peer.goaway() is None, n
        peer.send(RstStreamFrame(peer.sid, error_code=8).serialize())
    assert_calm(peer, flood.RAPID_RESET)


@pytest.mark.parametrize(
    ("whole", "lived", "counted"),
    [
        (False, 0.999, True),  # a request abandoned half sent: Envoy's 1 s
        (False, 1.0, False),
        (True, 0.049, True),  # a whole request cancelled at once
        (True, 0.0501, False),  # cancelled at its deadline on a slow server
        (True, 0.9, False),
    ],
)
def test_only_premature_resets_count(whole: bool, lived: float, counted: bool) -> None:
    """A loaded server's clients cancel calls at their deadlines: those resets
    are not a rapid reset, and a connection full of them stays open."""
    peer = Peer(max_concurrent_streams=10_000)
    streams = flood.RAPID_RESET_MIN_STREAMS
    for _ in range(streams):
        peer.send(peer.request() if whole else peer.headers(end=False))
    peer.now += lived
    for sid in range(1, 2 * streams, 2):
        peer.send(RstStreamFrame(sid, error_code=8).serialize())
    if counted:
        assert_calm(peer, flood.RAPID_RESET)
    else:
        assert peer.goaway() is None
        events = peer.send(peer.request())  # and it still serves
        assert CALL_START in [k for k, _ in events]


@pytest.mark.parametrize("opened", [0, 100, 499])
def test_rapid_reset_ends_early_once_no_later_stream_could_save_it(opened: int) -> None:
    peer = Peer()
    for _ in range(opened):  # streams answered before
        events = peer.send(peer.request())
        (call,) = (c for k, c in events if k == CALL_START)
        peer.proto.send_unary(call, b"")
    # Trips once resets > opened + resets - resets, and resets > 500 / 2.
    resets = max(flood.RAPID_RESET_MIN_STREAMS // 2, opened)
    for _ in range(resets):
        peer.send(peer.headers() + RstStreamFrame(peer.sid, error_code=8).serialize())
    assert peer.goaway() is None
    peer.send(peer.headers() + RstStreamFrame(peer.sid, error_code=8).serialize())
    assert_calm(peer, flood.RAPID_RESET)


@pytest.mark.parametrize(
    "breaking",
    # A flood, and a protocol error (a client stream with an even id).
    [ping() * 20_000, HeadersFrame(2, data=b"", flags=["END_HEADERS"]).serialize()],
    ids=["flood", "protocol_error"],
)
def test_an_answer_after_a_connection_error_is_dropped(breaking: bytes) -> None:
    peer = Peer()
    events = peer.send(peer.request())
    (call,) = (c for k, c in events if k == CALL_END)
    assert peer.send(breaking) == [(CONNECTION_CLOSED, None)]
    assert peer.goaway() is not None
    peer.proto.send_unary(call, b"late")  # the handler ends after the GOAWAY
    peer.proto.send_status(call, StatusCode.INTERNAL, "late")
    assert peer.proto.data_to_send() == b""
    assert peer.proto.idle
