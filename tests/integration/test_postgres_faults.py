"""The PostgreSQL backend when the database is slow, saturated or gone.

Real server, real time: a statement is held up by a lock another connection
takes (the product has no test hooks), and the timeouts are short real ones.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import trio

from prism.backends import registry
from prism.backends.keyvalue import ItemWrite, MatchAll, Stamp, StoredItem
from prism.backends.postgres.keyvalue import PostgresBackend
from prism.errors import ConfigError, ResourceExhausted, Unavailable
from tests.pg import DSN, drop_tables

pytestmark = pytest.mark.services("postgres")

NOW = 1_700_000_000_000


def new_pg(options: dict[str, object], namespace: str = "") -> PostgresBackend:
    """Through the registry, from a plain table: as a worker builds it."""
    namespace = namespace or f"prism_test_{uuid.uuid4().hex}"
    kv = registry.create("postgres", options, data_dir=Path("/nonexistent"), namespace=namespace)
    assert isinstance(kv, PostgresBackend)
    return kv


async def open_pg(**options: object) -> PostgresBackend:
    kv = new_pg({"dsn": DSN, **options})
    await kv.open()
    return kv


@pytest.fixture
async def kv() -> AsyncIterator[PostgresBackend]:
    backend = await open_pg(pool_size=2, pool_timeout_s=0.05)
    try:
        yield backend
    finally:
        await backend.aclose()
        drop_tables(backend)


@pytest.fixture
async def locker(kv: PostgresBackend) -> AsyncIterator[psycopg.Connection[tuple[object, ...]]]:
    """A second client, outside Prism, to hold locks. Depends on ``kv`` so
    that its locks are gone before ``kv`` drops the tables, also when a test fails."""
    conn = psycopg.connect(DSN)
    try:
        yield conn
    finally:
        conn.close()


def lock_table(conn: psycopg.Connection[tuple[object, ...]], table: str) -> None:
    conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE'.encode())


def prism_statements(table: str) -> list[tuple[object, ...]]:
    """Prism's statements on ``table`` that are running now (seen from a fresh session)."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, state, wait_event_type FROM pg_stat_activity"
            " WHERE application_name = 'prism' AND state = 'active' AND query LIKE %s",
            (f'%"{table}"%',),
        ).fetchall()


async def wait_until_blocked(table: str, count: int = 1) -> None:
    with trio.fail_after(5):
        while len(await trio.to_thread.run_sync(prism_statements, table)) < count:
            await trio.sleep(0.01)


async def get_all(kv: PostgresBackend) -> list[StoredItem]:
    page = await kv.get_items(
        "r", MatchAll(), reverse=False, after=None, limit_items=100, limit_bytes=1 << 20, now_ms=NOW
    )
    return page.items


async def test_cancelled_read_is_cancelled_on_the_server(
    kv: PostgresBackend, locker: psycopg.Connection[tuple[object, ...]]
) -> None:
    await kv.put_items("r", [ItemWrite(b"k", b"v")], Stamp(1), NOW)
    lock_table(locker, kv.items_table)
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def reader() -> None:
            with scope:
                await get_all(kv)

        nursery.start_soon(reader)
        await wait_until_blocked(kv.items_table)
        scope.cancel()
    assert scope.cancelled_caught
    with trio.fail_after(1):
        while await trio.to_thread.run_sync(prism_statements, kv.items_table):
            await trio.sleep(0.02)
    locker.rollback()
    # The connection was brought back to idle and is reused.
    assert await get_all(kv) == [StoredItem(b"k", b"v")]


async def test_cancelled_write_is_rolled_back(
    kv: PostgresBackend, locker: psycopg.Connection[tuple[object, ...]]
) -> None:
    lock_table(locker, kv.items_table)
    with trio.move_on_after(0.3) as scope:
        await kv.put_items("r", [ItemWrite(b"k", b"v")], Stamp(1, "tok"), NOW)
    assert scope.cancelled_caught
    assert await trio.to_thread.run_sync(prism_statements, kv.items_table) == []
    locker.rollback()
    assert await get_all(kv) == []
    # Its token was rolled back with it: the retry applies.
    await kv.put_items("r", [ItemWrite(b"k", b"v")], Stamp(1, "tok"), NOW)
    assert await get_all(kv) == [StoredItem(b"k", b"v")]


