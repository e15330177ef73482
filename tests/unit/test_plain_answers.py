"""Large OK answers written plainly (prism.rpc.h2send) against h2's own writing,
and the vectored write that sends them (prism.rpc.writev).

An answer larger than one frame, within both flow-control windows, is queued
as frame headers between views of the serialized message: the bytes on the
wire, and h2's state after, must be exactly what h2's ``send_headers`` and
``send_data`` make of the same answer; and ``send_buffers`` must deliver a
list of buffers byte for byte, however the kernel splits the writes.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
import trio.testing

from prism.errors import StatusCode
from prism.rpc.call import Call
from prism.rpc.protocol import CALL_START, GrpcProtocol
from prism.rpc.writev import send_buffers

from .h2client import RAW_REQUEST_HEADERS, frame

REQUEST = RAW_REQUEST_HEADERS
FRAME = 16_384
# Around the frame size (the prefix takes 5 bytes of the first frame), and large.
SIZES = [0, 100, FRAME - 5, FRAME - 4, FRAME, 2 * FRAME - 5, 2 * FRAME - 4, 100_000, 1 << 20]


def _h2_only(proto: GrpcProtocol) -> GrpcProtocol:
    proto._h2.send_plain_unary = lambda sid, payload: False  # type: ignore[method-assign]
    proto._h2.send_plain_data = lambda sid, data: None  # type: ignore[method-assign]
    return proto


def _state(proto: GrpcProtocol) -> object:
    conn = proto._h2
    return (
        conn.state_machine.state,
        conn.outbound_flow_control_window,
        {sid: (s.state_machine.state, s.outbound_flow_control_window) for sid, s in conn.streams.items()},
    )


def _payload(n: int) -> bytes:
    return bytes((i * 7 + n) % 256 for i in range(n))


@pytest.mark.parametrize("window", [1 << 30, 1 << 20])
def test_large_answers_are_written_as_h2_writes_them(window: int) -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    # The window of every stream, and the connection's: an answer beyond it waits (h2's path).
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    client.increment_flow_control_window(window)
    plain, own = GrpcProtocol(), _h2_only(GrpcProtocol())
    calls: dict[GrpcProtocol, list[Call]] = {plain: [], own: []}
    for proto in (plain, own):
        proto.initiate()
    for size in SIZES:
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST)
        client.send_data(sid, frame(b"q"), end_stream=True)
        data = client.data_to_send()
        for proto in (plain, own):
            calls[proto] += [c for k, c in proto.receive_data(data) if k == CALL_START and c is not None]
            proto.send_unary(calls[proto][-1], _payload(size))
        sent = b"".join(plain.buffers_to_send())
        assert sent == own.data_to_send()
        assert _state(plain) == _state(own)
        answer = bytearray()
        for ev in client.receive_data(sent):
            if isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                answer += ev.data
                client.acknowledge_received_data(ev.flow_controlled_length, sid)
        if size + 5 <= window:  # else the rest goes out as the client gives window back
            assert bytes(answer) == frame(_payload(size))


def test_data_to_send_joins_the_queued_buffers_in_order() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 30})
    client.increment_flow_control_window(1 << 30)
    proto = GrpcProtocol()
    proto.initiate()
    client.send_headers(1, REQUEST)
    client.send_data(1, frame(b"q"), end_stream=True)
    (call,) = [c for k, c in proto.receive_data(client.data_to_send()) if k == CALL_START]
    assert call is not None
    proto.send_unary(call, _payload(50_000))
    proto.ping()  # h2's own output after the answer's buffers
    out = proto.data_to_send()
    assert out.endswith(b"keepaliv")
    assert proto.buffers_to_send() == []
    pings = [ev for ev in client.receive_data(out) if isinstance(ev, h2.events.PingReceived)]
    assert [p.ping_data for p in pings] == [b"keepaliv"]


async def test_send_buffers_delivers_every_byte_in_order() -> None:
    # More buffers than one sendmsg takes (IOV_MAX), some empty, megabytes in
    # all: far more than the socket buffers hold, so writes go out in parts.
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    buffers: list[bytes | bytearray | memoryview] = []
    for i in range(3000):
        chunk = _payload(i % 7 * 1500)
        buffers.append(memoryview(chunk)[i % 3 :] if i % 2 else bytearray(chunk))
    expected = b"".join(buffers)
    got = bytearray()

    async def read_all() -> None:
        while len(got) < len(expected):
            got.extend(await receiver.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await send_buffers(sender, buffers)
    assert bytes(got) == expected
    await sender.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send_buffers(sender, [b"a", b"b"])
    await receiver.aclose()


async def test_send_buffers_to_a_peer_that_left_is_a_broken_stream() -> None:
    left, right = trio.socket.socketpair()
    sender = trio.SocketStream(left)
    right.close()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await send_buffers(sender, [b"x" * 65536, b"y" * 65536])
    await sender.aclose()


async def test_send_buffers_on_another_stream_joins_them() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send_buffers(send, [b"ab", bytearray(b"cd"), memoryview(b"xef")[1:]])
    assert await receive.receive_some(100) == b"abcdef"


def _final_answers(client: h2.connection.H2Connection, data: bytes) -> dict[int, list[tuple[bytes, bytes]]]:
    got: dict[int, list[tuple[bytes, bytes]]] = {}
    for ev in client.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived):
            assert ev.stream_ended is not None  # trailers-only: one HEADERS frame that ends the stream
            got[ev.stream_id] = list(ev.headers)
    return got


ERRORS = [
    (
        StatusCode.RESOURCE_EXHAUSTED,
        "namespace flood: rps quota spent; retry",
        ((b"grpc-retry-pushback-ms", b"100"),),
    ),
    (StatusCode.NOT_FOUND, "no such namespace: 'x'", ()),
    (StatusCode.INVALID_ARGUMENT, "caf\u00e9 %", ()),
    (
        StatusCode.RESOURCE_EXHAUSTED,
        "namespace flood: rps quota spent; retry",
        ((b"grpc-retry-pushback-ms", b"100"),),
    ),
]


@pytest.mark.parametrize("resized", [False, True])
def test_error_answers_are_written_plainly_and_read_as_h2s(resized: bool) -> None:
    # A trailers-only answer (a refusal, an error before any message) is one
    # HEADERS frame; written plainly, the client reads the same headers as from
    # h2's own writing, the stream ends the same, and the HPACK state of both
    # sides stays in step (the OK answer after them decodes).
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    if resized:  # the encoder owes a table-size update: h2's path writes it
        client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1024})
    plain, own = GrpcProtocol(), _h2_only(GrpcProtocol())
    own._h2.send_plain_final = lambda sid, headers: False  # type: ignore[method-assign]
    for proto in (plain, own):
        proto.initiate()
    other = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    other.initiate_connection()
    if resized:
        other.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1024})
    for status, message, extra in ERRORS:
        sids = []
        for c in (client, other):
            sids.append(c.get_next_available_stream_id())
            c.send_headers(sids[-1], REQUEST)
            c.send_data(sids[-1], frame(b"q"), end_stream=True)
        answers = []
        for proto, c in ((plain, client), (own, other)):
            (call,) = [
                x for k, x in proto.receive_data(c.data_to_send()) if k == CALL_START and x is not None
            ]
            proto.send_error(call, status, message, extra)
            answers.append(_final_answers(c, b"".join(proto.buffers_to_send())))
        assert answers[0][sids[0]] == answers[1][sids[1]]
        headers = dict(answers[0][sids[0]])
        assert headers[b"grpc-status"] == str(int(status)).encode()
        assert _state(plain) == _state(own)
    # An OK answer after them, written by h2's encoder, still decodes.
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQUEST)
    client.send_data(sid, frame(b"q"), end_stream=True)
    (call,) = [x for k, x in plain.receive_data(client.data_to_send()) if k == CALL_START and x is not None]
    plain.send_unary(call, b"ok")
    events = client.receive_data(b"".join(plain.buffers_to_send()))
    assert any(isinstance(e, h2.events.DataReceived) and e.data == frame(b"ok") for e in events)


def test_an_error_answer_to_a_reset_stream_sends_nothing() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    proto = GrpcProtocol()
    proto.initiate()
    proto.receive_data(client.data_to_send())
    proto.buffers_to_send()
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQUEST)
    client.send_data(sid, frame(b"q"), end_stream=True)
    (call,) = [x for k, x in proto.receive_data(client.data_to_send()) if k == CALL_START and x is not None]
    client.reset_stream(sid)
    proto.receive_data(client.data_to_send())
    proto.buffers_to_send()
    proto.send_error(call, StatusCode.NOT_FOUND, "gone")
    assert b"".join(proto.buffers_to_send()) == b""
