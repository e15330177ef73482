"""The KeyValueBackend contract (prism/backends/keyvalue.py), checked against
every backend, plus what is particular to each (options, SQLite files)."""

from __future__ import annotations

import importlib.metadata
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from prism.backends import catalog, registry
from prism.backends.keyvalue import (
    IDEMPOTENCY_WINDOW_MS,
    Delete,
    ItemPage,
    ItemWrite,
    KeyValueBackend,
    MatchAll,
    MatchKeys,
    MatchRange,
    Mutation,
    Predicate,
    Put,
    Stamp,
    StoredItem,
)
from prism.backends.memory.keyvalue import MemoryBackend
from prism.backends.postgres.keyvalue import PostgresBackend
from prism.backends.redis.keyvalue import RedisBackend
from prism.backends.sqlite import pool as sqlite_pool
from prism.backends.sqlite.keyvalue import SqliteBackend
from prism.backends.sqlite.options import SqliteOptions
from prism.errors import ConfigError, Internal, InvalidArgument, Unavailable
from tests.pg import drop_tables
from tests.rd import delete_keys, new_backend

pytestmark = pytest.mark.services("postgres", "redis")

NOW = 1_700_000_000_000  # ms
BIG = 1 << 30
ALL = MatchAll()

Backend = MemoryBackend | SqliteBackend | PostgresBackend | RedisBackend


async def open_backend(kind: str, data_dir: Path) -> Backend:
    # PostgreSQL tables and Redis keys are shared by every run: each test gets its own.
    backend: KeyValueBackend
    if kind == "redis":
        backend = new_backend()
    else:
        namespace = f"prism_test_{uuid.uuid4().hex}" if kind == "postgres" else "ns"
        backend = registry.create(kind, {}, data_dir=data_dir, namespace=namespace)
    assert isinstance(backend, (MemoryBackend, SqliteBackend, PostgresBackend, RedisBackend))
    await backend.open()
    return backend


async def open_sqlite(data_dir: Path) -> SqliteBackend:
    backend = SqliteBackend(SqliteOptions(), data_dir=data_dir, namespace="ns")
    await backend.open()
    return backend


# Every built-in, so that a new one is under contract from the start
# (tests/unit/test_backend_protocols.py checks their signatures).
@pytest.fixture(params=catalog.builtin("keyvalue"))
async def kv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    backend = await open_backend(request.param, tmp_path)
    try:
        yield backend
    finally:
        await backend.aclose()
        if isinstance(backend, PostgresBackend):
            drop_tables(backend)
        if isinstance(backend, RedisBackend):
            await delete_keys(backend.key_prefix)


def st(t: int, token: str = "") -> Stamp:
    return Stamp(generation_time_us=t, token=token)


def w(key: bytes, value: bytes = b"v", expires_at_ms: int = 0) -> ItemWrite:
    return ItemWrite(key=key, value=value, expires_at_ms=expires_at_ms)


async def get(
    kv: Backend,
    id: str,
    predicate: Predicate = ALL,
    *,
    reverse: bool = False,
    after: bytes | None = None,
    limit_items: int = BIG,
    limit_bytes: int = BIG,
    now: int = NOW,
) -> ItemPage:
    return await kv.get_items(
        id,
        predicate,
        reverse=reverse,
        after=after,
        limit_items=limit_items,
        limit_bytes=limit_bytes,
        now_ms=now,
    )


async def keys(
    kv: Backend,
    id: str,
    predicate: Predicate = ALL,
    *,
    reverse: bool = False,
    after: bytes | None = None,
    now: int = NOW,
) -> list[bytes]:
    page = await get(kv, id, predicate, reverse=reverse, after=after, now=now)
    assert page.last_key is None, "expected a single page"
    return [item.key for item in page.items]


async def values(kv: Backend, id: str, now: int = NOW) -> dict[bytes, bytes]:
    return {i.key: i.value for i in (await get(kv, id, now=now)).items}


async def key_pages(
    kv: Backend,
    id: str,
    predicate: Predicate = ALL,
    *,
    reverse: bool = False,
    limit_items: int = BIG,
    limit_bytes: int = BIG,
) -> list[list[bytes]]:
    pages: list[list[bytes]] = []
    after = None
    while True:
        page = await get(
            kv, id, predicate, reverse=reverse, after=after, limit_items=limit_items, limit_bytes=limit_bytes
        )
        pages.append([i.key for i in page.items])
        if page.last_key is None:
            return pages
        assert page.last_key == page.items[-1].key
        after = page.last_key


