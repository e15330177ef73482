"""Coalescing: concurrent reads (and writes) share fetches (and transactions),
and every caller gets its own answer."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from prism.backends.coalesce import Coalescer
from prism.backends.keyvalue import ItemWrite, MatchAll, MatchKeys, Stamp
from prism.errors import PrismError, ResourceExhausted
from tests import rd
from tests.pg import DSN, drop_tables

pytestmark = pytest.mark.services("postgres", "redis")


class Recorder:
    def __init__(self, delay: float = 0.01) -> None:
        self.calls: list[list[str]] = []
        self.delay = delay
        self.fail: Exception | None = None

    async def fetch(self, keys: list[str]) -> list[str]:
        self.calls.append(list(keys))
        await trio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return [k.upper() for k in keys]


async def test_alone_a_read_goes_out_at_once(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(delay=0)
    c = Coalescer(rec.fetch)
    assert await c.get("a") == "A"
    assert rec.calls == [["a"]]


async def test_concurrent_reads_share_fetches_and_each_gets_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder()
    c = Coalescer(rec.fetch, slots=1)
    got: dict[int, str] = {}

    async def one(i: int) -> None:
        got[i] = await c.get(f"k{i % 7}")

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(one, i)
    assert got == {i: f"K{i % 7}" for i in range(50)}
    assert len(rec.calls) < 5  # one alone, then the rest piled up behind it
    assert sum(len(call) for call in rec.calls) == 50  # no key dropped, none deduplicated


async def test_batches_respect_max_batch(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    c = Coalescer(rec.fetch, slots=1, max_batch=8)
    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(c.get, f"k{i}")
    assert max(len(call) for call in rec.calls) <= 8
    assert sum(len(call) for call in rec.calls) == 40


async def test_an_error_fails_every_caller_of_that_batch(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    rec.fail = ResourceExhausted("pool busy")
    c = Coalescer(rec.fetch, slots=1)
    errors: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            await c.get(f"k{i}")
        except ResourceExhausted as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    assert len(errors) == 10
    assert all(str(e) == "pool busy" for e in errors)
    rec.fail = None
    assert await c.get("z") == "Z"  # the coalescer is not stuck


async def test_a_cancelled_leader_does_not_fail_its_followers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(delay=1.0)
    c = Coalescer(rec.fetch, slots=1)
    got: dict[str, str] = {}

    async def one(key: str) -> None:
        got[key] = await c.get(key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "first")  # leads the first batch, holds the slot 1 s
        await trio.testing.wait_all_tasks_blocked()
        leader_scope = trio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await c.get("doomed")

        nursery.start_soon(leader)  # leads the second batch, waits for the slot
        await trio.testing.wait_all_tasks_blocked()
        for key in ("x", "y"):
            nursery.start_soon(one, key)  # follow the doomed leader
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
    assert got == {"first": "FIRST", "x": "X", "y": "Y"}
    assert ["doomed", "x", "y"] not in rec.calls


@pytest.fixture
async def pg_backend(tmp_path: Path):  # type: ignore[no-untyped-def]
    from prism.backends.postgres.keyvalue import PostgresBackend
    from prism.backends.postgres.options import PostgresKeyValueOptions

    namespace = f"co_{uuid.uuid4().hex[:10]}"
    backend = PostgresBackend(PostgresKeyValueOptions(dsn=DSN, pool_size=4), namespace=namespace)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()
        drop_tables(backend)


async def test_postgres_concurrent_gets_are_coalesced_and_exact(pg_backend) -> None:  # type: ignore[no-untyped-def]
    now = int(time.time() * 1000)
    for i in range(30):
        items = [ItemWrite(f"k{j}".encode(), f"v{i}.{j}".encode(), 0) for j in range(i % 4)]
        if items:
            await pg_backend.put_items(f"r{i}", items, Stamp(1, ""), now)
    # An expired item is never returned, also from a batch.
    await pg_backend.put_items("r29", [ItemWrite(b"old", b"x", now - 1)], Stamp(2, ""), now - 10)
    pages: dict[int, list[tuple[bytes, bytes]]] = {}

    async def get(i: int) -> None:
        page = await pg_backend.get_items(
            f"r{i % 30}", MatchAll(), reverse=i % 2 == 1, after=None,
            limit_items=2, limit_bytes=1 << 20, now_ms=now,
        )  # fmt: skip
        pages[i] = [(item.key, item.value) for item in page.items]
        assert (page.last_key is not None) == (i % 30 % 4 == 3)

    async with trio.open_nursery() as nursery:
        for i in range(120):
            nursery.start_soon(get, i)
    for i, got in pages.items():
        r = i % 30
        want = [(f"k{j}".encode(), f"v{r}.{j}".encode()) for j in range(r % 4)]
        if i % 2:
            want.reverse()
        assert got == want[:2], (i, got)
    readers = pg_backend._readers.values()
    assert sum(r.calls for r in readers) == 120
    assert sum(r.batches for r in readers) < 60  # shared statements, not one per call


async def test_postgres_concurrent_puts_share_statements_and_last_writer_wins(pg_backend) -> None:  # type: ignore[no-untyped-def]
    now = int(time.time() * 1000)
    # The first write of a backend purges (its own transaction); so does none after.
    await pg_backend.put_items("expired", [ItemWrite(b"k", b"old", now - 1)], Stamp(10**15, ""), now - 10)

    async def put(i: int) -> None:
        # 4 puts per record with stamps in shuffled order, 2 items each.
        stamp = Stamp(1000 + (i * 7) % 80, "")
        items = [ItemWrite(b"k", b"v%d" % i), ItemWrite(b"j", b"w%d" % i)]
        await pg_backend.put_items(f"r{i % 20}", items, stamp, now)

    async def put_over_expired() -> None:  # an expired item loses to any write, whatever its stamp
        await pg_backend.put_items("expired", [ItemWrite(b"k", b"new")], Stamp(5, ""), now)

    async with trio.open_nursery() as nursery:
        for i in range(80):
            nursery.start_soon(put, i)
        nursery.start_soon(put_over_expired)

    async def items(id: str) -> list[tuple[bytes, bytes]]:
        page = await pg_backend.get_items(
            id, MatchAll(), reverse=False, after=None, limit_items=10, limit_bytes=1 << 20, now_ms=now
        )
        return [(item.key, item.value) for item in page.items]

    for r in range(20):
        winner = max((i for i in range(80) if i % 20 == r), key=lambda i: (i * 7) % 80)
        assert await items(f"r{r}") == [(b"j", b"w%d" % winner), (b"k", b"v%d" % winner)]
    assert await items("expired") == [(b"k", b"new")]
    writes = pg_backend._writes
    assert writes.calls == 81
    assert writes.batches < 40  # shared statements, not one per put


async def test_a_batch_that_waits_too_long_for_a_slot_fails_fast(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(delay=10.0)  # the batch in flight holds the only slot for 10 s
    c = Coalescer(rec.fetch, slots=1, wait_timeout_s=0.5, timeout_error=lambda: ResourceExhausted("busy"))
    failed: list[float] = []

    async def late(key: str) -> None:
        start = trio.current_time()
        with pytest.raises(ResourceExhausted, match="busy"):
            await c.get(key)
        failed.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.get, "slow")
        await trio.testing.wait_all_tasks_blocked()
        for key in ("a", "b"):  # one batch: leader and follower both fail
            nursery.start_soon(late, key)
    assert failed == [0.5, 0.5]
    assert rec.calls == [["slow"]]


async def test_redis_concurrent_gets_are_pipelined_together_and_exact(tmp_path: Path) -> None:
    kv = rd.new_backend(pool_size=4)
    await kv.open()
    try:
        now = int(time.time() * 1000)
        for i in range(20):
            items = [ItemWrite(f"k{j}".encode(), f"v{i}.{j}".encode(), 0) for j in range(i % 3)]
            if items:
                await kv.put_items(f"r{i}", items, Stamp(1, ""), now)
        pages: dict[int, list[tuple[bytes, bytes]]] = {}

        async def get(i: int) -> None:
            # Mixed shapes share batches too: each call is its own script call.
            predicate = MatchKeys([b"k1"]) if i % 5 == 0 else MatchAll()
            page = await kv.get_items(
                f"r{i % 20}", predicate, reverse=i % 2 == 1, after=None,
                limit_items=10, limit_bytes=1 << 20, now_ms=now,
            )  # fmt: skip
            pages[i] = [(item.key, item.value) for item in page.items]

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(get, i)
        for i, got in pages.items():
            r = i % 20
            want = [(f"k{j}".encode(), f"v{r}.{j}".encode()) for j in range(r % 3)]
            if i % 5 == 0:
                want = [w for w in want if w[0] == b"k1"]
            if i % 2:
                want.reverse()
            assert got == want, (i, got)
        assert kv._reads is not None
        assert kv._reads.calls == 100
        assert kv._reads.batches < 50
    finally:
        await kv.aclose()
        await rd.delete_keys(kv.key_prefix)


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
async def test_concurrent_writes_share_round_trips_and_each_applies(kind: str, tmp_path: Path) -> None:
    # Redis pipelines them (each its own script run); SQLite commits them
    # together (each in its own savepoint).
    from prism.backends.sqlite.keyvalue import SqliteBackend
    from prism.backends.sqlite.options import SqliteOptions

    kv = (
        rd.new_backend(pool_size=4)
        if kind == "redis"
        else SqliteBackend(SqliteOptions(), data_dir=tmp_path, namespace="ns")
    )
    await kv.open()
    try:
        now = int(time.time() * 1000)

        async def put(i: int) -> None:
            # The same token twice per record: one of each pair is a replay
            # (the replay's value differs: it must not land).
            stamp = Stamp(1000 + i, f"t{i // 2}")
            await kv.put_items(f"r{i // 2}", [ItemWrite(b"k", f"v{i}".encode())], stamp, now)

        async with trio.open_nursery() as nursery:
            for i in range(80):
                nursery.start_soon(put, i)
        for r in range(40):
            page = await kv.get_items(
                f"r{r}",
                MatchAll(),
                reverse=False,
                after=None,
                limit_items=10,
                limit_bytes=1 << 20,
                now_ms=now,
            )
            assert [i.value for i in page.items] in ([f"v{2 * r}".encode()], [f"v{2 * r + 1}".encode()])
        writes = kv._writes if kind == "redis" else kv._pool._writes
        assert writes is not None
        assert writes.calls == 80
        assert writes.batches < 40
    finally:
        await kv.aclose()
        if kind == "redis":
            await rd.delete_keys(kv.key_prefix)


def test_sqlite_a_failing_write_is_undone_alone(tmp_path: Path) -> None:
    import sqlite3

    from prism.backends.sqlite import keyvalue_ops as ops
    from prism.backends.sqlite.pool import group

    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    ops.prepare_writer(conn, "FULL")
    purger = ops.Purger()

    def write(id: str, token: str, apply: ops.Apply) -> Callable[[sqlite3.Connection], None]:
        return lambda c: ops.write_once(c, id, Stamp(1, token), 0, apply, purger)

    def put(id: str) -> ops.Apply:
        return lambda c: ops.put(c, id, [ItemWrite(b"k", id.encode())], Stamp(1, ""), 0)

    def half_then_fail(c: sqlite3.Connection) -> None:
        ops.put(c, "bad", [ItemWrite(b"k", b"x")], Stamp(1, ""), 0)
        raise sqlite3.IntegrityError("refused")

    outcomes = group(
        conn, [write("a", "ta", put("a")), write("bad", "tb", half_then_fail), write("c", "", put("c"))]
    )
    assert outcomes[0] == (None, None) and outcomes[2] == (None, None)
    assert isinstance(outcomes[1][1], sqlite3.IntegrityError)
    assert sorted(conn.execute("SELECT id, value FROM items")) == [("a", b"a"), ("c", b"c")]
    # The failed write's token was not recorded either: its retry applies.
    assert [r[0] for r in conn.execute("SELECT id FROM idempotency ORDER BY id")] == ["a"]
    assert not conn.in_transaction


async def test_sqlite_concurrent_reads_share_thread_hops_and_each_gets_its_own(tmp_path: Path) -> None:
    from prism.backends.sqlite.keyvalue import SqliteBackend
    from prism.backends.sqlite.options import SqliteOptions

    kv = SqliteBackend(SqliteOptions(), data_dir=tmp_path, namespace="ns")
    await kv.open()
    kv._pool._inline = None  # every read to a thread, as those too long for the loop's thread go
    try:
        now = int(time.time() * 1000)
        for r in range(10):
            items = [ItemWrite(b"k%d" % j, b"v%d.%d" % (r, j)) for j in range(r % 4)]
            if items:
                await kv.put_items(f"r{r}", items, Stamp(1, ""), now)
        got: dict[int, list[bytes]] = {}

        async def get(i: int) -> None:
            predicate = MatchKeys((b"k1",)) if i % 3 == 0 else MatchAll()
            page = await kv.get_items(
                f"r{i % 10}", predicate, reverse=i % 2 == 1, after=None,
                limit_items=2, limit_bytes=1 << 20, now_ms=now,
            )  # fmt: skip
            got[i] = [item.value for item in page.items]

        failed: list[Exception] = []

        async def bad_read() -> None:  # fails alone, inside some batch
            try:
                await kv._read(lambda conn: conn.execute("SELECT no_such_column FROM items").fetchall())
            except PrismError as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(90):
                nursery.start_soon(get, i)
                if i % 30 == 0:
                    nursery.start_soon(bad_read)
        assert len(failed) == 3 and len(got) == 90
        for i, values in got.items():
            r = i % 10
            want = [b"v%d.%d" % (r, j) for j in range(r % 4)]
            if i % 3 == 0:
                want = [v for v in want if v.endswith(b".1")]
            if i % 2:
                want.reverse()
            assert values == want[:2], (i, values)
        assert kv._pool._reads.calls == 93
        assert kv._pool._reads.batches < 45
    finally:
        await kv.aclose()


async def test_sqlite_timeseries_concurrent_writes_share_transactions(tmp_path: Path) -> None:
    from prism.backends.sqlite.options import SqliteTimeSeriesOptions
    from prism.backends.sqlite.timeseries import SqliteTimeSeriesBackend
    from prism.backends.timeseries import Event

    ts = SqliteTimeSeriesBackend(SqliteTimeSeriesOptions(), data_dir=tmp_path, namespace="ts")
    await ts.open()
    try:
        now = int(time.time() * 1000)

        async def write(i: int) -> None:  # each event twice: the second is skipped
            n = i // 2
            await ts.write_events([Event(f"s{n % 4}", 1000 + n, f"e{n}", b"%d" % n)], now)

        async with trio.open_nursery() as nursery:
            for i in range(80):
                nursery.start_soon(write, i)
        got = []
        for s in range(4):
            page = await ts.read_events(
                f"s{s}",
                None,
                None,
                reverse=False,
                after=None,
                limit_items=100,
                limit_bytes=1 << 20,
                now_ms=now,
            )
            got += [(e.series_id, e.event_id, e.payload) for e in page.events]
        want = {(f"s{i // 2 % 4}", f"e{i // 2}", b"%d" % (i // 2)) for i in range(80)}
        assert sorted(got) == sorted(want) and len(got) == 40
        assert ts._pool._writes.batches < 40
    finally:
        await ts.aclose()
