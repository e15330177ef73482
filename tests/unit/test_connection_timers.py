"""A connection's timers (``prism.rpc.keepalive``), on trio's fake clock:
the handshake timeout, the idle timeout, keepalive PINGs, the maximum age.

Driven as a client sees it: a real h2 client over in-memory streams (over
loopback TLS for the handshake after TLS), asserting the GOAWAY, its error
code, when the connection ends, and that calls are served meanwhile.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import h2.events
import pytest
import trio
import trio.testing
import trustme
from grpc_health.v1 import health_pb2
from h2.connection import ConnectionState
from prometheus_client import REGISTRY

from prism.config.limits import Http2Config
from prism.rpc import keepalive
from prism.rpc.keepalive import PREFACE, Preface, Timers
from prism.rpc.listen import serve_listeners
from prism.rpc.methods import MethodTable
from prism.rpc.protocol import GrpcProtocol
from prism.rpc.server import Connection, ServerSettings
from tests.certs import client_context, server_files

from .h2client import H2Client, frame_types
from .test_rpc_server import CHECK, FakeHealth, req
from .test_tls_connections import settings_for, tls_client

QUIET = Http2Config(idle_timeout_s=10_000.0, keepalive_time_s=0.0)  # no timer but the one tested
SETTINGS_FRAME = (
    b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"
)  # MAX_CONCURRENT_STREAMS


class Client(H2Client):
    """H2Client that also notes the server's PINGs and GOAWAY, and reads on
    after the GOAWAY as grpcio does (h2 refuses to: python-hyper/h2#1181)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self.pings = 0
        self.goaway_at = math.inf
        self.goaway_code: int | None = None
        receive = self.conn.receive_data

        def noting(data: bytes) -> list[h2.events.Event]:
            events = receive(data)
            for ev in events:
                if isinstance(ev, h2.events.PingReceived):
                    self.pings += 1
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway_at, self.goaway_code = trio.current_time(), ev.error_code
                    self.conn.state_machine.state = ConnectionState.CLIENT_OPEN
            return events

        self.conn.receive_data = noting  # type: ignore[method-assign]

    async def closed_at(self) -> float:
        """Read (answering PINGs) until the server closes; when it did."""
        while await self.pump():
            pass
        return trio.current_time()


# Where a connection's timers run: in a task of its own (a connection served
# alone), or in the listener's heap (prism.rpc.keepalive.TimerHeap). Every
# test here runs both ways.
TIMERS = ["task"]


@pytest.fixture(autouse=True, params=["task", "heap"])
def timers_in(request: pytest.FixtureRequest) -> Iterator[None]:
    TIMERS[0] = request.param
    yield
    TIMERS[0] = "task"


def closed(reason: str) -> float:
    return REGISTRY.get_sample_value("prism_connections_closed_total", {"reason": reason}) or 0.0


class Server:
    def __init__(self, http2: Http2Config, *, drain_timeout_s: float = 10.0) -> None:
        self.health = FakeHealth()
        methods = MethodTable()
        methods.add_service(health_pb2.DESCRIPTOR.services_by_name["Health"], self.health)
        self.settings = ServerSettings(methods, http2=http2, drain_timeout_s=drain_timeout_s)

    @asynccontextmanager
    async def raw(self) -> AsyncIterator[trio.testing.MemoryStream]:
        """A connection's client end, before any byte is sent."""
        server_stream, client_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            if TIMERS[0] == "heap":  # as a listener runs them: one task for every connection
                heap = self.settings.timer_heap = keepalive.TimerHeap()
                nursery.start_soon(heap.run)
            nursery.start_soon(Connection(server_stream, self.settings).serve)
            yield client_stream
            nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        async with self.raw() as stream:
            client = Client(stream)
            await client.start()
            yield client


async def eof_at(stream: trio.abc.ReceiveStream) -> tuple[float, bytes]:
    """Read without answering anything until the server closes: (when, every byte it sent)."""
    received = bytearray()
    try:
        while data := await stream.receive_some():
            received += data
    except trio.BrokenResourceError:
        pass  # TLS closed without close_notify: the end all the same
    return trio.current_time(), bytes(received)


# -- the handshake -------------------------------------------------------------


def test_the_preface_is_done_once_the_first_settings_frame_is_in() -> None:
    whole = PREFACE + SETTINGS_FRAME
    for cut in range(len(whole)):
        preface = Preface()
        assert not preface.feed(whole[:cut])
        assert preface.feed(whole[cut:])
    preface = Preface()
    assert [preface.feed(bytes([b])) for b in whole].index(True) == len(whole) - 1
    # A first frame that is no SETTINGS never completes the handshake.
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + bytes(8)
    assert not Preface().feed(PREFACE + ping + SETTINGS_FRAME)


@pytest.mark.parametrize(
    "sent",
    [b"", PREFACE[:12], PREFACE, PREFACE + SETTINGS_FRAME[:12]],
    ids=["nothing", "half a preface", "no settings", "half a settings"],
)
async def test_a_handshake_not_done_in_time_is_closed(
    sent: bytes, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="prism.rpc")
    server = Server(Http2Config(handshake_timeout_s=5.0))
    before = closed("handshake_timeout")
    async with server.raw() as stream, server.client() as neighbour:
        start = trio.current_time()
        await stream.send_all(sent)
        with trio.fail_after(60):
            when, received = await eof_at(stream)
        assert when - start == pytest.approx(5.0)
        assert frame_types(received) == [0x4, 0x8]  # our SETTINGS and WINDOW_UPDATE, nothing more
        # The other connection was served meanwhile, and still is.
        assert (await neighbour.call(CHECK, req())).status == 0
    assert closed("handshake_timeout") == before + 1
    assert "connection from a client closed by the server: handshake_timeout" in caplog.messages


async def test_a_slow_but_complete_handshake_is_served(autojump_clock: trio.testing.MockClock) -> None:
    server = Server(Http2Config(handshake_timeout_s=5.0))
    async with server.raw() as stream:
        client = Client(stream)
        for piece in (PREFACE[:10], PREFACE[10:], SETTINGS_FRAME):
            await trio.sleep(1.5)
            await stream.send_all(piece)
        client.conn.initiate_connection()
        client.conn.data_to_send()  # sent by hand above
        await trio.sleep(10)  # past the handshake timeout
        assert (await client.call(CHECK, req())).status == 0


async def test_with_tls_the_http2_handshake_timeout_starts_after_the_tls_handshake(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ca = trustme.CA()
    settings = settings_for(server_files(tmp_path, ca, handshake_timeout_s=5))
    settings.http2 = Http2Config(handshake_timeout_s=3.0)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_listeners, listeners, settings)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(4)  # most of the TLS handshake's 5 s, then the handshake
        tls = trio.SSLStream(tcp, client_context(ca), server_hostname="prism.test")
        await tls.do_handshake()
        start = trio.current_time()
        with trio.fail_after(60):
            when, received = await eof_at(tls)
        assert when - start == pytest.approx(3.0, abs=0.1)
        assert frame_types(received)[0] == 0x4
        await served_over_tls(port, ca)
        nursery.cancel_scope.cancel()


async def served_over_tls(port: int, ca: trustme.CA) -> None:
    client = await tls_client(port, client_context(ca))
    assert (await client.call(CHECK, req())).status == 0
    await client.stream.aclose()


# -- idle ------------------------------------------------------------------------


async def test_a_connection_with_no_stream_open_is_sent_goaway_and_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(Http2Config(idle_timeout_s=20.0, keepalive_time_s=0.0))
    before = closed("idle")
    async with server.client() as client:
        assert (await client.call(CHECK, req())).status == 0
        await trio.sleep(12)  # a stream that opens and ends between two looks restarts the count
        assert (await client.call(CHECK, req())).status == 0
        last_stream_ended = trio.current_time()

        async def ping_every_10s() -> None:
            # Frames that are not streams do not keep a connection in use.
            while True:
                await trio.sleep(10)
                client.conn.ping(b"are-you?")
                await client.flush()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping_every_10s)
            when = await client.closed_at()
            nursery.cancel_scope.cancel()
        assert client.goaway_code == 0  # NO_ERROR
        assert 20 <= client.goaway_at - last_stream_ended <= 20 * (1 + 1 / keepalive.IDLE_LOOKS)
        assert when == client.goaway_at
    assert closed("idle") == before + 1


