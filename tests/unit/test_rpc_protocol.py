"""GrpcProtocol with plain function calls: no sockets, no trio.

A real h2 client connection and the protocol exchange bytes by hand, which
shows exactly what crosses the wire for each case.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import Frame, HeadersFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.errors import StatusCode
from prism.rpc.headers import parse_timeout
from prism.rpc.protocol import CALL_END, CALL_MESSAGE, CALL_START, GrpcProtocol
from prism.rpc.respond import encode_grpc_message

from .h2client import frame

REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/s/M"),
    (":authority", "x"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


class Pair:
    def __init__(self, **kw: Any) -> None:
        self.server = GrpcProtocol(**kw)
        self.server.initiate()
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.client.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.server_events: list[tuple[int, object]] = []
        self.exchange()

    def exchange(self) -> None:
        for _ in range(100):
            moved = False
            data = self.client.data_to_send()
            if data:
                self.server_events += self.server.receive_data(data)
                moved = True
            data = self.server.data_to_send()
            if data:
                evs = self.client.receive_data(data)
                for ev in evs:
                    if isinstance(ev, h2.events.DataReceived):
                        self.client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self.events += evs
                moved = True
            if not moved:
                return

    def request(self, path: str = "/s/M", body: bytes = frame(b"")) -> int:
        sid = self.client.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self.client.send_headers(sid, headers)
        self.client.send_data(sid, body, end_stream=True)
        self.exchange()
        return sid

    def received(self, sid: int) -> tuple[bytes, dict[str, str], dict[str, str]]:
        data = b"".join(
            e.data for e in self.events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid
        )
        heads = [
            dict(e.headers)
            for e in self.events
            if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived) and e.stream_id == sid
        ]
        return data, heads[0], heads[-1]


def test_unary_answer_bytes() -> None:
    p = Pair()
    sid = p.request()
    kinds = [k for k, _ in p.server_events]
    assert kinds == [CALL_START, CALL_MESSAGE, CALL_END]
    call = p.server_events[-1][1]
    p.server.send_unary(call, b"hello")  # type: ignore[arg-type]
    p.exchange()
    data, headers, trailers = p.received(sid)
    assert data == frame(b"hello")
    assert headers == {
        ":status": "200",
        "content-type": "application/grpc",
        "grpc-accept-encoding": "identity,deflate,gzip",
    }
    assert trailers == {"grpc-status": "0"}
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in p.events)
    assert p.server.idle


def test_large_answer_waits_for_flow_control() -> None:
    p = Pair()
    sid = p.request()
    call = p.server_events[-1][1]
    payload = bytes(range(256)) * 12_000  # 3 MB: far over the 64 KiB initial window
    p.server.send_unary(call, payload)  # type: ignore[arg-type]
    p.exchange()  # the client acknowledges; each WINDOW_UPDATE lets more out
    data, _, trailers = p.received(sid)
    assert data == frame(payload)
    assert trailers == {"grpc-status": "0"}


def test_error_is_trailers_only_with_percent_encoded_message() -> None:
    p = Pair()
    sid = p.request()
    call = p.server_events[-1][1]
    p.server.send_error(call, StatusCode.NOT_FOUND, "no ünicode 100%")  # type: ignore[arg-type]
    p.exchange()
    _, headers, _ = p.received(sid)
    assert headers["grpc-status"] == "5"
    assert headers["grpc-message"] == "no %C3%BCnicode 100%25"


def test_many_calls_interleaved() -> None:
    p = Pair()
    sids = [p.request(body=frame(b"%d" % i)) for i in range(50)]
    ends = [c for k, c in p.server_events if k == CALL_END]
    for call in reversed(ends):
        p.server.send_unary(call, call.messages[0])  # type: ignore[union-attr]
    p.exchange()
    for i, sid in enumerate(sids):
        assert p.received(sid)[0] == frame(b"%d" % i)


@pytest.mark.parametrize(
    ("header", "status"),
    [(("grpc-timeout", "bad"), b"3"), (("content-type", "text/plain"), b"2")],
    ids=["bad grpc-timeout", "not grpc"],
)
def test_request_refused_in_the_same_read_as_the_clients_goaway_is_answered(
    header: tuple[str, str], status: bytes
) -> None:
    # A client may send its last request and GOAWAY in one write. h2 marks
    # the connection CLOSED as it reads the GOAWAY, before the request is
    # answered; a request refused at once used to raise ProtocolError out of
    # receive_data (the connection died with a traceback, the call unanswered).
    p = Pair()
    sid = p.client.get_next_available_stream_id()
    headers = {
        ":method": "POST",
        ":scheme": "http",
        ":path": "/s/M",
        ":authority": "x",
        "content-type": "application/grpc",
        "te": "trailers",
    }
    headers[header[0]] = header[1]
    p.client.send_headers(sid, list(headers.items()))
    p.client.send_data(sid, frame(b""), end_stream=True)
    p.client.close_connection()
    p.server.receive_data(p.client.data_to_send())
    assert not p.server.broken
    # The client's h2 (CLOSED since its GOAWAY) would not read the answer:
    # read the frames, and the header block with the client's HPACK table.
    answer = memoryview(p.server.data_to_send())
    blocks = []
    while answer:
        head, length = Frame.parse_frame_header(answer[:9])
        if isinstance(head, HeadersFrame) and head.stream_id == sid:
            head.parse_body(answer[9 : 9 + length])
            blocks.append(dict(p.client.decoder.decode(head.data, raw=True)))
        answer = answer[9 + length :]
    assert [b.get(b"grpc-status") for b in blocks] == [status]


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(b"1S", 1.0), (b"250m", 0.25), (b"3M", 180.0), (b"2H", 7200.0), (b"99999999n", 0.099999999)],
)
def test_parse_timeout(raw: bytes, seconds: float) -> None:
    assert parse_timeout(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", [b"", b"S", b"1", b"1x", b"123456789S", b"-1S", b"1.5S"])
def test_parse_timeout_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_timeout(raw)


def test_grpc_message_plain_ascii_unchanged() -> None:
    assert encode_grpc_message("unknown namespace 'x'") == b"unknown namespace 'x'"


@given(st.text())
def test_grpc_message_is_percent_encoded_printable_ascii(message: str) -> None:
    """What a gRPC client decodes (percent-decoding, then UTF-8) is the message."""
    raw = encode_grpc_message(message)
    assert all(0x20 <= b <= 0x7E for b in raw)
    assert urllib.parse.unquote_to_bytes(raw) == message.encode("utf-8", "replace")


def send_cut(
    p: Pair, sid: int, body: bytes, cuts: list[int], *, take: Callable[[], None] = lambda: None
) -> None:
    points = sorted({c % len(body) for c in cuts} - {0})
    for start, stop in zip([0, *points], [*points, len(body)], strict=True):
        piece = start
        while piece < stop:
            window = p.client.local_flow_control_window(sid)
            assert window > 0, "the server gave no window back"
            end = min(piece + 16_384, stop, piece + window)  # a DATA frame's default maximum size
            p.client.send_data(sid, body[piece:end], end_stream=end == len(body))
            piece = end
            p.exchange()
            take()


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 300_000), cuts=st.lists(st.integers(1, 400_000), max_size=12))
def test_a_message_split_anywhere_across_data_frames_arrives_whole(size: int, cuts: list[int]) -> None:
    p = Pair()
    message = bytes((i * 7 + size) % 256 for i in range(size))
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, REQUEST_HEADERS)
    send_cut(p, sid, frame(message), cuts)
    call = next(c for k, c in p.server_events if k == CALL_END)
    assert call.messages == [message]  # type: ignore[union-attr]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40_000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 250_000), max_size=12),
)
def test_streamed_messages_split_anywhere_arrive_whole(sizes: list[int], cuts: list[int]) -> None:
    p = Pair(streaming_paths=frozenset({b"/s/M"}))
    messages = [bytes((i * 7 + n) % 256 for i in range(n)) for n in sizes]
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, REQUEST_HEADERS)
    p.exchange()
    call = p.server.calls[sid]
    taken: list[bytes] = []

    def take() -> None:  # the handler reads as messages come; the window comes back
        while (m := p.server.next_message(call)) is not None:
            taken.append(m)
        p.exchange()

    send_cut(p, sid, b"".join(frame(m) for m in messages), cuts, take=take)
    assert taken == messages


def test_a_stream_that_ends_inside_a_message_is_invalid_argument() -> None:
    p = Pair()
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, REQUEST_HEADERS)
    p.client.send_data(sid, frame(b"x" * 100)[:50], end_stream=True)
    p.exchange()
    _, headers, _ = p.received(sid)
    assert headers["grpc-status"] == str(int(StatusCode.INVALID_ARGUMENT))
    assert "truncated" in headers["grpc-message"]
