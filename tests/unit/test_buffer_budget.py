"""The buffer budgets and the flow control that keeps them (prism.rpc.budget, prism.rpc.inbound).

A real h2 client and ``GrpcProtocol`` exchange bytes by hand, so each test
sees what the client is allowed to send (its flow-control windows), which
streams are refused, what the server holds (``budget.held``) and what each
call is answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
import trio
import trio.testing
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.errors import StatusCode
from prism.rpc.budget import INITIAL_STREAM_WINDOW, ConnectionBudget, WorkerBudget
from prism.rpc.call import Call
from prism.rpc.methods import MethodTable
from prism.rpc.pieces import Pieces
from prism.rpc.pinned import _PIN_FACTOR
from prism.rpc.protocol import CALL_END, CALL_START, GrpcProtocol
from prism.rpc.server import Connection, ServerSettings

from .h2client import H2Client, frame

STREAMING = b"/s/Stream"
PIECEWISE = "/s/Pieces"  # a method whose decoder takes a large message as its pieces
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
MIB = 1024 * 1024


class Pair:
    """A client connection and the server's protocol; ``send`` writes what
    the client's windows allow and keeps the rest, as a client would."""

    def __init__(
        self, *, limit: int = 16 * MIB, worker: WorkerBudget | None = None, max_message: int = 4 * MIB
    ):
        self.worker = worker if worker is not None else WorkerBudget(512 * MIB)
        self.budget = ConnectionBudget(limit, self.worker)
        self.server = GrpcProtocol(
            budget=self.budget,
            streaming_paths=frozenset({STREAMING}),
            piecewise_paths=frozenset({PIECEWISE.encode()}),
            max_message_bytes=max_message,
        )
        self.server.initiate()
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.calls: dict[int, Call] = {}
        self.ended: set[int] = set()
        self.unsent: dict[int, bytearray] = {}
        self.end_after: set[int] = set()
        self.exchange()

    def exchange(self) -> None:
        for _ in range(10_000):
            self._send_what_fits()
            moved = False
            data = self.client.data_to_send()
            if data:
                for kind, call in self.server.receive_data(data):
                    if call is not None and kind == CALL_START:
                        self.calls[call.stream_id] = call
                    if call is not None and kind == CALL_END:
                        self.ended.add(call.stream_id)
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

    def _send_what_fits(self) -> None:
        for sid, rest in list(self.unsent.items()):
            n = min(len(rest), self.client.local_flow_control_window(sid), 16384)
            try:
                if n > 0:
                    self.client.send_data(sid, bytes(rest[:n]))
                    del rest[:n]
                if not rest:
                    del self.unsent[sid]
                    if sid in self.end_after:
                        self.client.end_stream(sid)
            except h2.exceptions.StreamClosedError:  # refused: a client would retry it elsewhere
                del self.unsent[sid]

    def open(self, path: str = "/s/M") -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "x"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        self.unsent[sid] = bytearray()
        return sid

    def send(self, sid: int, body: bytes, *, end: bool = True) -> None:
        self.unsent.setdefault(sid, bytearray()).extend(body)
        if end:
            self.end_after.add(sid)
        self.exchange()

    def window(self, sid: int) -> int:
        return self.client.local_flow_control_window(sid)

    def resets(self) -> dict[int, int]:
        return {e.stream_id: e.error_code for e in self.events if isinstance(e, h2.events.StreamReset)}

    def status(self, sid: int) -> tuple[int, str] | None:
        for e in self.events:
            if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived) and e.stream_id == sid:
                headers = dict(e.headers)
                if b"grpc-status" in headers:
                    return int(headers[b"grpc-status"]), headers.get(b"grpc-message", b"").decode()
        return None


def test_a_large_message_gets_window_for_all_of_it_and_arrives_whole() -> None:
    p = Pair()
    sid = p.open()
    body = bytes(range(256)) * 4096  # 1 MiB: 16 times the initial window
    p.send(sid, frame(body))
    call = p.calls[sid]
    assert sid in p.ended and call.messages == [body]
    assert p.budget.held == len(body) + 5
    p.server.send_unary(call, b"ok")
    p.exchange()
    assert p.status(sid) == (0, "")
    assert p.budget.held == 0 and p.worker.held == 0


