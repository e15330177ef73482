"""The TimeSeries service through the real gRPC server, over in-memory streams:
status codes, ordering across pages, and page tokens."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from prism.api import timeseries
from prism.api.namespaces import Held
from prism.api.pagetoken import PageTokens
from prism.backends.memory.options import MemoryTimeSeriesOptions
from prism.backends.memory.timeseries import MemoryTimeSeriesBackend
from prism.backends.sqlite.options import SqliteTimeSeriesOptions
from prism.backends.sqlite.timeseries import SqliteTimeSeriesBackend
from prism.backends.timeseries import TimeSeriesBackend
from prism.config import NamespaceConfig
from prism.errors import StatusCode
from prism.proto import common_pb2
from prism.proto import timeseries_pb2 as pb
from prism.rpc.methods import MethodTable
from prism.rpc.server import Connection, ServerSettings

from .h2client import H2Client, Response, frame

WRITE = "/prism.timeseries.v1.TimeSeries/WriteEvents"
READ = "/prism.timeseries.v1.TimeSeries/ReadEvents"


class Client:
    def __init__(self, h2: H2Client) -> None:
        self.h2 = h2

    async def write(self, namespace: str, *events: pb.Event) -> Response:
        req = pb.WriteEventsRequest(namespace=namespace, events=events)
        return await self.h2.call(WRITE, frame(req.SerializeToString()))

    async def read_raw(self, **kw: object) -> Response:
        req = pb.ReadEventsRequest(**kw)  # type: ignore[arg-type]
        return await self.h2.call(READ, frame(req.SerializeToString()))

    async def read(self, **kw: object) -> pb.ReadEventsResponse:
        r = await self.read_raw(**kw)
        assert r.status == 0, r.message
        (msg,) = r.messages()
        return pb.ReadEventsResponse.FromString(msg)

    async def read_all(self, **kw: object) -> tuple[list[tuple[int, str]], int]:
        """Every event's (time, id), following page tokens; and the page count."""
        out: list[tuple[int, str]] = []
        token, pages = "", 0
        while True:
            page = await self.read(page_token=token, **kw)
            pages += 1
            out += [(e.event_time_us, e.event_id) for e in page.events]
            if not page.next_page_token:
                return out, pages
            token = page.next_page_token


@asynccontextmanager
async def connected(backend: TimeSeriesBackend, key: bytes = b"k" * 32) -> AsyncIterator[Client]:
    await backend.open()
    held = Held(NamespaceConfig(name="ns", abstraction="timeseries"), backend)
    service = timeseries.TimeSeries({"ns": held}, PageTokens(key), max_limit_bytes=1 << 20)
    methods = MethodTable()
    methods.add_service(timeseries.SERVICE, service)
    server_stream, client_stream = trio.testing.memory_stream_pair()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(server_stream, ServerSettings(methods)).serve)
            h2 = H2Client(client_stream)
            await h2.start()
            yield Client(h2)
            nursery.cancel_scope.cancel()
    finally:
        await backend.aclose()


@pytest.fixture(params=["memory", "sqlite"])
async def client(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Client]:
    backend: TimeSeriesBackend
    if request.param == "memory":
        backend = MemoryTimeSeriesBackend()
    else:
        backend = SqliteTimeSeriesBackend(SqliteTimeSeriesOptions(), data_dir=tmp_path, namespace="ns")
    async with connected(backend) as c:
        yield c


def ev(t: int, eid: str, payload: bytes = b"", series: str = "s") -> pb.Event:
    return pb.Event(series_id=series, event_time_us=t, event_id=eid, payload=payload)


async def test_write_then_read(client: Client) -> None:
    e = pb.Event(series_id="s", event_time_us=7, event_id="a", payload=b"\x00p", tags={"k": "v"})
    r = await client.write("ns", e, ev(3, "b"))
    assert r.status == 0 and pb.WriteEventsResponse.FromString(r.messages()[0]) == pb.WriteEventsResponse()
    page = await client.read(namespace="ns", series_id="s")
    assert list(page.events) == [ev(3, "b"), e] and page.next_page_token == ""


async def test_unknown_series_is_empty(client: Client) -> None:
    page = await client.read(namespace="ns", series_id="never")
    assert not page.events and not page.next_page_token


async def test_unknown_namespace_not_found(client: Client) -> None:
    r = await client.write("other", ev(1, "a"))
    assert r.status == StatusCode.NOT_FOUND and "other" in r.message
    r = await client.read_raw(namespace="other", series_id="s")
    assert r.status == StatusCode.NOT_FOUND