async def scan_pages(
    kv: Backend, *, limit_items: int = BIG, limit_bytes: int = BIG, now: int = NOW
) -> list[list[tuple[str, list[StoredItem]]]]:
    pages: list[list[tuple[str, list[StoredItem]]]] = []
    after = None
    while True:
        page = await kv.scan_items(after=after, limit_items=limit_items, limit_bytes=limit_bytes, now_ms=now)
        pages.append(page.records)
        if page.last_id is None:
            return pages
        assert page.last_id == page.records[-1][0]
        after = page.last_id


# -- reading -----------------------------------------------------------------


@pytest.mark.trio
async def test_missing_record_reads_as_no_items(kv: Backend) -> None:
    assert await get(kv, "nope") == ItemPage([], None)
    assert await get(kv, "nope", MatchKeys((b"a",)), reverse=True) == ItemPage([], None)


@pytest.mark.trio
async def test_items_round_trip_with_expiry(kv: Backend) -> None:
    await kv.put_items("r", [w(b"k", b"\x00value\xff", NOW + 5000), w(b"e", b"")], st(1), NOW)
    page = await get(kv, "r")
    assert page == ItemPage([StoredItem(b"e", b"", 0), StoredItem(b"k", b"\x00value\xff", NOW + 5000)], None)


@pytest.mark.trio
async def test_keys_are_ordered_unsigned_bytewise(kv: Backend) -> None:
    ks = [b"\x80", b"\x7f", b"\xff", b"\x00", b"ab", b"a", b"\x00\x00"]
    await kv.put_items("r", [w(k) for k in ks], st(1), NOW)
    expected = [b"\x00", b"\x00\x00", b"a", b"ab", b"\x7f", b"\x80", b"\xff"]
    assert await keys(kv, "r") == expected
    assert await keys(kv, "r", reverse=True) == expected[::-1]


@pytest.mark.trio
async def test_match_keys_ignores_missing_and_duplicate_keys(kv: Backend) -> None:
    await kv.put_items("r", [w(k) for k in (b"a", b"b", b"c", b"\x90")], st(1), NOW)
    pred = MatchKeys((b"\x90", b"c", b"zz", b"a", b"c"))
    assert await keys(kv, "r", pred) == [b"a", b"c", b"\x90"]
    assert await keys(kv, "r", pred, reverse=True) == [b"\x90", b"c", b"a"]
    assert await keys(kv, "r", MatchKeys(())) == []


@pytest.mark.trio
async def test_match_keys_with_many_keys(kv: Backend) -> None:
    # More keys than one SQL statement takes: order must hold across chunks.
    present = [i.to_bytes(2, "big") for i in range(0, 3000, 2)]
    await kv.put_items("r", [w(k) for k in present], st(1), NOW)
    asked = MatchKeys(tuple(i.to_bytes(2, "big") for i in range(3000)))
    assert await keys(kv, "r", asked) == present
    pages = await key_pages(kv, "r", asked, reverse=True, limit_items=700)
    assert [len(p) for p in pages] == [700, 700, 100]
    assert [k for page in pages for k in page] == present[::-1]


@pytest.mark.trio
async def test_match_range(kv: Backend) -> None:
    await kv.put_items("r", [w(k) for k in (b"a", b"b", b"c", b"\x80", b"\xff")], st(1), NOW)
    assert await keys(kv, "r", MatchRange(b"b", b"\x80")) == [b"b", b"c"]
    assert await keys(kv, "r", MatchRange(b"b", b"")) == [b"b", b"c", b"\x80", b"\xff"]
    assert await keys(kv, "r", MatchRange(b"", b"b")) == [b"a"]
    assert await keys(kv, "r", MatchRange(b"bb")) == [b"c", b"\x80", b"\xff"]
    assert await keys(kv, "r", MatchRange(b"c", b"b")) == []
    assert await keys(kv, "r", MatchRange(b"b", b"\x80"), reverse=True) == [b"c", b"b"]