@pytest.mark.parametrize("path", ["/s/M", PIECEWISE])
def test_large_messages_of_streams_interleaved_in_each_read_arrive_whole(path: str) -> None:
    # Each read carries several DATA frames of each stream, interleaved as
    # clients send them: a stream's frames of one read are taken as one
    # (prism.rpc.h2conn), kept as views of the bytes read, and its message
    # copied together once (a bytes), or handed over as those pieces.
    p = Pair()
    rest = {}
    bodies = {}
    for n in range(4):
        sid = p.open(path)
        bodies[sid] = bytes((i * (n + 3)) % 251 for i in range(300_000 + n * 7_001))
        rest[sid] = bytearray(frame(bodies[sid]))
    p.exchange()
    while rest:
        for _ in range(3):  # three frames of each stream per read, where windows allow
            for sid, left in list(rest.items()):
                n = min(len(left), p.window(sid), 16384)
                if n > 0:
                    p.client.send_data(sid, bytes(left[:n]), end_stream=n == len(left))
                    del left[:n]
                if not left:
                    del rest[sid]
        p.exchange()
    for sid, body in bodies.items():
        assert sid in p.ended and len(p.calls[sid].messages) == 1
        message = p.calls[sid].messages[0]
        if path == PIECEWISE:
            assert type(message) is Pieces and len(message) == len(body) and bytes(message) == body
            assert len(message.parts) > 1  # (the frames, as they came)
        else:
            assert type(message) is bytes and message == body
    assert p.budget.held == sum(len(b) + 5 for b in bodies.values())


def test_the_reads_that_pieces_keep_views_of_stay_within_a_bound_of_what_they_hold() -> None:
    # A piece of a message under way is a view of the bytes read, which keeps
    # the whole read alive: the reads so kept are at most twice the bytes
    # the views hold, else the views of the reads they hold least of are
    # copied (a peer sending a byte of a message in each read of other frames
    # would otherwise hold a whole read per byte).
    p = Pair()
    big = p.open(PIECEWISE)
    body = frame(bytes(range(256)) * 1024)  # 256 KiB: it spans reads

    def send(sid: int, data: bytes, end: bool = False) -> None:  # in frames of the default size
        for at in range(0, len(data), 16_384):
            p.client.send_data(sid, data[at : at + 16_384], end_stream=end and at + 16_384 >= len(data))

    def kinds() -> list[type]:
        parts = p.server.calls[big]._parts
        assert parts is not None
        return [type(part) for part in parts[1:]]  # (the first came with the stream's headers)

    for _ in range(2):  # (a header block seen before is read on the plain path: prism.rpc.h2conn)
        p.send(p.open(), frame(b"warm"))
    send(big, body[:100])
    p.exchange()  # (its prefix: the window for all of it)
    other = p.open()
    other_body = frame(b"o" * 200_000)
    send(big, body[100:200])
    send(other, other_body[:49_152])  # a read mostly of another message under way: kept...
    p.exchange()
    assert kinds() == [memoryview]
    send(other, other_body[49_152:], end=True)  # ...until that message is whole and let go
    p.exchange()
    assert p.calls[other].messages == [b"o" * 200_000]
    assert kinds() == [bytes]
    small = p.open()
    send(big, body[200:300])
    send(small, frame(b"s" * 60_000), end=True)  # a read mostly of a call's that is whole at once
    p.exchange()
    assert p.calls[small].messages == [b"s" * 60_000]
    assert kinds() == [bytes, bytes]
    send(big, body[300:49_452])  # a read of its own frames: kept
    p.exchange()
    assert kinds()[:2] == [bytes, bytes] and set(kinds()[2:]) == {memoryview}
    assert p.server._pinned_bytes <= _PIN_FACTOR * p.server._view_bytes
    send(big, body[49_452:], end=True)
    p.exchange()
    (message,) = p.calls[big].messages
    assert type(message) is Pieces and bytes(message) == body[5:]
    p.server.release_request(p.server.calls[big])
    assert not p.server._pinned and p.server._pinned_bytes == p.server._view_bytes == 0