async def test_an_open_stream_keeps_a_connection_from_idling(autojump_clock: trio.testing.MockClock) -> None:
    server = Server(Http2Config(idle_timeout_s=20.0, keepalive_time_s=0.0))
    async with server.client() as client:
        start = trio.current_time()
        r = await client.call(CHECK, req("slow"), extra=[("grpc-timeout", "60S")])
        assert r.status == 4  # DEADLINE_EXCEEDED, after 60 s on an otherwise idle connection
        assert trio.current_time() - start == pytest.approx(60)
        assert client.goaway_code is None
        await client.closed_at()
        assert 20 <= client.goaway_at - (start + 60) <= 25


# -- keepalive -------------------------------------------------------------------

KEEPALIVE = Http2Config(idle_timeout_s=10_000.0, keepalive_time_s=10.0, keepalive_timeout_s=5.0)


async def test_a_quiet_connection_is_pinged_and_kept_while_the_client_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(KEEPALIVE)
    async with server.client() as client:
        with trio.move_on_after(100):
            await client.closed_at()
        # A PING at most every 10 to 20 s: between 5 and 10 in 100 s.
        assert 5 <= client.pings <= 10
        assert client.goaway_code is None
        assert (await client.call(CHECK, req())).status == 0


async def test_a_client_that_stops_answering_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    server = Server(KEEPALIVE)
    before = closed("keepalive_timeout")
    async with server.raw() as stream, server.client() as neighbour:
        client = Client(stream)
        await client.start()
        assert (await client.call(CHECK, req())).status == 0
        last_read = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(neighbour.closed_at)  # which answers its PINGs
            when, received = await eof_at(stream)  # reads, never answers the PING
            nursery.cancel_scope.cancel()
        assert 0x6 in frame_types(received)  # PING
        assert 10 + 5 <= when - last_read <= 20 + 5
        assert (await neighbour.call(CHECK, req())).status == 0
    assert closed("keepalive_timeout") == before + 1


