"""A connection's opening and closing (``prism.rpc.opening``), over real
loopback sockets: nothing is built for a connection before the client's
preface is in, and a connection is freed as soon as it ends, however the
peer left (no reference cycle for the collector to find minutes later)."""

from __future__ import annotations

import gc
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from prism.rpc import opening
from prism.rpc.keepalive import PREFACE
from prism.rpc.server import Connection, ServerSettings

from .h2client import GOAWAY, PING_FRAME, H2Client, frame_types
from .test_accept_limits import client_on, served, serving, settings_with
from .test_connection_timers import SETTINGS_FRAME, closed, eof_at

SETTINGS, WINDOW_UPDATE = 0x4, 0x8


async def listening(settings: object) -> tuple[trio.SocketListener, int]:
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener, listener.socket.getsockname()[1]


@pytest.mark.parametrize(
    "sent", [b"", PREFACE[:12], PREFACE[:23]], ids=["nothing", "half", "all but one byte"]
)
async def test_before_the_preface_nothing_is_sent_and_the_handshake_timeout_closes_it(
    sent: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    settings = settings_with(handshake_timeout_s=5)
    listener, port = await listening(settings)
    before = closed("handshake_timeout")
    async with serving(settings, listener):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        start = trio.current_time()
        await stream.send_all(sent)
        with trio.fail_after(60):
            when, received = await eof_at(stream)
        assert when - start == pytest.approx(5.0, abs=0.01)
        assert received == b""  # not even our SETTINGS: no protocol state was made for it
        assert not settings.connections  # and no connection object
        await served(await client_on(port))  # others are served meanwhile
    assert closed("handshake_timeout") == before + 1


async def test_a_preface_in_pieces_then_a_call_is_served(autojump_clock: trio.testing.MockClock) -> None:
    settings = settings_with(handshake_timeout_s=5)
    listener, port = await listening(settings)
    async with serving(settings, listener):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        for piece in (PREFACE[:5], PREFACE[5:20], PREFACE[20:] + SETTINGS_FRAME):
            await trio.sleep(1)
            await stream.send_all(piece)
        client = H2Client(stream)
        client.conn.initiate_connection()
        client.conn.data_to_send()  # sent by hand above
        await served(client)


async def test_bytes_that_are_no_preface_end_the_connection_at_once() -> None:
    settings = settings_with(handshake_timeout_s=60)
    listener, port = await listening(settings)
    async with serving(settings, listener):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            _, received = await eof_at(stream)
        # h2 refuses the preamble: our SETTINGS and window went out, nothing more.
        assert frame_types(received) == [SETTINGS, WINDOW_UPDATE]
        await served(await client_on(port))


@contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def connections_alive() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Connection)


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
async def test_an_ended_connection_is_freed_at_once_without_the_collector(reset: bool) -> None:
    settings = settings_with(handshake_timeout_s=5)
    listener, port = await listening(settings)
    async with serving(settings, listener):
        with collector_off():
            for _ in range(3):
                client = await client_on(port)
                await served(client)
                if reset:  # SO_LINGER 0: the kernel resets the connection (ECONNRESET)
                    assert isinstance(client.stream, trio.SocketStream)
                    client.stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                await client.stream.aclose()
            with trio.fail_after(5):
                while settings.connections:
                    await trio.sleep(0.01)
            await trio.sleep(0.05)
            assert connections_alive() == 0


async def drained_to_eof(settings: ServerSettings, client: H2Client) -> bytes:
    """Drain the server (its GOAWAY on ``client``'s connection, which has no
    call open); every byte the client then reads, up to the server's end."""
    settings.start_drain()
    with trio.fail_after(5):
        _, received = await eof_at(client.stream)
    return received


async def sent_until_closed(client: H2Client, chunk: bytes, pause_s: float) -> int:
    """Send ``chunk`` every ``pause_s`` until the server's end breaks the
    connection; the bytes sent before that."""
    sent = 0
    while True:
        try:
            await client.stream.send_all(chunk)
        except trio.BrokenResourceError:
            return sent
        sent += len(chunk)
        await trio.sleep(pause_s)


async def test_a_drained_connection_reads_what_the_client_sent_after_the_goaway_and_is_not_reset() -> None:
    """A client may send requests before it has read the drain's GOAWAY. The
    server ends its side and reads on: closed with those bytes unread, the
    kernel reset the connection, the client's kernel dropped the GOAWAY it
    had not read yet, and gRPC clients failed the calls UNAVAILABLE instead of
    sending them again elsewhere (a worker replaced on SIGHUP did that)."""
    settings = settings_with(handshake_timeout_s=5)
    listener, port = await listening(settings)
    async with serving(settings, listener):
        client = await client_on(port)
        await served(client)
        assert GOAWAY in frame_types(await drained_to_eof(settings, client))
        for _ in range(3):  # a reset comes back within a round trip: the next send fails
            await client.stream.send_all(PING_FRAME * 100)
            await trio.sleep(0.05)
        ended = trio.current_time()
        await client.stream.aclose()  # the client's end ends the server's wait
        with trio.fail_after(5):
            while settings.connections or connections_alive():
                await trio.sleep(0.01)
        assert trio.current_time() - ended < 0.5  # well before the grace (1 s)


async def test_a_drained_connection_whose_client_never_ends_its_side_is_closed_after_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = settings_with(handshake_timeout_s=5)
    listener, port = await listening(settings)
    async with serving(settings, listener):
        client = await client_on(port)
        await served(client)
        await drained_to_eof(settings, client)
        start = trio.current_time()
        with trio.fail_after(60):  # the client keeps sending, never ends: closed at the grace
            await sent_until_closed(client, PING_FRAME, 0.1)
        assert 1.0 <= trio.current_time() - start <= 1.5


async def test_a_drained_connection_stops_reading_at_its_linger_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that goes on sending fast after the drain's GOAWAY is read up
    to ``LINGER_BYTES``, then closed, before the grace ends."""
    monkeypatch.setattr(opening, "LINGER_BYTES", 64 * 1024)
    settings = settings_with(handshake_timeout_s=5)
    listener, port = await listening(settings)
    async with serving(settings, listener):
        client = await client_on(port)
        await served(client)
        await drained_to_eof(settings, client)
        start = trio.current_time()
        with trio.fail_after(5):  # never ends its side: the bytes bound, not the grace, ends it
            sent = await sent_until_closed(client, PING_FRAME * 64, 0.001)
        assert trio.current_time() - start < 0.5  # well before the grace (1 s)
        assert sent >= 64 * 1024  # what it read first