def test_a_message_the_budget_has_no_room_for_waits_until_a_call_ends() -> None:
    p = Pair(limit=1 * MIB, max_message=700_000)
    first, second = p.open(), p.open()
    p.send(first, frame(b"a" * 700_000), end=True)
    p.send(second, frame(b"b" * 700_000), end=True)
    # The second message does not fit beside the first: its stream is held
    # to what it could send before its prefix arrived.
    assert first in p.ended and second not in p.ended
    assert p.window(second) == 0
    assert p.budget.held <= 1 * MIB
    p.server.send_unary(p.calls[first], b"ok")
    p.exchange()  # the release grants the waiting stream its window
    assert second in p.ended and p.calls[second].messages == [b"b" * 700_000]
    assert p.budget.held <= 1 * MIB


def test_new_streams_are_refused_at_the_budget_and_taken_again_after() -> None:
    p = Pair(limit=256 * 1024, max_message=100_000)
    full = [p.open(), p.open()]
    for sid in full:
        p.send(sid, frame(b"x" * 100_000), end=True)
    assert set(full) <= p.ended
    # No room left for another whole message beside the two held.
    refused = p.open()
    p.send(refused, frame(b"y"), end=True)
    assert p.resets() == {refused: h2.errors.ErrorCodes.REFUSED_STREAM}
    p.server.send_unary(p.calls[full[0]], b"ok")
    p.exchange()
    again = p.open()
    p.send(again, frame(b"z"), end=True)
    assert again in p.ended and p.calls[again].messages == [b"z"]


def test_the_worker_budget_is_shared_by_its_connections() -> None:
    worker = WorkerBudget(300_000)
    a, b = Pair(worker=worker, max_message=299_995), Pair(worker=worker, max_message=299_995)
    sid = a.open()
    a.send(sid, frame(b"x" * 299_995), end=True)  # the worker budget, exactly
    assert sid in a.ended and worker.held == 300_000
    other = b.open()
    b.send(other, frame(b"y"), end=True)
    assert b.resets() == {other: h2.errors.ErrorCodes.REFUSED_STREAM}
    a.budget.close()  # a's connection goes away: what it held is the worker's again
    assert worker.held == 0
    again = b.open()
    b.send(again, frame(b"y"), end=True)
    assert again in b.ended


def test_a_large_answer_that_does_not_fit_beside_unread_ones_is_resource_exhausted() -> None:
    p = Pair(limit=1 * MIB, max_message=500_000)
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})  # reads nothing
    p.exchange()
    first, second = p.open(), p.open()
    p.send(first, frame(b"q"))
    p.send(second, frame(b"q"))
    p.server.send_unary(p.calls[first], b"a" * 600_000)  # nothing else unread: queued
    p.server.send_unary(p.calls[second], b"b" * 600_000)
    p.exchange()
    assert p.status(first) is None  # still waiting for the client's window
    code, message = p.status(second) or (None, "")
    assert code == StatusCode.RESOURCE_EXHAUSTED
    assert "max_connection_buffer_bytes" in message and "600000 bytes" in message
    assert p.budget.held <= 1 * MIB
    # Answers the client has not read do not keep a new call out while the
    # budget is not full (they drain as it reads; only requests can deadlock).
    third = p.open()
    p.send(third, frame(b"q"))
    assert third in p.ended and third not in p.resets()


def test_a_streaming_request_is_held_to_its_window_until_its_handler_reads() -> None:
    p = Pair()
    sid = p.open(STREAMING.decode())
    p.send(sid, frame(b"m" * 100) * 5_000, end=False)  # 525 KB of small messages
    # Without a reader the client may send the initial window and no more.
    assert p.window(sid) == 0
    assert p.budget.held == INITIAL_STREAM_WINDOW
    call = p.calls[sid]
    taken = []
    while (message := p.server.next_message(call)) is not None:
        taken.append(message)
        p.exchange()
    assert len(taken) == 5_000 and set(taken) == {b"m" * 100}
    assert p.budget.held < INITIAL_STREAM_WINDOW  # what is left is window granted, not bytes


