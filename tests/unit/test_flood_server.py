"""Floods through the trio server, in memory, on trio's fake clock.

The flooding connection gets GOAWAY(ENHANCE_YOUR_CALM) and is closed, with
its calls cancelled, even if it never reads; a second connection on the same
server is answered meanwhile. The limits themselves are test_flood.py's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h2.errors
import h2.events
import trio
import trio.testing
from grpc_health.v1 import health_pb2
from hyperframe.frame import PingFrame, RstStreamFrame, WindowUpdateFrame

from prism.rpc import flood
from prism.rpc.methods import MethodTable
from prism.rpc.server import Connection, ServerSettings

from .h2client import H2Client
from .test_rpc_server import CHECK, FakeHealth, req

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


class Server:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.impl = FakeHealth()
        methods = MethodTable()
        methods.add_service(health_pb2.DESCRIPTOR.services_by_name["Health"], self.impl)
        self.settings = ServerSettings(methods)
        self.nursery = nursery
        self.closed: list[Connection] = []

    async def connect(self, *, lockstep: bool = False) -> H2Client:
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        server_stream, client_stream = pair()
        conn = Connection(server_stream, self.settings)

        async def serve() -> None:
            await conn.serve()
            self.closed.append(conn)

        self.nursery.start_soon(serve)
        client = H2Client(client_stream)
        await client.start()
        return client


@asynccontextmanager
async def server() -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        yield Server(nursery)
        nursery.cancel_scope.cancel()


async def goaway_of(client: H2Client) -> h2.events.ConnectionTerminated:
    """Read until the server's GOAWAY, then until it closes the connection."""
    found = None
    while True:
        data = await client.stream.receive_some(65536)
        if not data:
            break
        for ev in client.conn.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                found = ev
    assert found is not None, "closed without a GOAWAY"
    return found


def ping(n: int = 0) -> bytes:
    return PingFrame(0, opaque_data=n.to_bytes(8, "big")).serialize()


async def test_idle_pings_too_often_get_too_many_pings(autojump_clock: trio.testing.MockClock) -> None:
    async with server() as srv:
        client = await srv.connect()
        for n in range(flood.MAX_PING_STRIKES + 2):
            await client.stream.send_all(ping(n))
            await trio.sleep(1)
        ev = await goaway_of(client)
        assert (ev.error_code, ev.additional_data) == (CALM, flood.TOO_MANY_PINGS)


async def test_idle_pings_every_5_s_keep_the_connection(autojump_clock: trio.testing.MockClock) -> None:
    async with server() as srv:
        client = await srv.connect()
        for n in range(20):
            await client.stream.send_all(ping(n))
            await trio.sleep(flood.MIN_IDLE_PING_INTERVAL_S)
            assert await client.pump()
        assert not client.goaway
        assert (await client.call(CHECK, req())).status == 0


async def test_a_flood_cancels_its_calls_and_spares_other_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with server() as srv:
        flooder = await srv.connect()
        neighbour = await srv.connect()
        await flooder.start_call(CHECK, req("slow"))
        await trio.sleep(0.1)
        assert srv.impl.started == 1
        resets = bytearray()
        for _ in range(2000):
            sid = flooder.conn.get_next_available_stream_id()
            flooder.conn.send_headers(sid, flooder.headers(CHECK), end_stream=True)
            resets += flooder.conn.data_to_send() + RstStreamFrame(sid, error_code=8).serialize()
        await flooder.stream.send_all(bytes(resets))
        assert (await neighbour.call(CHECK, req())).status == 0
        ev = await goaway_of(flooder)
        assert (ev.error_code, ev.additional_data) == (CALM, flood.RAPID_RESET)
        assert ev.last_stream_id <= 2 * (flood.RAPID_RESET_MIN_STREAMS // 2 + 2) + 1
        assert srv.impl.cancelled == 1  # its call in flight
        assert (await neighbour.call(CHECK, req())).status == 0
        # The GOAWAY came, then the end of the server's side (goaway_of read
        # to it); the server reads on until the client ends its side too, so
        # that no reset can drop the GOAWAY before the client has read it.
        assert not srv.closed
        await flooder.stream.aclose()
        await trio.sleep(0.01)
        assert len(srv.closed) == 1


async def test_a_flooder_that_does_not_read_is_closed_anyway(autojump_clock: trio.testing.MockClock) -> None:
    async with server() as srv:
        flooder = await srv.connect(lockstep=True)
        await flooder.pump()  # the server's SETTINGS; nothing is read after this
        await flooder.start_call(CHECK, req("slow"), end=False)

        async def send_flood() -> None:
            try:
                await flooder.stream.send_all(ping() * 50_000)
            except trio.BrokenResourceError:
                pass  # the server closed it

        # Closed within the GOAWAY's grace period although nothing was read.
        with trio.fail_after(2.0):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_flood)
                while not srv.closed:
                    await trio.sleep(0.1)