@pytest.mark.trio
async def test_paging_by_items(kv: Backend) -> None:
    await kv.put_items("r", [w(k) for k in (b"a", b"b", b"c", b"d", b"e")], st(1), NOW)
    assert await key_pages(kv, "r", limit_items=2) == [[b"a", b"b"], [b"c", b"d"], [b"e"]]
    assert await key_pages(kv, "r", reverse=True, limit_items=2) == [[b"e", b"d"], [b"c", b"b"], [b"a"]]
    # A page that ends exactly on the last item says no more remain.
    assert await get(kv, "r", limit_items=5) == await get(kv, "r")
    assert (await get(kv, "r", limit_items=5)).last_key is None
    assert (await get(kv, "r", limit_items=4)).last_key == b"d"


@pytest.mark.trio
async def test_paging_by_bytes_keeps_at_least_one_item(kv: Backend) -> None:
    # Sizes (key + value): a=2, b=11, c=2, d=2.
    await kv.put_items("r", [w(b"a", b"1"), w(b"b", b"x" * 10), w(b"c"), w(b"d")], st(1), NOW)
    assert await key_pages(kv, "r", limit_bytes=4) == [[b"a"], [b"b"], [b"c", b"d"]]
    assert await key_pages(kv, "r", limit_bytes=13) == [[b"a", b"b"], [b"c", b"d"]]
    assert await key_pages(kv, "r", limit_bytes=1) == [[b"a"], [b"b"], [b"c"], [b"d"]]
    assert await key_pages(kv, "r", limit_bytes=4, limit_items=1) == [[b"a"], [b"b"], [b"c"], [b"d"]]


@pytest.mark.trio
async def test_after_is_exclusive_in_the_direction_of_travel(kv: Backend) -> None:
    await kv.put_items("r", [w(k) for k in (b"a", b"b", b"c", b"\x80")], st(1), NOW)
    assert await keys(kv, "r", after=b"b") == [b"c", b"\x80"]
    assert await keys(kv, "r", after=b"bb") == [b"c", b"\x80"]
    assert await keys(kv, "r", reverse=True, after=b"c") == [b"b", b"a"]
    assert await keys(kv, "r", MatchKeys((b"a", b"c", b"\x80")), after=b"a") == [b"c", b"\x80"]
    assert await keys(kv, "r", MatchKeys((b"a", b"c")), reverse=True, after=b"c") == [b"a"]
    assert await keys(kv, "r", MatchRange(b"a", b"\x80"), reverse=True, after=b"\xff") == [b"c", b"b", b"a"]
    assert await keys(kv, "r", after=b"\x80") == []


# -- time --------------------------------------------------------------------


@pytest.mark.trio
async def test_expired_items_are_absent(kv: Backend) -> None:
    await kv.put_items("r", [w(b"a", expires_at_ms=NOW + 10), w(b"b")], st(1), NOW)
    await kv.put_items("gone", [w(b"x", expires_at_ms=NOW + 5)], st(1), NOW)
    assert await keys(kv, "r", now=NOW + 9) == [b"a", b"b"]
    assert await keys(kv, "r", now=NOW + 10) == [b"b"]
    assert await keys(kv, "r", MatchKeys((b"a",)), now=NOW + 10) == []
    assert await keys(kv, "gone", now=NOW + 10) == []
    pages = await scan_pages(kv, now=NOW + 10)
    assert [[rid for rid, _ in p] for p in pages] == [["r"]]
    # An expired item counts as absent: an older-stamped put replaces it,
    # from the very millisecond it expires.
    await kv.put_items("r", [w(b"a", b"new")], st(0), NOW + 10)
    assert await values(kv, "r", now=NOW + 20) == {b"a": b"new", b"b": b"v"}
    # And an item written already expired is never seen.
    await kv.put_items("r", [w(b"c", expires_at_ms=NOW)], st(5), NOW + 20)
    assert await keys(kv, "r", now=NOW + 20) == [b"a", b"b"]


@pytest.mark.trio
async def test_expiry_is_per_call_clock_not_wall_clock(kv: Backend) -> None:
    await kv.put_items("r", [w(b"a", expires_at_ms=NOW + 10)], st(1), NOW)
    assert await keys(kv, "r", now=NOW) == [b"a"]
    assert await keys(kv, "r", now=NOW + 10 + 10**9) == []


# -- stamps ------------------------------------------------------------------