def test_closing_the_connection_releases_everything() -> None:
    worker = WorkerBudget(64 * MIB)
    p = Pair(worker=worker)
    for _ in range(3):
        p.send(p.open(), frame(b"x" * 100_000), end=False)
    assert worker.held > 300_000
    p.budget.close()
    assert worker.held == 0


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=8),
    limit=st.integers(400_000, 2 * MIB),
)
def test_every_stream_is_answered_or_refused_and_every_byte_comes_back(sizes: list[int], limit: int) -> None:
    worker = WorkerBudget(512 * MIB)
    p = Pair(limit=limit, worker=worker, max_message=300_000)
    sids = [p.open() for _ in sizes]
    for sid, size in zip(sids, sizes, strict=True):
        p.send(sid, frame(b"v" * size), end=True)
        assert p.budget.held <= limit
    for _ in range(len(sids)):
        for sid in sids:
            call = p.calls.get(sid)
            if sid in p.ended and call is not None and not call.done:
                p.server.send_unary(call, b"ok")
        p.exchange()
        assert p.budget.held <= limit
    refused = p.resets()
    # None is left waiting for a window that never comes.
    assert all(p.status(sid) == (0, "") or sid in refused for sid in sids)
    assert p.status(sids[0]) == (0, "")  # the first is always taken
    assert p.budget.held == 0 and worker.held == 0


# -- through the trio server -----------------------------------------------------


class SlowReader:
    """A streaming method whose handler reads its requests only once let."""

    def __init__(self) -> None:
        self.actions: dict[str, str] = {}
        self.go = trio.Event()
        self.taken = 0

    async def ServerReflectionInfo(self, requests: AsyncIterator[Any], call: object) -> AsyncIterator[Any]:
        await self.go.wait()
        async for _ in requests:
            self.taken += 1
        yield reflection_pb2.ServerReflectionResponse(valid_host="done")


async def send_as_allowed(client: H2Client, sid: int, body: bytes, sent: list[int]) -> None:
    """Send ``body`` from ``sent[0]`` on, as the server's windows allow (reading
    its WINDOW_UPDATEs when there is none); ``sent[0]`` says how far it got."""
    while sent[0] < len(body):
        n = min(len(body) - sent[0], client.conn.local_flow_control_window(sid), 16384)
        if n == 0:
            await client.pump()
            continue
        client.conn.send_data(sid, body[sent[0] : sent[0] + n])
        sent[0] += n
        await client.flush()
        await trio.testing.wait_all_tasks_blocked()


async def test_a_fast_streaming_sender_is_slowed_by_flow_control_not_buffered() -> None:
    impl = SlowReader()
    methods = MethodTable()
    methods.add_service(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"], impl)
    server_settings = ServerSettings(methods)
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Connection(server_stream, server_settings).serve)
        client = H2Client(client_stream)
        await client.start()
        request = frame(
            reflection_pb2.ServerReflectionRequest(host="h", list_services="").SerializeToString()
        )
        count = 400_000 // len(request)  # ~400 KB of small messages, six initial windows
        body = request * count
        sid = await client.start_call(REFLECTION, None, end=False)
        sent = [0]
        with trio.move_on_after(1):
            await send_as_allowed(client, sid, body, sent)
        # The handler reads nothing: the client got the initial window, no more.
        assert sent == [INITIAL_STREAM_WINDOW]
        assert server_settings.buffers.held == INITIAL_STREAM_WINDOW
        impl.go.set()
        await send_as_allowed(client, sid, body, sent)
        client.conn.end_stream(sid)
        await client.flush()
        response = await client.wait(sid)
        assert response.status == 0 and impl.taken == count
        nursery.cancel_scope.cancel()
    assert server_settings.buffers.held == 0
