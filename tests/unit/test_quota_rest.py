"""A connection whose every call in a read a quota refused rests before its
next read (``prism.rpc.server.LIMITED_REST_S``); other connections do not.

A client flooding a namespace past its rps, a call or a few per read, cost
its worker a wake-up, a read and a write per refusal, and its neighbours'
calls waited behind them. Resting, the flood's next calls come in one read.
Over memory streams and over real TCP (the plain-socket reader), with trio's
MockClock: the rest is exact, and nothing else moves the clock.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from prism.config import NamespaceConfig, ServerConfig
from prism.errors import StatusCode
from prism.limits import Shedder
from prism.proto import kv_pb2
from prism.rpc.rest import LIMITED_READ_GAP_S, LIMITED_REST_S
from prism.workers.app import App

from .apps import connection_to
from .h2client import H2Client, frame
from .test_arrival import over_tcp
from .test_quotas import PUT, put, refusal, served, table
from .test_shedding import CONFIG, standing_queue_before_handlers


@asynccontextmanager
async def client_over(transport: str, app: App, client: H2Client) -> AsyncIterator[H2Client]:
    if transport == "memory":
        yield client
    else:
        async with over_tcp(app) as tcp:  # type: ignore[arg-type]  # (an App has the settings a Server has)
            yield tcp


async def settle() -> None:
    """Let the server act on what reached it (over TCP, the kernel has it at once)."""
    for _ in range(3):
        time.sleep(0.01)  # real time: the virtual clock stays
        await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_a_connection_whose_calls_a_quota_refused_rests_and_its_neighbours_do_not(
    mock_clock: trio.testing.MockClock, tmp_path: Path, transport: str
) -> None:
    async with (
        served(tmp_path, table({"profiles": {"rps": 0.1, "burst": 1}})) as (app, memory_client),
        client_over(transport, app, memory_client) as client,
    ):
        start = trio.current_time()
        assert (await put(client, "profiles")).status == StatusCode.OK  # admitted: no rest
        assert refusal(await put(client, "profiles"))[0] == StatusCode.RESOURCE_EXHAUSTED
        assert trio.current_time() == start
        async with connection_to(app) as neighbour:  # another connection: read at once
            assert (await put(neighbour, "neighbour")).status == StatusCode.OK
        assert trio.current_time() == start

        # The refused connection's next call (of a namespace within its limits)
        # is read once the rest is over.
        request = kv_pb2.PutItemsRequest(
            namespace="neighbour", id="r", items=[kv_pb2.Item(key=b"k", value=b"v")]
        )
        body = frame(request.SerializeToString())
        answered: list[tuple[float, int | None]] = []

        async def wait_for(sid: int) -> None:
            r = await client.wait(sid)
            answered.append((trio.current_time(), r.status))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for, await client.start_call(PUT, body))
            await settle()
            mock_clock.jump(LIMITED_REST_S * 0.9)
            await settle()
            assert answered == []
            mock_clock.jump(LIMITED_REST_S * 0.1)
            with trio.move_on_after(1):  # (virtual time: nothing moves it, the answer ends this)
                while not answered:
                    await settle()
        assert answered == [(pytest.approx(start + LIMITED_REST_S), StatusCode.OK)]


async def test_a_call_that_waited_out_its_connections_rest_is_not_late_to_the_shedder(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # Over real TCP, with the shedder's door shut (as in test_shedding): a
    # request that reached the kernel while its connection rested waited for
    # its own client's quota, not for the worker. Judged from the rest's end,
    # it is served; judged from its arrival (30 ms, past the 5 ms target), it
    # would be refused as late, and such calls would shut the door to all.
    app = App(ServerConfig(data_dir=str(tmp_path / "data"), overload=CONFIG))
    app.settings.admission.shedder = shedder = Shedder(CONFIG)
    await app.apply([NamespaceConfig(n, backend="memory") for n in ("profiles", "neighbour")])
    app.apply_limits("t", table({"profiles": {"rps": 0.1, "burst": 1}}))
    try:
        async with over_tcp(app) as client:  # type: ignore[arg-type]
            for _ in range(3):  # warm the HPACK cache: the puts are read plainly
                assert (await put(client, "neighbour")).status == StatusCode.OK
            assert (await put(client, "profiles")).status == StatusCode.OK
            standing_queue_before_handlers(mock_clock, shedder)  # (the door shuts at its next decision)
            assert refusal(await put(client, "profiles"))[:2] == (
                StatusCode.RESOURCE_EXHAUSTED,
                'namespace "profiles": rps limit 0.1 exceeded',
            )
            assert shedder.shut
            request = kv_pb2.PutItemsRequest(namespace="neighbour", id="r", items=[kv_pb2.Item(key=b"k")])
            sid = client.queue_call(PUT, frame(request.SerializeToString()))
            assert isinstance(client.stream, trio.SocketStream)
            os.write(client.stream.socket.fileno(), client.conn.data_to_send())
            time.sleep(0.03)  # (the kernel's clock: the request waits unread, the connection resting)
            mock_clock.jump(LIMITED_REST_S)
            r = await client.wait(sid)
            assert (r.status, r.message) == (StatusCode.OK, "")
            assert shedder.shut
    finally:
        await app.aclose()


async def test_connections_resting_for_a_quota_take_turns_to_read(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # Two connections refused at once: the second reads LIMITED_READ_GAP_S
    # after the first (a flood over many connections takes its turns).
    async with (
        served(tmp_path, table({"profiles": {"rps": 0.1, "burst": 1}})) as (app, first),
        connection_to(app) as second,
    ):
        assert (await put(first, "profiles")).status == StatusCode.OK
        for client in (first, second):
            assert refusal(await put(client, "profiles"))[0] == StatusCode.RESOURCE_EXHAUSTED
        start = trio.current_time()
        request = kv_pb2.PutItemsRequest(namespace="neighbour", id="r", items=[kv_pb2.Item(key=b"k")])
        answered: dict[str, tuple[float, int | None]] = {}

        async def wait_for(name: str, client: H2Client, sid: int) -> None:
            r = await client.wait(sid)
            answered[name] = (trio.current_time(), r.status)

        async with trio.open_nursery() as nursery:
            for name, client in (("first", first), ("second", second)):
                sid = await client.start_call(PUT, frame(request.SerializeToString()))
                nursery.start_soon(wait_for, name, client, sid)
            await settle()
            mock_clock.jump(LIMITED_REST_S)
            await settle()
            assert set(answered) == {"first"}
            mock_clock.jump(LIMITED_READ_GAP_S)
            with trio.move_on_after(1):
                while len(answered) < 2:
                    await settle()
        assert answered == {
            "first": (pytest.approx(start + LIMITED_REST_S), StatusCode.OK),
            "second": (pytest.approx(start + LIMITED_REST_S + LIMITED_READ_GAP_S), StatusCode.OK),
        }