async def test_no_ping_is_sent_while_calls_flow(autojump_clock: trio.testing.MockClock) -> None:
    server = Server(KEEPALIVE)
    async with server.client() as client:
        for _ in range(40):
            assert (await client.call(CHECK, req())).status == 0
            await trio.sleep(5)
        assert client.pings == 0


async def test_keepalive_time_0_sends_no_ping(autojump_clock: trio.testing.MockClock) -> None:
    server = Server(QUIET)
    async with server.client() as client:
        with trio.move_on_after(5000):
            await client.closed_at()
        assert client.pings == 0
        assert (await client.call(CHECK, req())).status == 0


# -- maximum age ---------------------------------------------------------------

AGED = Http2Config(idle_timeout_s=10_000.0, keepalive_time_s=0.0, max_connection_age_s=100.0)


async def test_at_its_age_a_connection_says_goaway_and_closes_once_its_calls_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(AGED, drain_timeout_s=30.0)
    before = closed("max_age")
    async with server.client() as client:
        start = trio.current_time()
        r = await client.call(CHECK, req("slow"), extra=[("grpc-timeout", "115S")])
        assert 100 <= client.goaway_at - start <= 110
        assert client.goaway_code == 0  # NO_ERROR
        assert r.status == 4  # the call in flight was answered (at its deadline)
        assert await client.closed_at() == pytest.approx(start + 115)
    assert closed("max_age") == before + 1


async def test_past_its_age_a_connection_waits_for_its_calls_at_most_the_drain_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(AGED, drain_timeout_s=10.0)
    before = closed("max_age_drain")
    async with server.client() as client:
        start = trio.current_time()
        await client.start_call(CHECK, req("slow"))  # never ends by itself
        when = await client.closed_at()
        assert 100 <= client.goaway_at - start <= 110
        assert when - client.goaway_at == pytest.approx(10.0)
        assert server.health.cancelled == 1
    assert closed("max_age_drain") == before + 1


class FakeConnection:
    def __init__(self) -> None:
        self.reads = 0
        self.opened = 0
        self.proto = GrpcProtocol()
        self.said: list[str] = []

    def ping(self) -> None:
        self.said.append("ping")

    def go_away(self, reason: str) -> None:
        self.said.append(f"goaway {reason}")

    def abort(self, reason: str) -> None:
        self.said.append(f"abort {reason}")


def goaway_times(jitters: Sequence[float], monkeypatch: pytest.MonkeyPatch) -> list[float]:
    times = []
    for jitter in jitters:
        monkeypatch.setattr(keepalive.random, "random", lambda j=jitter: j)
        conn = FakeConnection()
        timers = Timers(conn, AGED, 10.0, now=0.0)
        times.append(timers.due(0.0))
    return times


def test_the_age_has_up_to_a_tenth_of_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    # Connections opened together leave over a tenth of the age, not at once.
    assert goaway_times([0.0, 0.5, 0.999], monkeypatch) == pytest.approx([100.0, 105.0, 109.99])
