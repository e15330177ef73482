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

from prism.rpc.keepalive import PREFACE
from prism.rpc.server import Connection

from .h2client import H2Client
from .test_accept_limits import client_on, served, serving, settings_with
from .test_connection_timers import SETTINGS_FRAME, closed, eof_at, frame_types

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
