"""The plain-frame reader (prism.rpc.h2conn) against h2's own reading.

Two GrpcProtocol servers get the same client bytes, cut at the same random
places: one reads plain call frames itself (as in production), the other
gives every byte to h2. Whatever the client does (requests with and without
a body, bodies split over frames, timeouts, content-length, resets, pings,
window updates, settings changes, frames that break the protocol, header
lists well-formed or not, each sent more than once), both must report the
same calls and messages, send the same bytes back (the same RST_STREAM for a
malformed request), and leave h2's connection and stream state the same.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, WindowUpdateFrame
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prism.errors import StatusCode
from prism.rpc.budget import INITIAL_STREAM_WINDOW
from prism.rpc.call import Call
from prism.rpc.protocol import CALL_START, GrpcProtocol

from .h2client import frame

WINDOW = 32 * 1024  # a stream's receive window: a "flood" (3 x 16 KiB in one read) overruns it
PATHS = ["/prism.kv.v1.KeyValue/GetItems", "/prism.kv.v1.KeyValue/PutItems", "/s/M"]

RAW = [
    "data_unknown",
    "data_again",
    "data_padded",
    "data_huge",
    "flood",
    "headers_even",
    "headers_low",
    "headers_open",
    "continuation",
]

# Header lists that may break RFC 9113's rules: the usual request with fields
# taken out or put in anywhere, drawn from names and values that are wrong in
# each way prism.rpc.headers looks for, or any bytes at all.
FIELD_NAMES = [b":method", b":scheme", b":path", b":authority", b":status", b":x", b"te", b"host"]
FIELD_NAMES += [
    b"Host",
    b"connection",
    b"upgrade",
    b"x-user",
    b"x user",
    b"x:y",
    b"x\x00",
    b"",
    b"content-type",
]
FIELD_VALUES = [b"POST", b"CONNECT", b"http", b"/s/M", b"", b"127.0.0.1:8980", b"u@h", b"trailers", b"gzip"]
FIELD_VALUES += [b"application/grpc", b" v", b"v\t", b"v\r", b"a\nb", b"v\x00", b"v"]
field = st.tuples(
    st.one_of(st.sampled_from(FIELD_NAMES), st.binary(max_size=3)),
    st.one_of(st.sampled_from(FIELD_VALUES), st.binary(max_size=3)),
)


@st.composite
def header_list(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    headers = _request_headers(draw(st.sampled_from(PATHS)))
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            del headers[draw(st.integers(0, len(headers) - 1))]
        else:
            headers.insert(draw(st.integers(0, len(headers))), draw(field))
    return headers


# Mostly the same few header blocks, as real clients send: a block is read
# by the plain path from its third sending on (h2 decodes the first, which
# teaches the HPACK table, and the second, which is then remembered).
request = st.tuples(
    st.just("request"),
    st.sampled_from(PATHS[:1] * 4 + PATHS),
    st.binary(max_size=40),  # message body
    # 0: one DATA frame, 1: split in two, 2: headers only, 3: DATA at a later step,
    # 4: as grpc-core sends it (HEADERS, the stream's WINDOW_UPDATE, DATA, the connection's)
    st.integers(0, 4),
    st.sampled_from([None] * 6 + ["5S", "bad"]),  # grpc-timeout
    st.sampled_from([None] * 6 + [0] * 6 + [1, -1]),  # content-length: none, right, one off
)
action = st.one_of(
    request,
    request,
    request,
    request,
    request,
    st.tuples(st.just("late")),
    st.tuples(st.just("odd"), st.integers(0, 3), st.booleans()),  # an odd header list, with a body or not
    st.tuples(st.just("answer"), st.integers(0, 50), st.sampled_from([True, False, "big"])),
    st.tuples(st.just("reset"), st.integers(0, 50)),
    st.tuples(st.just("ping")),
    st.tuples(st.just("window"), st.integers(1, 100_000)),
    st.tuples(st.just("stream_window"), st.integers(0, 50), st.sampled_from([1, 5, 100_000, 2**31 - 1])),
    st.tuples(st.just("table"), st.sampled_from([0, 256, 4096])),
    # Frames that break the protocol end the connection: drawn rarely, so that
    # most runs go on long enough to reach the plain path's other cases.
    st.tuples(st.just("raw"), st.sampled_from(RAW + ["nothing"] * 3 * len(RAW))),
    st.tuples(st.just("flush"), st.integers(0, 200)),
    st.tuples(st.just("flush"), st.just(1 << 20)),
    st.tuples(st.just("flush"), st.just(1 << 20)),
    st.tuples(st.just("flush"), st.just(1 << 20)),
)
WARM_UP = [("request", PATHS[0], b"", 0, None, None), ("flush", 1 << 20)] * 2


def _plain_off(proto: GrpcProtocol) -> GrpcProtocol:
    proto._h2.receive_plain = lambda data, *_: data  # type: ignore[method-assign]
    proto._h2.send_plain_data = lambda sid, data: None  # type: ignore[method-assign]  # h2 frame by frame
    return proto


def _call_view(call: Call | None) -> object:
    if call is None:
        return None
    return (call.stream_id, call.path, call.timeout_s, tuple(call.messages), tuple(call.metadata), call.done)


def _h2_state(proto: GrpcProtocol) -> object:
    conn = proto._h2
    streams = {
        sid: (
            s.state_machine.state,
            s.state_machine.client,
            s.state_machine.headers_received,
            s.state_machine.trailers_received,
            s.state_machine.headers_sent,
            s.state_machine.trailers_sent,
            s.state_machine.stream_closed_by,
            s._inbound_window_manager.current_window_size,
            s.outbound_flow_control_window,
            s._actual_content_length,
        )
        for sid, s in conn.streams.items()
        if not s.closed  # closed streams are forgotten at different times
    }
    return (
        conn.state_machine.state,
        conn.highest_inbound_stream_id,
        conn._inbound_flow_control_window_manager.current_window_size,
        conn.outbound_flow_control_window,
        streams,
        proto.broken,
    )


def _request_headers(path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"127.0.0.1:8980"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


class Run:
    def __init__(self, odd: list[list[tuple[bytes, bytes]]] | None = None) -> None:
        self.odd = odd or [_request_headers(PATHS[0])]
        self.fast, self.slow = self.servers()
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                # Sends the odd header lists as they are.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.client.initiate_connection()
        self.fast.initiate()
        self.slow.initiate()
        self.pending = b""
        self.calls: list[tuple[Call, Call]] = []
        self.late: list[tuple[int, bytes]] = []
        self.ping_acks = 0  # the client's
        self.deliver(0, everything=True)

    def play(self, steps: list[tuple[Any, ...]]) -> None:
        """Act out ``steps`` (until the connection breaks), then deliver everything."""
        for step in steps:
            self.act(step)
            if self.slow.broken:
                break
        self.deliver(0, everything=True)

    def servers(self) -> tuple[GrpcProtocol, GrpcProtocol]:
        """The server under test, and the one it must agree with."""
        fast = GrpcProtocol(initial_window_bytes=WINDOW)
        return fast, _plain_off(GrpcProtocol(initial_window_bytes=WINDOW))

    def deliver(self, cut: int, *, everything: bool = False) -> None:
        if self.slow.broken:
            return
        self.pending += self.client.data_to_send()
        if everything:
            cut = len(self.pending)
        chunk, self.pending = self.pending[:cut], self.pending[cut:]
        if chunk:
            fast = self.fast.receive_data(chunk)
            slow = self.slow.receive_data(chunk)
            assert [(k, _call_view(c)) for k, c in fast] == [(k, _call_view(c)) for k, c in slow]
            self.calls += [(f, s) for (k, f), (_, s) in zip(fast, slow, strict=True) if k == CALL_START]
        self.compare()

    def compare(self) -> None:
        out = self.fast.data_to_send()
        assert out == self.slow.data_to_send()
        if self.slow.broken:  # both sent the same GOAWAY; nothing more to compare
            assert self.fast.broken
            return
        assert _h2_state(self.fast) == _h2_state(self.slow)
        if out and not self.fast.broken:
            try:
                for ev in self.client.receive_data(out):
                    if isinstance(ev, h2.events.PingAckReceived):
                        self.ping_acks += 1
                    if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                        self.client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            except h2.exceptions.ProtocolError:
                pass

    def act(self, step: tuple[Any, ...]) -> None:
        if step[0] == "flush":
            self.deliver(step[1])
            return
        try:
            self._act(step)
        except h2.exceptions.ProtocolError:
            pass  # what the client's h2 refuses to send (limits, closed streams, GOAWAY)

    def _act(self, step: tuple[Any, ...]) -> None:
        kind = step[0]
        client = self.client
        if kind == "request":
            _, path, body, shape, timeout, content_length = step
            sid = client.get_next_available_stream_id()
            message = frame(body)
            headers = _request_headers(path)
            if timeout is not None:
                headers.append((b"grpc-timeout", timeout.encode()))
            if content_length is not None:
                headers.append((b"content-length", str(len(message) + content_length).encode()))
            client.send_headers(sid, headers, end_stream=shape == 2)
            if shape == 0:
                client.send_data(sid, message, end_stream=True)
            elif shape == 1:
                client.send_data(sid, message[:3])
                client.send_data(sid, message[3:], end_stream=True)
            elif shape == 3:
                self.late.append((sid, message))
            elif shape == 4:
                client.increment_flow_control_window(5, stream_id=sid)
                client.send_data(sid, message, end_stream=True)
                client.increment_flow_control_window(len(message) + 100)
        elif kind == "odd":
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, self.odd[step[1] % len(self.odd)], end_stream=not step[2])
            if step[2]:
                client.send_data(sid, frame(b"odd"), end_stream=True)
        elif kind == "late":
            if self.late:
                sid, message = self.late.pop(0)
                if sid in client.streams and client.streams[sid].open:
                    client.send_data(sid, message, end_stream=True)
        elif kind == "answer":
            if self.calls:
                fast, slow = self.calls.pop(step[1] % len(self.calls))
                for proto, call in ((self.fast, fast), (self.slow, slow)):
                    if step[2] == "big":  # over both windows: sent as the client gives window back
                        proto.send_unary(call, bytes(range(256)) * 400)
                    elif step[2]:
                        proto.send_unary(call, b"answer" * 3)
                    else:
                        proto.send_error(call, StatusCode.NOT_FOUND, "no such record")
        elif kind == "reset":
            open_ids = sorted(sid for sid, s in client.streams.items() if s.open)
            if open_ids:
                client.reset_stream(open_ids[step[1] % len(open_ids)])
        elif kind == "ping":
            client.ping(b"12345678")
        elif kind == "window":
            client.increment_flow_control_window(step[1])
        elif kind == "stream_window":  # on any stream the client knows, closed or not
            if client.streams:
                ids = sorted(client.streams)
                sid = ids[step[1] % len(ids)]
                # (h2's client would refuse some of these: the frame itself, as a peer may send it.)
                client._data_to_send += WindowUpdateFrame(sid, window_increment=step[2]).serialize()
        elif kind == "table":
            client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: step[1]})
        elif kind == "raw" and step[1] != "nothing":
            client._data_to_send += self._raw(step[1])

    def _raw(self, what: str) -> bytes:
        highest = max(self.client.highest_outbound_stream_id or 1, 1)
        if what == "data_unknown":
            return DataFrame(highest + 200, data=frame(b"x"), flags=["END_STREAM"]).serialize()
        if what == "data_again":  # most likely after that stream's END_STREAM
            return DataFrame(highest, data=frame(b"x"), flags=["END_STREAM"]).serialize()
        if what == "data_huge":  # one byte over the frame size limit
            return DataFrame(highest, data=bytes(16385)).serialize()
        if what == "flood":  # past the stream's flow-control window
            return DataFrame(highest, data=bytes(16384)).serialize() * 3
        if what == "data_padded":
            f = DataFrame(highest, data=frame(b"x"), flags=["END_STREAM", "PADDED"])
            f.pad_length = 3
            return f.serialize()
        if what == "continuation":
            return ContinuationFrame(highest + 2, data=b"", flags=["END_HEADERS"]).serialize()
        # The warm-up's header block: one the plain path knows.
        block = self.client.encoder.encode(_request_headers(PATHS[0]))
        if what == "headers_open":  # its block goes on in a CONTINUATION frame
            return HeadersFrame(highest + 2, data=block).serialize()
        sid = highest + 1 if what == "headers_even" else max(highest - 2, 1)
        return HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()


PLAIN = ("request", PATHS[0], b"", 0, None, None)  # the warm-up's request: read plainly
LATE = ("request", PATHS[0], b"", 3, None, None)  # the same, its body sent later
ALL = ("flush", 1 << 20)


ODD = ("odd", 0, True)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(action, min_size=10, max_size=100), odd=st.lists(header_list(), min_size=1, max_size=4))
# A body that breaks its content-length, arriving in a later read than its headers.
@example(odd=[], steps=[("request", "/s/M", b"abc", 3, None, 1), ALL, ("late",)])
# A request read plainly (its header block, content-length 9 included, seen
# twice before) whose body is shorter than its content-length.
@example(
    odd=[],
    steps=[("request", PATHS[0], b"abcd", 0, None, 0), ALL] * 2
    + [("request", PATHS[0], b"abc", 0, None, 1), ALL],
)
# A plain request reset by the client in the same read.
@example(odd=[], steps=[PLAIN, ALL, PLAIN, ("reset", 0)])
# Frames the plain path must leave to h2, on a stream it could otherwise read.
@example(odd=[], steps=[LATE, ALL, ("raw", "flood"), ALL])
@example(odd=[], steps=[LATE, ALL, ("raw", "data_huge"), ALL])
@example(odd=[], steps=[LATE, ALL, ("raw", "data_padded"), ALL])
@example(odd=[], steps=[PLAIN, ALL, ("raw", "data_again"), ALL])
@example(odd=[], steps=[("raw", "headers_even"), ALL])
@example(odd=[], steps=[PLAIN, ALL, PLAIN, ALL, ("raw", "headers_low"), ALL])
@example(odd=[], steps=[("raw", "headers_open"), ALL, ("raw", "continuation"), ALL, PLAIN, ALL])
@example(odd=[], steps=[("raw", "headers_open"), ALL, PLAIN, ALL])
# Found by this test: the client's h2 breaks off (a GOAWAY) after table-size
# changes, and that GOAWAY arrives in the same read as a request refused at
# once (a bad grpc-timeout), which must still be answered.
@example(
    odd=[],
    steps=[("request", PATHS[0], b"", 0, None, None)] * 4
    + [("table", 0), ("table", 0), ALL, ("answer", 0, False)]
    + [("request", PATHS[0], b"", 0, "bad", None), ("flush", 0)],
)
# A malformed request (here: a second :path) sent until its block is cached,
# then the same block that the plain path would read if it were well-formed.
@example(odd=[[*_request_headers(PATHS[0]), (b":path", b"/s/M")]], steps=[ODD, ALL] * 4)
@example(
    odd=[[(b"x-user", b"v"), *_request_headers(PATHS[0])]], steps=[ODD, ALL, ODD, ODD, ALL, PLAIN, ODD, ALL]
)
# A large answer written as plain DATA frames, over both windows, going out
# as the client gives window back, and another one after a window update.
@example(
    odd=[],
    steps=[
        *(PLAIN, ALL, ("answer", 0, "big"), ALL, ALL, ALL, ALL, PLAIN, ALL, ("window", 100_000)),
        *(("answer", 0, "big"), ALL, ALL, ALL, ALL),
    ],
)
# Window updates read plainly: grpc-core's calls, a large answer let out by
# its stream's window updates, one past 2^31-1 (h2's: a stream reset), one
# on a stream that is closed (h2's: ignored).
@example(
    odd=[],
    steps=[
        *(("request", PATHS[0], b"abc", 4, None, None), ALL) * 3,
        *(PLAIN, ALL, ("answer", 0, "big"), ALL, ("stream_window", 50, 100_000), ALL, ALL),
        *(LATE, ALL, ("stream_window", 50, 2**31 - 1), ALL, ("stream_window", 0, 5), ALL),
    ],
)
# Found by this test: window updates past the flood guard's allowance,
# read plainly among requests in one read, are refused where h2 would.
@example(
    odd=[],
    steps=[
        *(("window", 1),) * 2,
        ("request", PATHS[0], b"", 0, None, None),
        *(("window", 1),) * 5,
        ("request", PATHS[0], b"", 4, None, None),
        ("window", 1),
    ],
)
# A read that ends inside a frame, and the next one.
@example(odd=[], steps=[PLAIN, ("flush", 20), PLAIN, ALL])
def test_plain_frames_agree_with_h2(
    steps: list[tuple[Any, ...]], odd: list[list[tuple[bytes, bytes]]]
) -> None:
    Run(odd).play(WARM_UP + steps)


def test_repeated_requests_take_the_plain_path() -> None:
    # Not a timing test: once the client's header block repeats, the h2
    # parser is not asked at all, and the calls still come out right.
    run = Run()
    asked = 0
    receive = run.fast._h2.receive_data

    def counting(data: Any) -> Any:
        nonlocal asked
        asked += 1
        return receive(data)

    run.fast._h2.receive_data = counting  # type: ignore[method-assign]
    for n in range(20):
        run.act(("request", PATHS[0], b"%d" % n, 0, None, None))
        run.deliver(0, everything=True)
    assert asked <= 2  # the first request teaches the HPACK table; the rest are plain
    assert [f.messages for f, _ in run.calls] == [[b"%d" % n] for n in range(20)]


def test_grpc_core_calls_take_the_plain_path() -> None:
    # grpc-core's clients send a WINDOW_UPDATE for the stream between a
    # call's HEADERS and DATA, and one for the connection after: those are
    # read plainly too, so h2's parser is not asked either.
    run, asked = _warm_run_counting_h2_reads()
    before = run.fast._h2.outbound_flow_control_window
    for n in range(20):
        run.act(("request", PATHS[0], b"%d" % n, 4, None, None))
        run.deliver(0, everything=True)
    assert asked == [0]
    assert [f.messages for f, _ in run.calls[-20:]] == [[b"%d" % n] for n in range(20)]
    given = sum(len(frame(b"%d" % n)) + 100 for n in range(20))  # the connection's updates
    assert run.fast._h2.outbound_flow_control_window == before + given


def test_frames_h2_reads_leave_the_calls_after_them_plain() -> None:
    # Under load, gRPC clients cancel calls at their deadlines: RST_STREAM
    # frames among the requests of one read. Each goes to h2 alone; the
    # requests after it are still read plainly (h2's own reading is never
    # asked), and every call comes out as h2 alone would give it.
    run, asked = _warm_run_counting_h2_reads()
    for n in range(10):
        run.act(("request", PATHS[0], b"%d" % n, 4, None, None))
        run.act(("reset", 0))
        run.act(("ping",))
    run.deliver(0, everything=True)
    assert asked == [0]
    assert run.ping_acks == 10
    assert len(run.calls) >= 10


def _warm_run_counting_h2_reads() -> tuple[Run, list[int]]:
    """A warmed-up ``Run`` whose fast side counts the reads it hands to h2 (in the list)."""
    run = Run()
    for step in WARM_UP:
        run.act(step)
    asked = [0]
    receive = run.fast._h2.receive_data

    def counting(data: Any) -> Any:
        asked[0] += 1
        return receive(data)

    run.fast._h2.receive_data = counting  # type: ignore[method-assign]
    return run, asked


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(1, 20_000), min_size=1, max_size=8))
@example(cuts=[1])  # every read one byte: the held frame header completed byte by byte
@example(cuts=[65_536])  # the reader's first read size: four frames and part of the fifth
def test_reads_that_end_inside_frames_stay_plain(cuts: list[int]) -> None:
    # A message of several 16 KiB DATA frames, read in pieces cut anywhere:
    # the start of a frame a read ends inside is held for the next read, not
    # given to h2 (which would then parse every later frame itself); the
    # calls, answers and h2 state still equal h2's own reading (``deliver``
    # compares them on every read).
    run, asked = _warm_run_counting_h2_reads()
    body = bytes(range(256)) * 120  # 30,720 bytes: two DATA frames within the 32 KiB window
    read: list[list[bytes]] = []
    for n in range(3):
        sid = run.client.get_next_available_stream_id()
        run.client.send_headers(sid, _request_headers(PATHS[0]))
        message = frame(body[n:])
        for start in range(0, len(message), 16_384):  # h2 sends no frame over the peer's maximum
            chunk = message[start : start + 16_384]
            run.client.send_data(sid, chunk, end_stream=start + len(chunk) == len(message))
        run.pending += run.client.data_to_send()
        i = 0
        while run.pending:
            run.deliver(cuts[i % len(cuts)])
            i += 1
        read.append(run.calls[-1][0].messages)
        run.act(("answer", len(run.calls) - 1, True))
        run.deliver(0, everything=True)
    assert asked == [0]
    assert read == [[body[n:]] for n in range(3)]


def test_a_read_h2_took_that_ends_inside_a_frame_does_not_keep_h2_reading() -> None:
    # A frame only h2 reads (here a PING) is given to h2 alone, and the plain
    # path goes on after it; a read that ends inside a later DATA frame
    # leaves that frame's start held, so h2's own reading (``receive_data``)
    # is never asked: h2 is not left parsing every later frame until a read
    # happens to end on a frame boundary. (The calls, answers and h2 state
    # still equal h2's own reading: ``deliver`` compares them on every read.)
    run, asked = _warm_run_counting_h2_reads()
    body = bytes(range(256)) * 120  # two DATA frames
    sid = run.client.get_next_available_stream_id()
    run.client.send_headers(sid, _request_headers(PATHS[0]))
    run.client.ping(b"12345678")
    message = frame(body)
    for start in range(0, len(message), 16_384):
        chunk = message[start : start + 16_384]
        run.client.send_data(sid, chunk, end_stream=start + len(chunk) == len(message))
    run.pending += run.client.data_to_send()
    run.deliver(len(run.pending) - 20_000)  # ends inside the first DATA frame
    assert asked == [0]
    assert run.ping_acks == 1  # the PING was h2's, and answered
    run.deliver(0, everything=True)
    assert asked == [0]
    assert run.calls[-1][0].messages == [body]


def test_the_lean_connection_sets_what_h2s_own_init_does() -> None:
    # ServerConnection builds h2's state itself (h2 is pinned): if a new h2
    # adds an attribute to H2Connection.__init__, this says so.
    proto = GrpcProtocol(max_message_bytes=1024, max_concurrent_streams=7, max_header_list_bytes=4096)
    ours = proto._h2
    theirs = h2.connection.H2Connection(ours.config)
    missing = set(vars(theirs)) - set(vars(ours)) - {"_frame_dispatch_table"}
    assert not missing
    assert dict(ours.remote_settings) == dict(theirs.remote_settings)
    s = h2.settings.SettingCodes
    expected = h2.settings.Settings(
        client=False,
        initial_values={
            s.MAX_CONCURRENT_STREAMS: 7,
            s.INITIAL_WINDOW_SIZE: INITIAL_STREAM_WINDOW,
            s.MAX_HEADER_LIST_SIZE: 4096,
        },
    )
    assert dict(ours.local_settings) == dict(expected)
    for name in ("outbound_flow_control_window", "max_outbound_frame_size", "max_inbound_frame_size"):
        assert getattr(ours, name) == getattr(theirs, name)
    # Each connection's settings are its own (they change as SETTINGS are acknowledged).
    other = GrpcProtocol(max_message_bytes=1024, max_concurrent_streams=7, max_header_list_bytes=4096)._h2
    other.remote_settings[s.MAX_FRAME_SIZE] = 32768
    other.remote_settings.acknowledge()
    assert ours.remote_settings.max_frame_size == 16384


def test_plain_answers_leave_each_stream_as_h2s_own_send_path_does() -> None:
    # The plain path opens streams and answers them setting their state
    # machines' flags as h2's inputs would: an OK answer and a trailers-only
    # error, each against a server whose answers all go through h2.
    run = Run()
    run.slow._h2.send_plain_unary = lambda sid, payload: False  # type: ignore[method-assign]
    run.slow._h2.send_plain_final = lambda sid, headers: False  # type: ignore[method-assign]
    for step in [*WARM_UP, PLAIN, PLAIN, ALL]:
        run.act(step)
    (fast_ok, slow_ok), (fast_error, slow_error) = run.calls[-2:]
    run.fast.send_unary(fast_ok, b"answer")
    run.slow.send_unary(slow_ok, b"answer")
    run.fast.send_error(fast_error, StatusCode.NOT_FOUND, "no such record")
    run.slow.send_error(slow_error, StatusCode.NOT_FOUND, "no such record")
    assert run.fast.data_to_send() and run.slow.data_to_send()  # (HPACK-encoded differently)
    for fast, slow in ((fast_ok, slow_ok), (fast_error, slow_error)):
        ours = run.fast._h2.streams[fast.stream_id].state_machine
        theirs = run.slow._h2.streams[slow.stream_id].state_machine
        assert ours.state is h2.stream.StreamState.CLOSED
        assert vars(ours) == vars(theirs)