@pytest.mark.trio
async def test_an_older_stamp_never_overwrites_a_newer_one(kv: Backend) -> None:
    await kv.put_items("r", [w(b"a", b"t10")], st(10), NOW)
    await kv.put_items("r", [w(b"a", b"t5")], st(5), NOW)
    assert await values(kv, "r") == {b"a": b"t10"}
    await kv.put_items("r", [w(b"a", b"t10b")], st(10, "b"), NOW)  # same time, later token
    assert await values(kv, "r") == {b"a": b"t10b"}
    await kv.put_items("r", [w(b"a", b"t10a")], st(10, "a"), NOW)  # same time, earlier token
    assert await values(kv, "r") == {b"a": b"t10b"}
    await kv.put_items("r", [w(b"a", b"t10b again")], st(10, "b"), NOW + IDEMPOTENCY_WINDOW_MS)
    assert await values(kv, "r", now=NOW + IDEMPOTENCY_WINDOW_MS) == {b"a": b"t10b again"}


@pytest.mark.trio
async def test_delete_removes_only_items_not_newer_than_itself(kv: Backend) -> None:
    await kv.put_items("r", [w(b"a"), w(b"c")], st(5), NOW)
    await kv.put_items("r", [w(b"b")], st(20), NOW)
    await kv.delete_items("r", ALL, st(10), NOW)
    assert await keys(kv, "r") == [b"b"]
    await kv.delete_items("r", ALL, st(20), NOW)  # equal stamp is not newer
    assert await keys(kv, "r") == []
    await kv.put_items("r", [w(b"a"), w(b"b"), w(b"c")], st(30), NOW)
    await kv.delete_items("r", MatchKeys((b"a", b"zz")), st(30), NOW)
    await kv.delete_items("r", MatchRange(b"c"), st(29), NOW)  # older: no effect
    assert await keys(kv, "r") == [b"b", b"c"]
    await kv.delete_items("r", MatchRange(b"b", b"c"), st(31), NOW)
    assert await keys(kv, "r") == [b"c"]


# -- idempotency -------------------------------------------------------------


@pytest.mark.trio
async def test_replayed_token_does_nothing(kv: Backend) -> None:
    await kv.put_items("r", [w(b"a", b"1")], st(10, "t1"), NOW)
    await kv.delete_items("r", ALL, st(20), NOW + 1)
    await kv.put_items("r", [w(b"a", b"1")], st(30, "t1"), NOW + 2)  # a retry, whatever its stamp
    assert await keys(kv, "r", now=NOW + 2) == []
    await kv.mutate_items("r", [Put(w(b"b"))], st(40, "t1"), NOW + 3)
    assert await keys(kv, "r", now=NOW + 3) == []
    # The token belongs to (namespace, id): another record may use it.
    await kv.put_items("other", [w(b"a")], st(10, "t1"), NOW + 4)
    assert await keys(kv, "other", now=NOW + 4) == [b"a"]


@pytest.mark.trio
async def test_replayed_delete_does_nothing(kv: Backend) -> None:
    await kv.put_items("r", [w(b"a")], st(10), NOW)
    await kv.delete_items("r", MatchKeys((b"a", b"zz")), st(5, "d"), NOW)  # older than a: nothing deleted
    await kv.put_items("r", [w(b"b")], st(1), NOW)  # older, but no tombstone holds b
    await kv.delete_items("r", ALL, st(5, "d"), NOW)  # replay (another predicate, same token): b stays
    assert await keys(kv, "r") == [b"a", b"b"]


@pytest.mark.trio
async def test_token_is_forgotten_after_the_window(kv: Backend) -> None:
    await kv.put_items("r", [w(b"a")], st(10, "t1"), NOW)
    await kv.delete_items("r", ALL, st(20), NOW)
    edge = NOW + IDEMPOTENCY_WINDOW_MS - 1
    await kv.put_items("other", [w(b"x")], st(1), edge)  # a write may purge old tokens
    await kv.put_items("r", [w(b"a")], st(30, "t1"), edge)
    assert await keys(kv, "r", now=edge) == []
    later = NOW + IDEMPOTENCY_WINDOW_MS
    await kv.put_items("r", [w(b"a")], st(30, "t1"), later)
    assert await keys(kv, "r", now=later) == [b"a"]


# -- mutate ------------------------------------------------------------------


@pytest.mark.trio
async def test_mutations_apply_in_order(kv: Backend) -> None:
    await kv.put_items("r", [w(b"x")], st(1), NOW)
    await kv.mutate_items(
        "r",
        [Put(w(b"a", b"1")), Delete(MatchKeys((b"a", b"x"))), Put(w(b"b", b"1")), Put(w(b"b", b"2"))],
        st(5),
        NOW,
    )
    assert await values(kv, "r") == {b"b": b"2"}