class LateHealth(FakeHealth):
    async def Check(
        self, request: health_pb2.HealthCheckRequest, call: object
    ) -> health_pb2.HealthCheckResponse:
        if request.service == "late":
            await trio.sleep(0.5)  # answers while the flooder's GOAWAY waits to be written
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        return await super().Check(request, call)


async def test_a_call_that_ends_after_the_goaway_is_dropped_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with server() as srv:
        srv.impl = LateHealth()
        methods = MethodTable()
        methods.add_service(health_pb2.DESCRIPTOR.services_by_name["Health"], srv.impl)
        srv.settings.methods = methods
        flooder = await srv.connect(lockstep=True)
        await flooder.pump()
        await flooder.start_call(CHECK, req("late"))

        async def send_flood() -> None:
            try:
                await flooder.stream.send_all(ping() * 50_000)
            except trio.BrokenResourceError:
                pass

        with trio.fail_after(2.0):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_flood)
                while not srv.closed:
                    await trio.sleep(0.1)
        neighbour = await srv.connect()
        assert (await neighbour.call(CHECK, req())).status == 0


async def test_a_window_update_flood_spares_the_neighbour(autojump_clock: trio.testing.MockClock) -> None:
    async with server() as srv:
        flooder = await srv.connect()
        neighbour = await srv.connect()
        await flooder.pump()
        update = WindowUpdateFrame(0, window_increment=1).serialize()
        await flooder.stream.send_all(update * 100_000)
        assert (await neighbour.call(CHECK, req())).status == 0
        ev = await goaway_of(flooder)
        assert (ev.error_code, ev.additional_data) == (CALM, flood.WINDOW_UPDATE_FLOOD)
        assert (await neighbour.call(CHECK, req())).status == 0
        # A client that never ends its side is closed at the GOAWAY's grace.
        start = trio.current_time()
        with trio.fail_after(2):
            while not srv.closed:
                await trio.sleep(0.01)
        assert trio.current_time() - start < 1.01


async def _reads_noted(s: Server, sizes: list[int]) -> H2Client:
    """A client of a connection of ``s`` whose every read's size goes to ``sizes``."""
    server_stream, client_stream = trio.testing.memory_stream_pair()
    receive = server_stream.receive_some

    async def noting(max_bytes: int | None = None) -> bytes | bytearray:
        sizes.append(max_bytes or 0)
        return await receive(max_bytes)

    server_stream.receive_some = noting  # type: ignore[method-assign]
    s.nursery.start_soon(Connection(server_stream, s.settings).serve)
    client = H2Client(client_stream)
    await client.start()
    return client


async def test_a_read_full_of_control_frames_makes_the_next_reads_small() -> None:
    # A flood is taken in small reads, each a schedule point for the other
    # connections, not in reads of up to 1 MiB (~14 us per SETTINGS in h2).
    sizes: list[int] = []
    async with server() as s:
        client = await _reads_noted(s, sizes)
        await client.stream.send_all(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" * 6_000)  # 54 KB of SETTINGS
        with trio.fail_after(5):
            while 4096 not in sizes:
                await trio.sleep(0.01)
        assert sizes[0] == 16384  # a connection's first read
        assert max(sizes) <= 16384
        assert (await client.call(CHECK, req())).status == 0  # the connection is still served


async def test_a_full_read_of_small_calls_keeps_reads_small_and_one_of_a_large_message_grows_them() -> None:
    # Grown for a backlog of small calls, reads of up to 1 MiB on every
    # connection of an overloaded worker grew its RSS by a third; a large
    # message still comes in growing reads (16, 32, 64 KiB...).
    sizes: list[int] = []
    async with server() as s:
        client = await _reads_noted(s, sizes)
        for _ in range(3):  # the HPACK cache learns the block: the next calls are read plainly
            assert (await client.call(CHECK, req())).status == 0
        small = req("s" * 300)
        sids = [client.queue_call(CHECK, small) for _ in range(90)]  # ~30 KB in one write
        await client.flush()
        for sid in sids:
            assert (await client.wait(sid)).status == 0
        assert max(sizes) == 16384
        del sizes[:]
        large = req("L" * 60_000)  # one 60 KB message, in 16 KiB DATA frames, in one write
        sid = client.queue_call(CHECK, end=False)
        for at in range(0, len(large), 16384):
            client.conn.send_data(sid, large[at : at + 16384], end_stream=at + 16384 >= len(large))
        await client.flush()
        assert (await client.wait(sid)).status == 0
        assert max(sizes) > 16384
