"""Deletes leave tombstones (prism/backends/keyvalue.py), on every backend: a
put stamped before a delete but arriving after it changes nothing while the
tombstone lasts, tombstones are never read back, and they are purged once
past ``tombstone_ttl_s``; files and tables made before tombstones existed
open and keep their data."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from prism.backends import catalog, registry
from prism.backends.keyvalue import (
    IDEMPOTENCY_WINDOW_MS,
    Delete,
    MatchKeys,
    MatchRange,
    Predicate,
    Put,
)
from prism.backends.memory.keyvalue import MemoryBackend
from prism.backends.postgres.keyvalue import PostgresBackend
from prism.backends.redis.keyvalue import RedisBackend
from prism.backends.sqlite.keyvalue import SqliteBackend
from prism.drivers import resp
from tests.pg import DSN, drop_tables
from tests.rd import URL, delete_keys, new_backend

from .test_backend_contract import ALL, NOW, Backend, get, keys, st, values, w

pytestmark = pytest.mark.services("postgres", "redis")

TTL_S = 60
TTL_MS = TTL_S * 1000


async def open_backend(kind: str, data_dir: Path, ttl_s: float = TTL_S) -> Backend:
    backend: Backend
    if kind == "redis":
        backend = new_backend(tombstone_ttl_s=ttl_s)
    else:
        options: dict[str, object] = {"tombstone_ttl_s": ttl_s}
        namespace = "ns"
        if kind == "postgres":
            options["dsn"] = DSN
            namespace = f"prism_test_{uuid.uuid4().hex}"
        created = registry.create(kind, options, data_dir=data_dir, namespace=namespace)
        assert isinstance(created, (MemoryBackend, SqliteBackend, PostgresBackend))
        backend = created
    await backend.open()
    return backend


async def close(backend: Backend) -> None:
    await backend.aclose()
    if isinstance(backend, PostgresBackend):
        drop_tables(backend)
    if isinstance(backend, RedisBackend):
        await delete_keys(backend.key_prefix)


@pytest.fixture(params=catalog.builtin("keyvalue"))
async def kv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    backend = await open_backend(request.param, tmp_path)
    try:
        yield backend
    finally:
        await close(backend)


DELETES: list[Predicate] = [ALL, MatchKeys((b"a", b"never-held")), MatchRange(b"a", b"b")]


@pytest.mark.trio
@pytest.mark.parametrize("predicate", DELETES, ids=["match_all", "match_keys", "match_range"])
async def test_a_put_older_than_a_delete_does_not_bring_the_item_back(
    kv: Backend, predicate: Predicate
) -> None:
    await kv.put_items("r", [w(b"a", b"v1")], st(10, "put-1"), NOW)
    await kv.delete_items("r", predicate, st(30, "del"), NOW + 1)
    # The retried (or hedged) put, stamped before the delete, arrives after it.
    await kv.put_items("r", [w(b"a", b"v1")], st(20, "put-1-retry"), NOW + 2)
    assert await keys(kv, "r", now=NOW + 2) == []
    page = await kv.scan_items(after=None, limit_items=100, limit_bytes=1 << 20, now_ms=NOW + 2)
    assert page.records == []
    # A key the delete named (or covered) but that held nothing is kept too.
    if predicate != MatchRange(b"a", b"b"):
        key = b"never-held" if isinstance(predicate, MatchKeys) else b"z"
        await kv.put_items("r", [w(key)], st(29), NOW + 3)
        assert await keys(kv, "r", now=NOW + 3) == []
    # A put stamped after the delete is applied, as is one of the same stamp.
    await kv.put_items("r", [w(b"a", b"v2")], st(31), NOW + 4)
    assert await values(kv, "r", now=NOW + 4) == {b"a": b"v2"}


@pytest.mark.trio
async def test_a_range_tombstone_holds_keys_outside_it_not(kv: Backend) -> None:
    await kv.delete_items("r", MatchRange(b"b", b"d"), st(30), NOW)
    await kv.put_items("r", [w(b"a"), w(b"b"), w(b"c"), w(b"d")], st(20), NOW + 1)
    assert await keys(kv, "r", now=NOW + 1) == [b"a", b"d"]


@pytest.mark.trio
async def test_mutate_delete_then_put_leaves_the_put_and_a_late_put_changes_nothing(kv: Backend) -> None:
    await kv.mutate_items("r", [Delete(ALL), Put(w(b"a", b"new"))], st(30), NOW)
    await kv.put_items("r", [w(b"a", b"old"), w(b"b", b"old")], st(20), NOW + 1)
    assert await values(kv, "r", now=NOW + 1) == {b"a": b"new"}


@pytest.mark.trio
async def test_a_newer_tombstone_is_not_replaced_by_an_older_delete(kv: Backend) -> None:
    await kv.delete_items("r", MatchKeys((b"a",)), st(30), NOW)
    await kv.delete_items("r", MatchKeys((b"a",)), st(10), NOW + 1)
    await kv.put_items("r", [w(b"a")], st(20), NOW + 2)
    assert await keys(kv, "r", now=NOW + 2) == []


@pytest.mark.trio
async def test_tombstones_are_forgotten_after_their_ttl(kv: Backend) -> None:
    await kv.delete_items("r", MatchKeys((b"a",)), st(30), NOW)
    await kv.delete_items("q", ALL, st(30), NOW)
    await kv.put_items("r", [w(b"a")], st(20), NOW + TTL_MS - 1)
    await kv.put_items("q", [w(b"a")], st(20), NOW + TTL_MS - 1)
    assert await keys(kv, "r", now=NOW + TTL_MS - 1) == []
    assert await keys(kv, "q", now=NOW + TTL_MS - 1) == []
    await kv.put_items("r", [w(b"a")], st(20), NOW + TTL_MS)
    await kv.put_items("q", [w(b"a")], st(20), NOW + TTL_MS)
    assert await keys(kv, "r", now=NOW + TTL_MS) == [b"a"]
    assert await keys(kv, "q", now=NOW + TTL_MS) == [b"a"]


@pytest.mark.trio
async def test_records_of_tombstones_only_are_not_scanned(kv: Backend) -> None:
    for id in ["a", "b", "c", "d"]:
        await kv.put_items(id, [w(b"k")], st(1), NOW)
    await kv.delete_items("b", MatchKeys((b"k",)), st(2), NOW)
    await kv.delete_items("c", ALL, st(2), NOW)
    await kv.delete_items("e", MatchKeys((b"k",)), st(2), NOW)  # never held anything
    pages = []
    after = None
    while True:
        page = await kv.scan_items(after=after, limit_items=1, limit_bytes=1 << 20, now_ms=NOW)
        pages.append([id for id, _ in page.records])
        if page.last_id is None:
            break
        after = page.last_id
    assert pages == [["a"], ["d"]]
    assert (await get(kv, "b")).items == []
    assert (await get(kv, "b", MatchRange(b"a"), reverse=True)).items == []


# -- purges: each backend's own ------------------------------------------------


@pytest.mark.trio
async def test_sqlite_purges_tombstones_past_their_ttl(tmp_path: Path) -> None:
    kv = await open_backend("sqlite", tmp_path)
    assert isinstance(kv, SqliteBackend)
    try:
        await kv.delete_items("r", MatchKeys((b"a", b"b")), st(1), NOW)
        await kv.delete_items("r", MatchRange(b"c"), st(1), NOW)
        with sqlite3.connect(kv.path) as db:
            assert db.execute("SELECT count(*) FROM items").fetchone() == (2,)
            assert db.execute("SELECT count(*) FROM range_tombstones").fetchone() == (1,)
        db.close()
        # The purge runs inside a write, at most once a minute: this one is a day later.
        await kv.put_items("other", [w(b"x")], st(1), NOW + IDEMPOTENCY_WINDOW_MS)
        with sqlite3.connect(kv.path) as db:
            assert db.execute("SELECT id, key FROM items").fetchall() == [("other", b"x")]
            assert db.execute("SELECT count(*) FROM range_tombstones").fetchone() == (0,)
        db.close()
    finally:
        await close(kv)


@pytest.mark.trio
async def test_postgres_purges_tombstones_past_their_ttl(tmp_path: Path) -> None:
    kv = await open_backend("postgres", tmp_path)
    assert isinstance(kv, PostgresBackend)
    try:
        await kv.delete_items("r", MatchKeys((b"a", b"b")), st(1), NOW)
        await kv.delete_items("r", MatchRange(b"c"), st(1), NOW)
        with psycopg.connect(DSN) as conn:
            assert conn.execute(f'SELECT count(*) FROM "{kv.items_table}"'.encode()).fetchone() == (2,)
            assert conn.execute(f'SELECT count(*) FROM "{kv.tombstones_table}"'.encode()).fetchone() == (1,)
        await kv.put_items("other", [w(b"x")], st(1, "t"), NOW + TTL_MS + 60_000)
        with psycopg.connect(DSN) as conn:
            rows = conn.execute(f'SELECT id, key FROM "{kv.items_table}"'.encode()).fetchall()
            assert rows == [("other", b"x")]
            assert conn.execute(f'SELECT count(*) FROM "{kv.tombstones_table}"'.encode()).fetchone() == (0,)
    finally:
        await close(kv)


async def redis_hash(conn: resp.Connection, key: bytes) -> dict[bytes, bytes]:
    flat = await conn.call("HGETALL", key)
    return dict(zip(flat[::2], flat[1::2], strict=True))


@pytest.mark.trio
async def test_redis_prunes_tombstones_and_lets_their_hashes_expire(tmp_path: Path) -> None:
    kv = await open_backend("redis", tmp_path)
    assert isinstance(kv, RedisBackend)
    x, r = (f"{kv.key_prefix}ns:{kind}:rec".encode() for kind in ("x", "r"))
    conn = await resp.connect(resp.Address(URL), timeout_s=5)
    try:
        await kv.delete_items("rec", MatchKeys((b"a", b"b")), st(1), NOW)
        await kv.delete_items("rec", MatchRange(b"c"), st(1), NOW)
        assert set(await redis_hash(conn, x)) == {b"", b"a", b"b"}  # "": when next pruned
        assert len(await redis_hash(conn, r)) == 1
        for key in (x, r):  # each hash outlives its last tombstone by a minute at most
            assert TTL_MS < await conn.call("PTTL", key) <= TTL_MS + 60_000
        later = NOW + TTL_MS + 60_000
        await kv.delete_items("rec", MatchKeys((b"z",)), st(2), later)
        await kv.delete_items("rec", MatchRange(b"m", b"p"), st(2), later)
        assert set(await redis_hash(conn, x)) == {b"", b"z"}
        assert list(await redis_hash(conn, r)) == [b"1 mp"]  # len(start), start, end
        # A deleted record leaves no item, no id to scan, only what expires.
        assert await conn.call("EXISTS", f"{kv.key_prefix}ns:h:rec".encode()) == 0
        assert await conn.call("ZCARD", f"{kv.key_prefix}ns:ids".encode()) == 0
        m = f"{kv.key_prefix}ns:m:rec".encode()
        assert TTL_MS < await conn.call("PTTL", m) <= TTL_MS + 60_000
        # Items again: the bookkeeping stays (it holds their expiry bound).
        await kv.put_items("rec", [w(b"k", expires_at_ms=later + 10)], st(3), later)
        assert await conn.call("PTTL", m) == -1
        assert await conn.call("HGET", m, b"exp") == b"%d" % (later + 10)
        # A record that never saw a delete: its puts never look for tombstones.
        await kv.put_items("fresh", [w(b"k", expires_at_ms=later + 10)], st(3), later)
        fresh_m = f"{kv.key_prefix}ns:m:fresh".encode()
        assert await redis_hash(conn, fresh_m) == {b"exp": b"%d" % (later + 10)}
    finally:
        conn.close()
        await close(kv)


# -- files and tables made before tombstones -----------------------------------

# What schema version 1 (before tombstones) created, verbatim.
SQLITE_V1 = (
    """CREATE TABLE IF NOT EXISTS items (
        id TEXT NOT NULL,
        key BLOB NOT NULL,
        value BLOB NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        stamp_us INTEGER NOT NULL,
        stamp_token TEXT NOT NULL,
        PRIMARY KEY (id, key)
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS items_expiry
        ON items (expires_at_ms) WHERE expires_at_ms != 0""",
    """CREATE TABLE IF NOT EXISTS idempotency (
        id TEXT NOT NULL,
        token TEXT NOT NULL,
        applied_at_ms INTEGER NOT NULL,
        PRIMARY KEY (id, token)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency (applied_at_ms)",
)


@pytest.mark.trio
async def test_a_sqlite_file_of_schema_version_1_opens_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "ns.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        for statement in SQLITE_V1:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO items VALUES ('r', x'61', x'7631', 0, 10, 'put-1')")
        db.execute("INSERT INTO items VALUES ('r', x'62', x'7632', 0, 10, 'put-1')")
        db.execute("INSERT INTO idempotency VALUES ('r', 'put-1', ?)", (NOW,))
    db.close()
    kv = await open_backend("sqlite", tmp_path)
    try:
        assert await values(kv, "r") == {b"a": b"v1", b"b": b"v2"}
        await kv.put_items("r", [w(b"a", b"again")], st(11, "put-1"), NOW + 1)  # a replay, as before
        assert await values(kv, "r", now=NOW + 1) == {b"a": b"v1", b"b": b"v2"}
        await kv.delete_items("r", MatchKeys((b"a",)), st(30), NOW + 2)
        await kv.put_items("r", [w(b"a", b"late")], st(20), NOW + 3)
        assert await values(kv, "r", now=NOW + 3) == {b"b": b"v2"}
    finally:
        await close(kv)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
    db.close()