@pytest.mark.trio
async def test_mutate_is_all_or_nothing(kv: Backend) -> None:
    await kv.put_items("r", [w(b"x", b"old")], st(1), NOW)
    bad: list[Mutation] = [Put(w(b"a")), Delete(ALL), Put(w(b"x", b"new")), Put(w(b""))]
    with pytest.raises(InvalidArgument):
        await kv.mutate_items("r", bad, st(5, "m1"), NOW)
    assert await values(kv, "r") == {b"x": b"old"}
    # The failed write did not use up its token.
    await kv.mutate_items("r", bad[:3], st(5, "m1"), NOW)
    assert await values(kv, "r") == {b"x": b"new"}


@pytest.mark.trio
async def test_put_with_an_empty_key_writes_nothing(kv: Backend) -> None:
    with pytest.raises(InvalidArgument):
        await kv.put_items("r", [w(b"a"), w(b"")], st(1), NOW)
    assert await keys(kv, "r") == []


# -- scan --------------------------------------------------------------------


async def _fill_for_scan(kv: Backend) -> dict[str, list[StoredItem]]:
    """Records of 1..4 items with 3-byte keys+values; ``dead`` only expired."""
    expected: dict[str, list[StoredItem]] = {}
    for n, rid in enumerate(["a", "b", "c", "é", "d", "\U0001f600", "aa", "e"]):
        items = [w(bytes([65 + i]), b"vv") for i in range(n % 4 + 1)]
        await kv.put_items(rid, items, st(1), NOW)
        expected[rid] = [StoredItem(i.key, i.value) for i in items]
    await kv.put_items("dead", [w(b"k", expires_at_ms=NOW + 1)], st(1), NOW)
    await kv.put_items("deleted", [w(b"k")], st(1), NOW)
    await kv.delete_items("deleted", ALL, st(1), NOW)
    return dict(sorted(expected.items()))


@pytest.mark.trio
@pytest.mark.parametrize("limit_items, limit_bytes", [(BIG, BIG), (1, BIG), (4, BIG), (BIG, 7), (5, 9)])
async def test_scan_visits_each_record_once_and_whole(
    kv: Backend, limit_items: int, limit_bytes: int
) -> None:
    expected = await _fill_for_scan(kv)
    pages = await scan_pages(kv, limit_items=limit_items, limit_bytes=limit_bytes, now=NOW + 1)
    seen = [record for page in pages for record in page]
    assert seen == list(expected.items())  # id order (code points), no repeats, whole records
    for page in pages:
        assert page, "a page holds at least one record"
        n_items = sum(len(items) for _, items in page)
        n_bytes = sum(len(i.key) + len(i.value) for _, items in page for i in items)
        if len(page) > 1:
            assert n_items <= limit_items and n_bytes <= limit_bytes


@pytest.mark.trio
async def test_scan_pages_are_greedy(kv: Backend) -> None:
    for rid, n in [("a", 1), ("b", 2), ("c", 3), ("d", 1), ("e", 4)]:
        await kv.put_items(rid, [w(bytes([65 + i])) for i in range(n)], st(1), NOW)
    pages = await scan_pages(kv, limit_items=3)
    assert [[rid for rid, _ in p] for p in pages] == [["a", "b"], ["c"], ["d"], ["e"]]
    pages = await scan_pages(kv, limit_items=4)
    assert [[rid for rid, _ in p] for p in pages] == [["a", "b"], ["c", "d"], ["e"]]
    # Bytes: every item is 2 bytes (key + value "v").
    pages = await scan_pages(kv, limit_bytes=6)
    assert [[rid for rid, _ in p] for p in pages] == [["a", "b"], ["c"], ["d"], ["e"]]


@pytest.mark.trio
async def test_scan_of_empty_store(kv: Backend) -> None:
    page = await kv.scan_items(after=None, limit_items=10, limit_bytes=10, now_ms=NOW)
    assert page.records == [] and page.last_id is None
    await kv.put_items("a", [w(b"k")], st(1), NOW)
    page = await kv.scan_items(after="a", limit_items=10, limit_bytes=10, now_ms=NOW)
    assert page.records == [] and page.last_id is None


