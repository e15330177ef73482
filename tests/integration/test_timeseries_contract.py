"""The TimeSeriesBackend contract (prism/backends/timeseries.py), checked
against every backend, plus what is particular to SQLite (files, options)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from prism.backends import catalog, registry
from prism.backends.memory.options import MemoryTimeSeriesOptions
from prism.backends.memory.timeseries import MemoryTimeSeriesBackend
from prism.backends.postgres.timeseries import PostgresTimeSeriesBackend
from prism.backends.sqlite.timeseries import SqliteTimeSeriesBackend
from prism.backends.timeseries import DAY_MS, Event, EventPage
from prism.errors import ConfigError, Internal, InvalidArgument, Unavailable
from tests.pg import DSN

pytestmark = pytest.mark.services("postgres")

NOW = 1_700_000_000_000  # ms
NOW_US = NOW * 1000
BIG = 1 << 30

Backend = MemoryTimeSeriesBackend | SqliteTimeSeriesBackend | PostgresTimeSeriesBackend
_pg_tables: list[str] = []


def make(kind: str, data_dir: Path, **options: object) -> Backend:
    # Through the registry, from a plain table: as a worker builds them.
    namespace = "ns"
    if kind == "postgres":
        options = {"dsn": DSN, **options}
        namespace = f"prism_test_{uuid.uuid4().hex[:12]}"
    backend = registry.create_timeseries(kind, options, data_dir=data_dir, namespace=namespace)
    assert isinstance(backend, MemoryTimeSeriesBackend | SqliteTimeSeriesBackend | PostgresTimeSeriesBackend)
    if isinstance(backend, PostgresTimeSeriesBackend):
        _pg_tables.append(backend.table)
    return backend


@pytest.fixture(params=catalog.builtin("timeseries"))  # every built-in, a new one too
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    yield str(request.param)
    # Each PostgreSQL test has its own table; tests may drop, the product never does.
    if _pg_tables:
        with psycopg.connect(DSN, autocommit=True) as conn:
            while _pg_tables:
                conn.execute(f'DROP TABLE IF EXISTS "{_pg_tables.pop()}"'.encode())


@pytest.fixture
async def ts(kind: str, tmp_path: Path) -> AsyncIterator[Backend]:
    backend = make(kind, tmp_path)
    await backend.open()
    yield backend
    await backend.aclose()


def ev(t: int, eid: str = "e", payload: bytes = b"p", series: str = "s", **tags: str) -> Event:
    return Event(series, t, eid, payload, tags)


async def read(
    ts: Backend,
    series: str = "s",
    start: int | None = None,
    end: int | None = None,
    *,
    reverse: bool = False,
    limit_items: int = BIG,
    limit_bytes: int = BIG,
    now_ms: int = NOW,
) -> list[Event]:
    """Every page, followed to the end."""
    out: list[Event] = []
    after = None
    while True:
        page = await ts.read_events(
            series,
            start,
            end,
            reverse=reverse,
            after=after,
            limit_items=limit_items,
            limit_bytes=limit_bytes,
            now_ms=now_ms,
        )
        out += page.events
        if page.last is None:
            return out
        assert page.events and page.last == page.events[-1].cursor
        after = page.last


def ids(events: list[Event]) -> list[tuple[int, str]]:
    return [e.cursor for e in events]


async def test_unknown_series_reads_empty(ts: Backend) -> None:
    page = await ts.read_events(
        "nope", None, None, reverse=False, after=None, limit_items=10, limit_bytes=10, now_ms=NOW
    )
    assert page == EventPage([], None)


async def test_round_trip_keeps_payload_and_tags(ts: Backend) -> None:
    e = Event("s", 5, "a", b"\x00\xffdata", {"host": "h1", "ünï": "çödé"})
    await ts.write_events([e, ev(6, "b", b"", series="s")], NOW)
    got = await read(ts)
    assert got == [e, Event("s", 6, "b", b"", {})]


async def test_immutable_first_write_stays(ts: Backend) -> None:
    await ts.write_events([ev(1, "a", b"first", k="1")], NOW)
    await ts.write_events([ev(1, "a", b"second", k="2")], NOW)
    # also within one batch: the first of two equal identities wins
    await ts.write_events([ev(2, "b", b"one"), ev(2, "b", b"two")], NOW)
    got = await read(ts)
    assert [(e.payload, e.tags) for e in got] == [(b"first", {"k": "1"}), (b"one", {})]


async def test_identity_includes_time_and_series(ts: Backend) -> None:
    await ts.write_events([ev(1, "a"), ev(2, "a"), ev(1, "a", series="t")], NOW)
    assert ids(await read(ts)) == [(1, "a"), (2, "a")]
    assert ids(await read(ts, "t")) == [(1, "a")]


async def test_time_order_ties_by_event_id(ts: Backend) -> None:
    events = [ev(3, "b"), ev(1, "z"), ev(3, "a"), ev(-5, "m"), ev(2, "é"), ev(2, "e"), ev(2, "f")]
    await ts.write_events(events, NOW)
    forward = [(-5, "m"), (1, "z"), (2, "e"), (2, "f"), (2, "é"), (3, "a"), (3, "b")]
    assert ids(await read(ts)) == forward
    assert ids(await read(ts, reverse=True)) == forward[::-1]


async def test_range_bounds(ts: Backend) -> None:
    await ts.write_events([ev(t, eid) for t in (10, 20, 30) for eid in ("a", "b")], NOW)
    assert ids(await read(ts, start=20)) == [(20, "a"), (20, "b"), (30, "a"), (30, "b")]
    assert ids(await read(ts, end=20)) == [(10, "a"), (10, "b")]
    assert ids(await read(ts, start=11, end=30)) == [(20, "a"), (20, "b")]
    assert ids(await read(ts, start=20, end=21, reverse=True)) == [(20, "b"), (20, "a")]
    assert await read(ts, start=20, end=20) == []
    assert await read(ts, start=31) == []


@pytest.mark.parametrize("reverse", [False, True])
async def test_pagination_by_items(ts: Backend, reverse: bool) -> None:
    events = [ev(t, eid) for t in range(5) for eid in ("a", "b", "c")]
    await ts.write_events(events, NOW)
    page = await ts.read_events(
        "s", None, None, reverse=reverse, after=None, limit_items=4, limit_bytes=BIG, now_ms=NOW
    )
    assert len(page.events) == 4 and page.last == page.events[-1].cursor
    want = ids(events)[::-1] if reverse else ids(events)
    assert ids(await read(ts, reverse=reverse, limit_items=4)) == want
    assert ids(await read(ts, reverse=reverse, limit_items=1)) == want
    # exactly one page: no cursor
    page = await ts.read_events(
        "s", None, None, reverse=reverse, after=None, limit_items=15, limit_bytes=BIG, now_ms=NOW
    )
    assert len(page.events) == 15 and page.last is None


async def test_pagination_by_payload_bytes(ts: Backend) -> None:
    await ts.write_events([ev(t, "a", b"x" * 10) for t in range(6)], NOW)
    page = await ts.read_events(
        "s", None, None, reverse=False, after=None, limit_items=BIG, limit_bytes=25, now_ms=NOW
    )
    assert [e.event_time_us for e in page.events] == [0, 1] and page.last == (1, "a")
    # ids and tags do not count: 30 bytes of payload fit exactly
    page = await ts.read_events(
        "s", None, None, reverse=False, after=(2, "a"), limit_items=BIG, limit_bytes=30, now_ms=NOW
    )
    assert [e.event_time_us for e in page.events] == [3, 4, 5] and page.last is None
    # an event larger than the limit still makes a page of one
    assert len(await read(ts, limit_bytes=1)) == 6


async def test_after_cursor_not_stored(ts: Backend) -> None:
    await ts.write_events([ev(1, "a"), ev(2, "a"), ev(3, "a")], NOW)
    for reverse, want in ((False, [(3, "a")]), (True, [(2, "a"), (1, "a")])):
        page = await ts.read_events(
            "s", None, None, reverse=reverse, after=(2, "b"), limit_items=BIG, limit_bytes=BIG, now_ms=NOW
        )
        assert ids(page.events) == want


async def test_batch_with_invalid_event_rejected_whole(ts: Backend) -> None:
    for bad in (Event("", 1, "x"), Event("s", 1, "")):
        with pytest.raises(InvalidArgument):
            await ts.write_events([ev(1, "ok"), bad, ev(2, "ok")], NOW)
    assert await read(ts) == []


async def test_empty_batch(ts: Backend) -> None:
    await ts.write_events([], NOW)
    assert await read(ts) == []


async def test_retention(kind: str, tmp_path: Path) -> None:
    ts = make(kind, tmp_path, retention_days=1)
    await ts.open()
    try:
        old = NOW_US - DAY_MS * 1000 - 1  # just past retention at NOW
        edge = NOW_US - DAY_MS * 1000  # exactly at the horizon: kept
        await ts.write_events([ev(old, "expired"), ev(edge, "edge"), ev(NOW_US, "new")], NOW)
        assert ids(await read(ts)) == [(edge, "edge"), (NOW_US, "new")]
        assert ids(await read(ts, start=1, reverse=True)) == [(NOW_US, "new"), (edge, "edge")]
        # an hour later the edge event is gone too, also when asked by range
        later = NOW + 3600_000
        assert ids(await read(ts, now_ms=later)) == [(NOW_US, "new")]
        assert await read(ts, start=edge, end=edge + 1, now_ms=later) == []
        # writing the expired identity again does not bring it back
        await ts.write_events([ev(old, "expired")], NOW)
        assert ids(await read(ts, end=edge)) == []
    finally:
        await ts.aclose()


async def test_retention_purges(tmp_path: Path) -> None:
    ts = make("sqlite", tmp_path, retention_days=1)
    await ts.open()
    try:
        await ts.write_events([ev(NOW_US, "a"), ev(NOW_US + 1, "b")], NOW)
        later = NOW + 2 * DAY_MS
        await ts.write_events([ev(later * 1000, "c", series="t")], later)
    finally:
        await ts.aclose()
    with sqlite3.connect(tmp_path / "ns.sqlite3") as conn:
        rows = conn.execute("SELECT series_id, event_id FROM events").fetchall()
    assert rows == [("t", "c")]


async def test_memory_retention_purges() -> None:
    ts = MemoryTimeSeriesBackend(MemoryTimeSeriesOptions(retention_days=1))
    await ts.write_events([ev(NOW_US, "a")], NOW)
    await ts.write_events([ev(NOW_US, "a", series="t")], NOW + 2 * DAY_MS)
    assert set(ts._series) == set()  # "t"'s event was past retention on arrival


async def test_sqlite_durable_across_reopen(tmp_path: Path) -> None:
    ts = make("sqlite", tmp_path)
    await ts.open()
    await ts.write_events([ev(1, "a", b"one", k="v"), ev(2, "b")], NOW)
    await ts.aclose()
    ts = make("sqlite", tmp_path)
    await ts.open()
    try:
        assert await read(ts) == [ev(1, "a", b"one", k="v"), ev(2, "b")]
        await ts.write_events([ev(1, "a", b"changed")], NOW)
        assert (await read(ts))[0].payload == b"one"
    finally:
        await ts.aclose()


async def test_sqlite_path_option(tmp_path: Path) -> None:
    ts = make("sqlite", tmp_path, path="sub/x.db", synchronous="normal")
    await ts.open()
    await ts.write_events([ev(1)], NOW)
    await ts.aclose()
    assert (tmp_path / "sub" / "x.db").exists()


async def test_sqlite_refuses_a_keyvalue_file(tmp_path: Path) -> None:
    kv = registry.create("sqlite", {}, data_dir=tmp_path, namespace="ns")
    await kv.open()
    await kv.aclose()
    ts = make("sqlite", tmp_path)
    with pytest.raises(Internal, match="another kind"):
        await ts.open()


async def test_sqlite_closed_is_unavailable(tmp_path: Path) -> None:
    ts = make("sqlite", tmp_path)
    await ts.open()
    await ts.aclose()
    with pytest.raises(Unavailable):
        await ts.write_events([ev(1)], NOW)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retention_days": -1}, "options.retention_days: expected float >= 0.0"),
        ({"retention_days": "7"}, "options.retention_days: expected float, got str"),
        ({"retention_days": True}, "options.retention_days: expected float, got bool"),
        ({"bogus": 1}, "options.bogus: unknown field"),
    ],
)
def test_bad_options(kind: str, tmp_path: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(kind, tmp_path, **options)
    assert str(info.value) == message


def test_sqlite_bad_file_options(tmp_path: Path) -> None:
    for options, message in (
        ({"path": ""}, "options.path: expected str of length >= 1"),
        ({"synchronous": "OFF"}, "options.synchronous: 'OFF' is not 'FULL' or 'NORMAL'"),
    ):
        with pytest.raises(ConfigError) as info:
            make("sqlite", tmp_path, **options)
        assert str(info.value) == message
