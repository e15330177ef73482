"""The load generator's bare HTTP/2 connection, against h2's server side over a socketpair:
statuses read from trailers (also when the server indexes them in its HPACK table), answers
kept whole across DATA frames, errors named, PING answered, a wrong answer seen as wrong."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest

from prism.benchmark.frames import Connection, Done, Pending, status_name
from prism.benchmark.workload import Calls, Spec, grpc_frame

PATH = b"/prism.kv.v1.KeyValue/GetItems"


class Server:
    """h2's server side of a socketpair; answers each call as ``respond`` says."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.requests: dict[int, bytes] = {}
        self.sock.sendall(self.h2.data_to_send())

    def read(self) -> list[int]:
        """Take what the client sent; the streams whose request is complete."""
        ended = []
        for event in self.h2.receive_data(self.sock.recv(1 << 20)):
            if isinstance(event, h2.events.DataReceived):
                self.requests[event.stream_id] = self.requests.get(event.stream_id, b"") + event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended.append(event.stream_id)
        self.flush()
        return ended

    def answer(self, sid: int, body: bytes | None, status: str, *, split: bool = False) -> None:
        if body is None:  # trailers-only
            self.h2.send_headers(sid, [(":status", "200"), ("grpc-status", status)], end_stream=True)
        else:
            self.h2.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            chunks = [body[:3], body[3:]] if split else [body]
            for chunk in chunks:
                self.h2.send_data(sid, chunk)
            self.h2.send_headers(sid, [("grpc-status", status), ("grpc-message", "")], end_stream=True)
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Server]]:
    a, b = socket.socketpair()
    conn = Connection(a, "test")
    conn.flush()
    server = Server(b)
    server.read()
    try:
        yield conn, server
    finally:
        a.close()
        b.close()


def exchange(conn: Connection, server: Server) -> list[int]:
    conn.flush()
    return server.read()


def receive(conn: Connection) -> list[Done]:
    conn.sock.setblocking(True)
    conn.sock.settimeout(2)
    try:
        done = conn.receive()
    finally:
        conn.sock.setblocking(False)
    conn.flush()
    return done


def test_calls_end_with_their_trailers_status_and_whole_answers(pair: tuple[Connection, Server]) -> None:
    conn, server = pair
    calls = Calls(Spec("ns", {"get": 1}, 10, 100, "uniform", 1.0, 1, 1))
    ended: list[Done] = []
    # Several rounds: h2's encoder indexes the trailers in its dynamic table, so the
    # same block bytes later mean an entry of that table: the client must keep decoding.
    for round_ in range(4):
        for key in range(3):
            conn.start(Pending("get", key, 0.0), PATH, calls.build["get"](key))
        streams = exchange(conn, server)
        assert len(streams) == 3
        for n, sid in enumerate(streams):
            key = (sid - 1) // 2 % 3
            assert server.requests[sid] == calls.build["get"](key)
            if n == 0:
                server.answer(sid, calls.expected_get(key), "0", split=True)
            elif n == 1:
                server.answer(sid, None, "14")  # UNAVAILABLE, trailers-only
            else:
                server.answer(sid, grpc_frame(b"\x0a\x00"), "0")  # OK status, wrong answer
        while len(ended) < 3 * (round_ + 1):
            ended += receive(conn)
    assert not conn.calls
    assert conn._decoder.header_table.dynamic_entries, "h2 did not index: the test lost its point"
    by_key: dict[int, list[str]] = {}
    for done in ended:
        verdict = done.status
        if verdict == "OK" and not calls.check["get"](done.call.key, bytes(done.call.data)):
            verdict = "WRONG_ANSWER"
        by_key.setdefault(done.call.key, []).append(verdict)
    assert sorted(v for verdicts in by_key.values() for v in verdicts) == sorted(
        ["OK"] * 4 + ["UNAVAILABLE"] * 4 + ["WRONG_ANSWER"] * 4
    )


def test_ping_is_answered_and_a_reset_stream_ends_its_call(pair: tuple[Connection, Server]) -> None:
    conn, server = pair
    conn.start(Pending("get", 0, 0.0), PATH, grpc_frame(b""))
    (sid,) = exchange(conn, server)
    server.h2.ping(b"12345678")
    server.h2.reset_stream(sid, error_code=8)
    server.flush()
    (done,) = receive(conn)
    assert done.status == "RST_STREAM"
    events = server.h2.receive_data(_drain(server))
    assert any(isinstance(e, h2.events.PingAckReceived) for e in events)


def test_goaway_fails_the_calls_it_drops_and_closes_the_connection(pair: tuple[Connection, Server]) -> None:
    conn, server = pair
    conn.start(Pending("get", 0, 0.0), PATH, grpc_frame(b""))
    exchange(conn, server)
    server.h2.close_connection(last_stream_id=0)
    server.flush()
    (done,) = receive(conn)
    assert done.status == "GOAWAY" and conn.closed == "GOAWAY"
    assert not conn.can_send(5)


def test_status_names() -> None:
    assert [status_name(c) for c in (b"0", b"8", b"14", b"99", None)] == [
        "OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "STATUS_99", "NO_STATUS",
    ]  # fmt: skip


def _drain(server: Server) -> bytes:
    server.sock.settimeout(2)
    return server.sock.recv(1 << 20)


def test_a_block_is_decoded_anew_once_the_servers_hpack_table_moved(pair: tuple[Connection, Server]) -> None:
    conn, server = pair
    # h2 indexes each new trailer: "14" first sits at index 62, then "0" takes 62 and
    # pushes "14" to 63, so the same one-byte block (index 62) means 14, then 0.
    statuses = []
    for status in ("14", "14", "0", "0", "14"):
        conn.start(Pending("get", 0, 0.0), PATH, grpc_frame(b""))
        (sid,) = exchange(conn, server)
        server.answer(sid, None, status)
        (done,) = receive(conn)
        statuses.append(done.status)
    assert statuses == ["UNAVAILABLE", "UNAVAILABLE", "OK", "OK", "UNAVAILABLE"]


def test_a_deadline_travels_as_grpc_timeout_and_only_when_asked(pair: tuple[Connection, Server]) -> None:
    conn, server = pair
    seen: dict[int, dict[bytes, bytes]] = {}
    receive_events = server.h2.receive_data

    def keep_headers(data: bytes) -> list[h2.events.Event]:
        events = receive_events(data)
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                seen[event.stream_id] = dict(event.headers)
        return events

    server.h2.receive_data = keep_headers  # type: ignore[method-assign]
    body = grpc_frame(b"")
    conn.start(Pending("get", 0, 0.0), PATH, body, timeout_ms=1000)
    conn.start(Pending("get", 1, 0.0), PATH, body)
    conn.start(Pending("get", 2, 0.0), PATH, body, timeout_ms=250)
    assert len(exchange(conn, server)) == 3
    assert [seen[sid].get(b"grpc-timeout") for sid in (1, 3, 5)] == [b"1000m", None, b"250m"]