# -- construction --------------------------------------------------------------


def test_the_registry_checks_the_options_table_it_is_given(tmp_path: Path) -> None:
    # What a worker does with the routing table's dict: the same checks as
    # config loading (tests/unit/test_backend_options.py has them all).
    def create(kind: str, options: dict[str, object]) -> object:
        return registry.create(kind, options, data_dir=tmp_path, namespace="ns")

    with pytest.raises(ConfigError, match=r"^options\.size: unknown field$"):
        create("memory", {"size": 1})
    with pytest.raises(ConfigError, match=r"^options\.pth: unknown field$"):
        create("sqlite", {"pth": "x"})
    with pytest.raises(ConfigError, match=r"^options\.synchronous: 'OFF' is not 'FULL' or 'NORMAL'$"):
        create("sqlite", {"synchronous": "OFF"})
    with pytest.raises(ConfigError, match=r"^options\.path: expected str, got int$"):
        create("sqlite", {"path": 3})
    for flag in ("coalesce_reads", "coalesce_writes"):
        with pytest.raises(ConfigError, match=rf"^options\.{flag}: expected bool, got str$"):
            create("postgres", {flag: "yes"})


def test_sqlite_path_option(tmp_path: Path) -> None:
    def create(options: dict[str, object]) -> SqliteBackend:
        backend = registry.create("sqlite", options, data_dir=tmp_path, namespace="ns")
        assert isinstance(backend, SqliteBackend)
        return backend

    default = create({})
    assert default.path == tmp_path / "ns.sqlite3" and default.synchronous == "FULL"
    relative = create({"path": "sub/x.db", "synchronous": "normal"})
    assert relative.path == tmp_path / "sub" / "x.db" and relative.synchronous == "NORMAL"
    absolute = create({"path": "/abs/x.db"})
    assert absolute.path == Path("/abs/x.db")


def test_registry_names_known_backends_on_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown backend 'nosuch'.*memory, postgres, redis, sqlite"):
        registry.create("nosuch", {}, data_dir=tmp_path, namespace="ns")
    assert isinstance(registry.create("memory", {}, data_dir=tmp_path, namespace="ns"), MemoryBackend)
    with pytest.raises(ValueError):
        registry.register("memory", registry._memory)


def test_registry_loads_entry_point_plugins_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint, EntryPoints

    loaded: list[str] = []

    def fake_entry_points(*, group: str, name: str | None = None) -> EntryPoints:
        assert group == "prism.backends"
        eps = [EntryPoint("plug", "prism.backends.memory.keyvalue:MemoryBackend", group)]
        loaded.append(name or "*")
        return EntryPoints(ep for ep in eps if name is None or ep.name == name)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_factories", dict(registry._factories))
    registry.create("sqlite", {}, data_dir=tmp_path, namespace="ns")
    assert loaded == []  # a built-in never looks at plugins
    with pytest.raises(TypeError):  # the plugin is called with the factory signature
        registry.create("plug", {}, data_dir=tmp_path, namespace="ns")
    assert loaded == ["plug"]
    assert "plug" in registry.known_backends()


# -- SQLite particulars ------------------------------------------------------


@pytest.mark.trio
async def test_sqlite_writes_survive_close_and_reopen(tmp_path: Path) -> None:
    kv = await open_sqlite(tmp_path)
    await kv.put_items("r", [w(b"a", b"1", NOW + 100), w(b"b", b"2")], st(7, "t"), NOW)
    await kv.aclose()
    with pytest.raises(Unavailable):
        await get(kv, "r")
    kv = await open_sqlite(tmp_path)
    try:
        assert (await get(kv, "r")).items == [StoredItem(b"a", b"1", NOW + 100), StoredItem(b"b", b"2")]
        await kv.put_items("r", [w(b"a", b"older")], st(6), NOW)  # stamps survive too
        await kv.put_items("r", [w(b"c")], st(8, "t"), NOW)  # and tokens
        assert await values(kv, "r") == {b"a": b"1", b"b": b"2"}
    finally:
        await kv.aclose()