async def assert_read_exhausted_quickly(kv: PostgresBackend) -> None:
    start = trio.current_time()
    with pytest.raises(ResourceExhausted):
        await get_all(kv)
    assert trio.current_time() - start < 0.5


async def test_exhausted_pool_is_resource_exhausted_quickly(
    kv: PostgresBackend, locker: psycopg.Connection[tuple[object, ...]]
) -> None:
    lock_table(locker, kv.items_table)
    async with trio.open_nursery() as nursery:
        for n in range(2):  # pool_size=2, both stuck behind the lock
            nursery.start_soon(kv.put_items, f"w{n}", [ItemWrite(b"k", b"v")], Stamp(1, ""), NOW)
        await wait_until_blocked(kv.items_table, 2)
        await assert_read_exhausted_quickly(kv)
        nursery.cancel_scope.cancel()
    locker.rollback()
    assert await get_all(kv) == []


async def test_reads_behind_stuck_coalesced_reads_are_resource_exhausted_quickly(
    kv: PostgresBackend, locker: psycopg.Connection[tuple[object, ...]]
) -> None:
    # Coalesced reads use at most two statements at a time; a third batch
    # waits for one of them no longer than the pool timeout.
    lock_table(locker, kv.items_table)
    async with trio.open_nursery() as nursery:
        for n in (1, 2):
            nursery.start_soon(get_all, kv)
            await wait_until_blocked(kv.items_table, n)
        await assert_read_exhausted_quickly(kv)
        nursery.cancel_scope.cancel()
    locker.rollback()
    assert await get_all(kv) == []


async def test_closed_port_is_unavailable_quickly() -> None:
    kv = new_pg({"dsn": "postgresql://127.0.0.1:1/test", "connect_timeout_s": 1}, "ns")
    start = trio.current_time()
    with pytest.raises(Unavailable):
        await kv.open()
    assert trio.current_time() - start < 1.0
    await kv.aclose()


async def test_silent_server_is_unavailable_within_the_connect_timeout() -> None:
    # Accepts TCP connections (the kernel's backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        kv = new_pg({"dsn": f"postgresql://127.0.0.1:{port}/test", "connect_timeout_s": 0.3}, "ns")
        start = trio.current_time()
        with pytest.raises(Unavailable, match="within"):
            await kv.open()
        assert 0.25 < trio.current_time() - start < 1.5
        await kv.aclose()


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"^options\.pool: unknown field$"):
        new_pg({"pool": 3})
    with pytest.raises(ConfigError, match=r"^options\.pool_size: expected int >= 1$"):
        new_pg({"pool_size": 0})
    with pytest.raises(ConfigError, match=r"^options\.connect_timeout_s: expected float, got str$"):
        new_pg({"connect_timeout_s": "5"})
    with pytest.raises(ConfigError, match=r"^options\.dsn: is invalid: "):
        new_pg({"dsn": "host=x port"})


def test_namespaces_map_to_distinct_safe_tables() -> None:
    names = ["orders", "Orders", "a-b", "a_b", "é" * 60]
    tables = [new_pg({}, n).items_table for n in names]
    assert tables[0] == "prism_kv_orders"
    assert len(set(tables)) == len(names)
    assert all(len(t) + len("_idem") <= 63 and t.isascii() for t in tables)


async def test_session_killed_by_the_server_is_unavailable_once_then_replaced(kv: PostgresBackend) -> None:
    await kv.put_items("r", [ItemWrite(b"k", b"v")], Stamp(1), NOW)

    pids = [conn.pgconn.backend_pid for conn in kv._pool._idle]
    assert pids

    def kill_prism_sessions() -> None:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))

    await trio.to_thread.run_sync(kill_prism_sessions)
    with pytest.raises(Unavailable):
        await get_all(kv)
    # The dead connection was dropped, not pooled: the next call reconnects.
    assert await get_all(kv) == [StoredItem(b"k", b"v")]
