"""The hand-off receiver (``serve_handoffs``): a connection passed over a Unix
socket with the bytes already read from it is served from where the first
worker left off; bad hand-off messages are refused, and the receiver goes on.

Everything runs in this process: a socketpair stands for the client's TCP
connection, a real h2 client on one end of it.
"""

from __future__ import annotations

import array
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import h2.events
import pytest
import trio
import trio.testing
from grpc_health.v1 import health_pb2

from prism.api import health
from prism.router.handoff import send_connection, serve_handoffs
from prism.rpc.methods import MethodTable
from prism.rpc.protocol import GrpcProtocol
from prism.rpc.server import Connection, ServerSettings
from prism.rpc.sniff import SNIFF_TIMEOUT_S

from .h2client import H2Client, Response, frame

CHECK = "/grpc.health.v1.Health/Check"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short: a Unix socket path must fit in about 100 bytes.
    path = Path(tempfile.mkdtemp(prefix="phand", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def request() -> bytes:
    return frame(health_pb2.HealthCheckRequest().SerializeToString())


@asynccontextmanager
async def receiver(address: str) -> AsyncIterator[ServerSettings]:
    methods = MethodTable()
    methods.add_service(health.SERVICE, health.Health(health.HealthState()))
    settings = ServerSettings(methods)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_handoffs, address, settings)
        yield settings
        nursery.cancel_scope.cancel()


def client_connection() -> tuple[H2Client, socket.socket]:
    """An h2 client on one end of a socketpair; the other end is the
    connection as the accepting worker holds it."""
    client_end, server_end = socket.socketpair()
    client = H2Client(trio.SocketStream(trio.socket.from_stdlib_socket(client_end)))
    return client, server_end


async def test_a_handed_off_connection_is_served_from_the_bytes_already_read(sock_dir: Path) -> None:
    address = str(sock_dir / "w2.sock")
    async with receiver(address) as settings:
        client, server_end = client_connection()
        # What the accepting worker did before handing off: sent its server
        # preface (the receiver would send the same bytes) and read the
        # client's preface and first request, which the client sent once.
        preface = GrpcProtocol(max_concurrent_streams=settings.max_concurrent_streams)
        preface.initiate()
        server_end.sendall(preface.data_to_send())
        client.conn.initiate_connection()
        sid = client.conn.get_next_available_stream_id()
        client.responses[sid] = Response()
        client.conn.send_headers(sid, client.headers(CHECK))
        client.conn.send_data(sid, request(), end_stream=True)
        already_read = client.conn.data_to_send()

        await send_connection(address, server_end.fileno(), already_read)
        server_end.close()  # the receiver holds its own copy now

        with trio.fail_after(5):
            first = await client.wait(sid)
            assert first.status == 0
            assert health_pb2.HealthCheckResponse.FromString(first.messages()[0]).status == SERVING
            # Later calls on the connection go to the receiver too.
            later = await client.call(CHECK, request())
            assert later.status == 0
        assert len(settings.connections) == 1
        await client.stream.aclose()


async def _send_raw(address: str, data: bytes, fds: list[int], *, then_close: bool = True) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(address)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        await sock.sendmsg([data], ancillary)
        if then_close:
            sock.shutdown(socket.SHUT_WR)
        # The receiver closes its end once it has refused the message.
        with trio.fail_after(5):
            assert await sock.recv(1) == b""


async def _closed_by_receiver(client_end: socket.socket) -> None:
    """The connection passed with a refused message was closed (not leaked):
    the client's end reads EOF once the receiver's copy is gone."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(client_end))
    with trio.fail_after(5):
        assert await stream.receive_some(1) == b""
    await stream.aclose()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no fd", "expected one file descriptor, got 0"),
        ("two fds", "expected one file descriptor, got 2"),
        ("short", "short hand-off message"),
        ("too large", "hand-off of 2097152 bytes is too large"),
        ("cut short", "hand-off message cut short"),
        ("answered too many", "hand-off says 5 of its 3 bytes were answered"),
        ("not a socket", "the descriptor passed is not a socket"),
    ],
)
async def test_a_bad_hand_off_is_refused_and_the_receiver_goes_on(
    sock_dir: Path, caplog: pytest.LogCaptureFixture, case: str, reason: str
) -> None:
    caplog.set_level(logging.WARNING, logger="prism.handoff")
    address = str(sock_dir / "w2.sock")
    async with receiver(address):
        passed: list[socket.socket] = []  # the client ends of connections we pass
        fds: list[int] = []
        if case == "not a socket":
            read_end, write_end = os.pipe()
            os.close(write_end)
            fds.append(read_end)
        for _ in range(2 if case == "two fds" else 0 if case in ("no fd", "not a socket") else 1):
            client_end, server_end = socket.socketpair()
            passed.append(client_end)
            fds.append(server_end.detach())
        if case == "short":
            data = b"\x00\x00"
        elif case == "too large":
            data = (2 * 1024 * 1024).to_bytes(4, "big") + b"x" * 16
        elif case == "cut short":
            data = (100).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"x" * 10
        elif case == "answered too many":
            data = (3).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"abc"
        else:
            data = (3).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"abc"
        try:
            await _send_raw(address, data, fds)
        finally:
            for fd in fds:
                socket.close(fd)  # our copies; the receiver's are its to close
        for client_end in passed:
            await _closed_by_receiver(client_end)
        [refused] = [r.getMessage() for r in caplog.records]
        assert refused.startswith(f"bad hand-off message: {reason}")

        # The receiver still takes good hand-offs.
        client, server_end = client_connection()
        preface = GrpcProtocol()
        preface.initiate()
        server_end.sendall(preface.data_to_send())
        client.conn.initiate_connection()
        await send_connection(address, server_end.fileno(), client.conn.data_to_send())
        server_end.close()
        with trio.fail_after(5):
            assert (await client.call(CHECK, request())).status == 0
        await client.stream.aclose()


class _HandToReceiver:
    """A ``Handoff`` that passes every connection's first request to one receiver."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.handed: list[tuple[int, int]] = []  # (bytes, answered) per hand-off

    async def hand_off(
        self, first: object, stream: trio.SocketStream, buffered: bytes, answered: int
    ) -> bool:
        await send_connection(self.address, stream.socket.fileno(), buffered, answered)
        self.handed.append((len(buffered), answered))
        return True

    def elsewhere(self) -> bool:
        return True

    async def hand_off_tls(self, server_name: str, stream: trio.SocketStream) -> bool:
        return False


async def _settings_acks(client: H2Client, until: Callable[[int], bool]) -> int:
    """Read from the server until ``until(ACKs so far)``; how many SETTINGS ACKs came."""
    acks = 0
    while not until(acks):
        data = await client.stream.receive_some(65536)
        assert data, "the server closed the connection"
        for event in client.conn.receive_data(data):
            acks += isinstance(event, h2.events.SettingsAcknowledged)
            if isinstance(event, h2.events.StreamEnded) and event.stream_id in client.responses:
                client.responses[event.stream_id].ended = True
            elif isinstance(event, h2.events.TrailersReceived) and event.stream_id in client.responses:
                client.responses[event.stream_id].trailers = dict(event.headers)  # type: ignore[arg-type]
        await client.flush()
    return acks


async def test_a_clients_settings_are_acknowledged_at_once_while_its_first_request_is_awaited(
    sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Where another tenant's workers may take a connection, the accepting
    # worker waits (up to SNIFF_TIMEOUT_S) for the first request to route it.
    # A client that sends its preface and SETTINGS and then waits for the ACK
    # (as a pool opening connections ahead of use does) waited that second.
    autojump_clock.autojump_threshold = 0.05  # an idle wait jumps the clock: a wait for the timeout shows
    address = str(sock_dir / "w2.sock")
    async with receiver(address) as receiving:
        handoff = _HandToReceiver(address)
        methods = MethodTable()
        methods.add_service(health.SERVICE, health.Health(health.HealthState()))
        front = ServerSettings(methods)
        front.handoff = handoff
        client_end, server_end = socket.socketpair()
        client = H2Client(trio.SocketStream(trio.socket.from_stdlib_socket(client_end)))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(server_end))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(stream, front).serve)
            started = trio.current_time()
            await client.start()
            acked = await _settings_acks(client, lambda acks: acks > 0)
            assert acked == 1
            assert trio.current_time() - started < SNIFF_TIMEOUT_S / 10
            # The first request, later: the connection is handed off with the
            # bytes read, and the receiver does not acknowledge them again.
            sid = await client.start_call(CHECK, request())
            acked += await _settings_acks(client, lambda _: client.responses[sid].ended)
            assert client.responses[sid].status == 0
            assert len(handoff.handed) == 1 and handoff.handed[0][1] > 0
            assert acked == 1
            assert len(receiving.connections) == 1
            await client.stream.aclose()