async def test_invalid_batch_rejected_whole(client: Client) -> None:
    for bad in (ev(2, "", series="s"), ev(2, "x", series="")):
        r = await client.write("ns", ev(1, "ok"), bad)
        assert r.status == StatusCode.INVALID_ARGUMENT and "events[1]" in r.message
    page = await client.read(namespace="ns", series_id="s")
    assert not page.events


async def test_read_checks(client: Client) -> None:
    r = await client.read_raw(namespace="ns", series_id="")
    assert r.status == StatusCode.INVALID_ARGUMENT and "series_id" in r.message
    r = await client.read_raw(namespace="ns", series_id="s", start_time_us=5, end_time_us=4)
    assert r.status == StatusCode.INVALID_ARGUMENT
    # 0 is unbounded, whatever the other side
    r = await client.read_raw(namespace="ns", series_id="s", start_time_us=5, end_time_us=0)
    assert r.status == 0
    r = await client.read_raw(namespace="ns", series_id="s", start_time_us=0, end_time_us=-5)
    assert r.status == 0


async def test_immutable(client: Client) -> None:
    await client.write("ns", ev(1, "a", b"first"))
    await client.write("ns", ev(1, "a", b"second"))
    page = await client.read(namespace="ns", series_id="s")
    assert [e.payload for e in page.events] == [b"first"]


@pytest.mark.parametrize("reverse", [False, True])
async def test_pages_in_order(client: Client, reverse: bool) -> None:
    events = [ev(t, eid, b"x" * 10) for t in (30, 10, 20) for eid in ("b", "a")]
    await client.write("ns", *events)
    want = sorted((e.event_time_us, e.event_id) for e in events)
    if reverse:
        want.reverse()
    sel = common_pb2.Selection(limit_items=4, reverse=reverse)
    got, pages = await client.read_all(namespace="ns", series_id="s", selection=sel)
    assert got == want and pages == 2
    sel = common_pb2.Selection(limit_bytes=15, reverse=reverse)  # payload bytes only
    got, pages = await client.read_all(namespace="ns", series_id="s", selection=sel)
    assert got == want and pages == 6
    sel = common_pb2.Selection(reverse=reverse)
    got, _ = await client.read_all(
        namespace="ns", series_id="s", start_time_us=10, end_time_us=30, selection=sel
    )
    assert got == [w for w in want if w[0] in (10, 20)]


async def test_page_token_checks(client: Client) -> None:
    await client.write("ns", *(ev(t, "a") for t in range(1, 4)))
    sel = common_pb2.Selection(limit_items=1)
    first = await client.read(namespace="ns", series_id="s", selection=sel)
    token = first.next_page_token
    assert token
    # forged or altered
    for bad in ("not a token", "AAAA", token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")):
        r = await client.read_raw(namespace="ns", series_id="s", selection=sel, page_token=bad)
        assert r.status == StatusCode.INVALID_ARGUMENT, bad
    # issued for another request: series, range, direction
    for other in (
        {"series_id": "t"},
        {"series_id": "s", "start_time_us": 1},
        {"series_id": "s", "end_time_us": 9},
        {"series_id": "s", "selection": common_pb2.Selection(limit_items=1, reverse=True)},
    ):
        r = await client.read_raw(namespace="ns", page_token=token, **other)
        assert r.status == StatusCode.INVALID_ARGUMENT, other
    # a different limit is the same request, continued
    page = await client.read(namespace="ns", series_id="s", page_token=token)
    assert [e.event_time_us for e in page.events] == [2, 3]


async def test_token_from_another_key_is_invalid(tmp_path: Path) -> None:
    async with connected(MemoryTimeSeriesBackend(), key=b"a" * 32) as c:
        await c.write("ns", ev(1, "a"), ev(2, "a"))
        token = await c.read(namespace="ns", series_id="s", selection=common_pb2.Selection(limit_items=1))
    async with connected(MemoryTimeSeriesBackend(), key=b"b" * 32) as c:
        r = await c.read_raw(namespace="ns", series_id="s", page_token=token.next_page_token)
        assert r.status == StatusCode.INVALID_ARGUMENT


async def test_retention_hides_old_events(tmp_path: Path) -> None:
    now_us = time.time_ns() // 1000
    async with connected(MemoryTimeSeriesBackend(MemoryTimeSeriesOptions(retention_days=1))) as c:
        old = now_us - 2 * 86_400 * 1_000_000
        r = await c.write("ns", ev(old, "old"), ev(now_us, "new"))
        assert r.status == 0  # an expired event is accepted...
        page = await c.read(namespace="ns", series_id="s")
        assert [e.event_id for e in page.events] == ["new"]  # ...and never returned