@pytest.mark.trio
async def test_postgres_tables_made_before_tombstones_open_with_their_data(tmp_path: Path) -> None:
    namespace = f"prism_test_{uuid.uuid4().hex[:12]}"
    items, tokens = f"prism_kv_{namespace}", f"prism_kv_{namespace}_idem"
    with psycopg.connect(DSN, autocommit=True) as conn:  # the tables as they were made before
        conn.execute(
            f"""CREATE TABLE "{items}" (
                id text COLLATE "C" NOT NULL, key bytea NOT NULL, value bytea NOT NULL,
                expires_at_ms bigint NOT NULL, stamp_us bigint NOT NULL,
                stamp_token text COLLATE "C" NOT NULL, PRIMARY KEY (id, key))""".encode()
        )
        conn.execute(
            f'CREATE INDEX "{items}_expiry" ON "{items}" (expires_at_ms) WHERE expires_at_ms != 0'.encode()
        )
        conn.execute(
            f"""CREATE TABLE "{tokens}" (
                id text COLLATE "C" NOT NULL, token text COLLATE "C" NOT NULL,
                applied_at_ms bigint NOT NULL, PRIMARY KEY (id, token))""".encode()
        )
        conn.execute(f'CREATE INDEX "{tokens}_age" ON "{tokens}" (applied_at_ms)'.encode())
        conn.execute(f"""INSERT INTO "{items}" VALUES ('r', 'a', 'v1', 0, 10, 'put-1')""".encode())
    kv = registry.create("postgres", {"dsn": DSN}, data_dir=tmp_path, namespace=namespace)
    assert isinstance(kv, PostgresBackend) and kv.items_table == items
    await kv.open()
    try:
        assert await values(kv, "r") == {b"a": b"v1"}
        await kv.delete_items("r", ALL, st(30), NOW)
        await kv.put_items("r", [w(b"a", b"late")], st(20), NOW + 1)
        assert await values(kv, "r", now=NOW + 1) == {}
    finally:
        await close(kv)