def test_sqlite_acknowledged_write_survives_kill_9(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, sys, trio
        from pathlib import Path
        from prism.backends.keyvalue import ItemWrite, Stamp
        from prism.backends.sqlite.keyvalue import SqliteBackend
        from prism.backends.sqlite.options import SqliteOptions

        async def main():
            kv = SqliteBackend(SqliteOptions(), data_dir=Path({str(tmp_path)!r}), namespace="ns")
            await kv.open()
            await kv.put_items("r", [ItemWrite(b"k", b"acked")], Stamp(1), {NOW})
            os.kill(os.getpid(), signal.SIGKILL)

        trio.run(main)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], timeout=60)
    assert proc.returncode == -9

    async def check() -> None:
        kv = await open_sqlite(tmp_path)
        try:
            assert await values(kv, "r") == {b"k": b"acked"}
        finally:
            await kv.aclose()

    trio.run(check)


@pytest.mark.trio
async def test_sqlite_purges_expired_items_and_old_tokens(tmp_path: Path) -> None:
    kv = await open_sqlite(tmp_path)
    try:
        await kv.put_items("r", [w(b"gone", expires_at_ms=NOW + 10), w(b"kept")], st(1, "old"), NOW)
        await kv.put_items("r", [w(b"x")], st(1, "new"), NOW + IDEMPOTENCY_WINDOW_MS)
        with sqlite3.connect(kv.path) as db:
            assert db.execute("SELECT key FROM items ORDER BY key").fetchall() == [(b"kept",), (b"x",)]
            assert db.execute("SELECT id, token FROM idempotency").fetchall() == [("r", "new")]
        db.close()
    finally:
        await kv.aclose()


@pytest.mark.trio
async def test_sqlite_failure_midway_rolls_back_everything(tmp_path: Path) -> None:
    kv = await open_sqlite(tmp_path)
    try:
        await kv.put_items("r", [w(b"x", b"old")], st(1), NOW)
        # A trigger makes the third mutation fail inside the transaction.
        with sqlite3.connect(kv.path) as other:
            other.execute(
                "CREATE TRIGGER boom BEFORE INSERT ON items WHEN NEW.key = x'ff'"
                " BEGIN SELECT RAISE(ABORT, 'boom'); END"
            )
        other.close()
        muts: list[Mutation] = [Put(w(b"a")), Delete(MatchKeys((b"x",))), Put(w(b"\xff")), Put(w(b"b"))]
        with pytest.raises(Internal, match="constraint"):
            await kv.mutate_items("r", muts, st(5, "m"), NOW)
        assert await values(kv, "r") == {b"x": b"old"}
        with sqlite3.connect(kv.path) as other:
            other.execute("DROP TRIGGER boom")
        other.close()
        await kv.mutate_items("r", muts, st(5, "m"), NOW)  # token unused by the failure
        assert await keys(kv, "r") == [b"a", b"b", b"\xff"]
    finally:
        await kv.aclose()


@pytest.mark.trio
async def test_sqlite_locked_database_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The pool opens its connections with this busy timeout (patching a
    # re-export elsewhere would leave the test waiting the full 5 s).
    monkeypatch.setattr(sqlite_pool, "BUSY_TIMEOUT_S", 0.05)
    kv = await open_sqlite(tmp_path)
    other = sqlite3.connect(kv.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(Unavailable):
            await kv.put_items("r", [w(b"a")], st(1), NOW)
        assert await keys(kv, "r") == []  # reads go on meanwhile (WAL)
        other.execute("ROLLBACK")
        await kv.put_items("r", [w(b"a")], st(1), NOW)
        assert await keys(kv, "r") == [b"a"]
    finally:
        other.close()
        await kv.aclose()


@pytest.mark.trio
async def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "ns.sqlite3").write_bytes(b"this is not sqlite" * 100)
    kv = SqliteBackend(SqliteOptions(), data_dir=tmp_path, namespace="ns")
    with pytest.raises(Internal, match="not a database") as info:
        await kv.open()
    assert str(tmp_path) not in str(info.value)


@pytest.mark.trio
async def test_sqlite_concurrent_calls(tmp_path: Path) -> None:
    kv = await open_sqlite(tmp_path)
    try:

        async def writer(n: int) -> None:
            for i in range(5):
                await kv.put_items(f"r{n}", [w(bytes([i]))], st(i), NOW)
                await get(kv, f"r{n}")

        async with trio.open_nursery() as nursery:
            for n in range(12):
                nursery.start_soon(writer, n)
        pages = await scan_pages(kv)
        assert [(rid, len(items)) for rid, items in pages[0]] == sorted((f"r{n}", 5) for n in range(12))
    finally:
        await kv.aclose()
