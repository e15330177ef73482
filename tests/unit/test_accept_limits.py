"""What accepting may take (``prism.rpc.listen``): ``max_connections`` per
worker, and a process out of file descriptors, over real loopback sockets on
trio's fake clock."""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from prism.config.limits import Http2Config
from prism.rpc.listen import serve_listeners
from prism.rpc.methods import MethodTable
from prism.rpc.server import ServerSettings

from .h2client import H2Client
from .test_rpc_server import CHECK, FakeHealth, req


def settings_with(**http2: int) -> ServerSettings:
    methods = MethodTable()
    methods.add_service(health_pb2.DESCRIPTOR.services_by_name["Health"], FakeHealth())
    return ServerSettings(methods, http2=Http2Config(**http2))  # type: ignore[arg-type]


@asynccontextmanager
async def serving(settings: ServerSettings, listener: object) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_listeners, [listener], settings)
        yield
        nursery.cancel_scope.cancel()


async def client_on(port: int) -> H2Client:
    client = H2Client(await trio.open_tcp_stream("127.0.0.1", port))
    await client.start()
    return client


async def served(client: H2Client) -> None:
    with trio.fail_after(5):
        assert (await client.call(CHECK, req())).status == 0


def refused() -> float:
    return REGISTRY.get_sample_value("prism_connections_refused_total", {"reason": "max_connections"}) or 0.0


async def test_past_max_connections_a_new_connection_is_closed_at_once_and_counted() -> None:
    settings = settings_with(max_connections=2)
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    before = refused()
    async with serving(settings, listener):
        one, two = await client_on(port), await client_on(port)
        await served(one)
        await served(two)
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            try:
                assert await extra.receive_some() == b""  # not one byte of HTTP/2
            except trio.BrokenResourceError:
                pass  # reset: closed all the same
        assert refused() == before + 1
        await served(one)  # the connections held are served as ever
        await two.stream.aclose()
        with trio.fail_after(5):
            while settings.accepted > 1:
                await trio.sleep(0.01)
        await served(await client_on(port))  # room again


class OutOfDescriptors:
    """A listener whose process runs out of descriptors after its first
    connection, for ``exhausted_s``."""

    def __init__(self, real: trio.SocketListener, exhausted_s: float) -> None:
        self.real = real
        self.exhausted_s = exhausted_s
        self.until: float | None = None
        self.failed = 0

    async def accept(self) -> trio.SocketStream:
        if self.until is None:
            stream = await self.real.accept()
            self.until = trio.current_time() + self.exhausted_s
            return stream
        if trio.current_time() < self.until:
            await trio.sleep(0)
            self.failed += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.real.accept()

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_out_of_descriptors_accepting_waits_logs_once_per_interval_and_serves_connections_held(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="prism.rpc")
    [real] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = real.socket.getsockname()[1]
    listener = OutOfDescriptors(real, exhausted_s=25.0)
    async with serving(settings_with(), listener):
        held = await client_on(port)
        await served(held)
        for _ in range(25):  # served throughout
            await trio.sleep(1)
            await served(held)
        await trio.sleep(1)
        await served(await client_on(port))  # accepting again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # at 0, 10 and 20 s: not a line per failure
    counts = [int(re.search(r"\), (\d+) time\(s\) since", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert lines[0] == (
        "accept failed (Too many open files), 1 time(s) since the last such line: "
        "accepting waits, connections held are served"
    )
    # Each line counts the failures since the one before: the first waits
    # are short (a few in the first second), then one try a second.
    assert 10 <= counts[1] <= 17 and 9 <= counts[2] <= 11
    assert 25 <= listener.failed <= 35  # a try per second at most, not ten
