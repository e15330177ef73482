"""KeyValue on PostgreSQL: one table pair per namespace, trio-native I/O.

Connections come from ``prism.drivers.pg`` (psycopg's libpq generators
driven by trio, no threads; see its docstring for why). A small pool bounds
them; when every connection stays busy past ``pool_timeout_s`` a call fails
with RESOURCE_EXHAUSTED rather than queueing without bound, and a server
that cannot be reached fails calls with UNAVAILABLE within
``connect_timeout_s``. A call cancelled by trio (deadline, client gone)
cancels its statement on the server.

The semantics live in SQL (``keyvalue_sql``): the stamp rule is the WHERE of
the upsert and of the delete, and tombstones are rows it keeps; a write with
a token claims the token with an upsert in the same transaction as its
changes (a replay finds the claim and rolls back), and a put with a token
(or several records' puts, ``put_batch``) does both in one statement (the
claim a data-modifying CTE the upsert's rows depend on: one round trip
instead of four); reads filter expired items; expired items and old tokens are
purged (and tombstones past their time) in small batches inside a write's
transaction at most once a minute of caller time. A write that is a single statement without a token runs
without BEGIN/COMMIT: one statement is atomic on its own. Write statements
are prepared once per connection (``prism.drivers.pg``): a put's check of
range tombstones (a subquery) would otherwise cost more to plan, per call,
than the rest of the put.

Tables ``prism_kv_<namespace>``, ``prism_kv_<namespace>_idem`` and
``prism_kv_<namespace>_tomb`` are created by ``open()`` if missing and never
dropped. Driver errors reach the client
through the engine's error table (``errors.ERRORS``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from prism.backends.coalesce import Coalescer
from prism.backends.keyvalue import (
    IDEMPOTENCY_WINDOW_MS,
    ExportPage,
    ItemPage,
    ItemWrite,
    MatchAll,
    MatchKeys,
    Mutation,
    Predicate,
    Put,
    RecordPage,
    Stamp,
    StampedItem,
    StoredItem,
    export_page,
)
from prism.backends.options import tombstone_ttl_ms
from prism.backends.paging import RecordPager, page_items
from prism.backends.postgres import keyvalue_sql as sql
from prism.backends.postgres.errors import ERRORS
from prism.backends.postgres.options import PostgresKeyValueOptions, PostgresOptions, conninfo
from prism.backends.rules import check_items, check_mutations, is_expired, key_range
from prism.drivers import pg as pgio
from prism.errors import Unavailable
from prism.limits import shed

K = TypeVar("K")
V = TypeVar("V")
# One coalesced put: (id, items, stamp, now_ms).
_Put = tuple[str, Sequence[ItemWrite], Stamp, int]

PURGE_INTERVAL_MS = 60_000
PURGE_BATCH = 1000
SCAN_CHUNK_MAX = 1000  # rows per round trip of a scan

Statement = tuple[bytes, list[pgio.Param]]


def pool_from_options(options: PostgresOptions) -> pgio.Pool:
    """The connection pool every PostgreSQL backend builds from its options."""
    pool = pgio.Pool(
        conninfo(options.dsn),
        size=options.pool_size,
        connect_timeout_s=options.connect_timeout_s,
        acquire_timeout_s=options.pool_timeout_s,
    )
    pool.on_wait = shed.observe  # a wait for a busy connection is queueing (prism.limits.shed)
    return pool


class PostgresBackend:
    """Options: ``PostgresKeyValueOptions`` (the connection, and whether
    concurrent whole-record reads share one statement, see
    ``prism.backends.coalesce``, and concurrent PutItems without an
    idempotency token share one statement, see ``_put_many``)."""

    def __init__(self, options: PostgresKeyValueOptions, *, namespace: str) -> None:
        self._pool = pool_from_options(options)
        self._coalesce = options.coalesce_reads
        self._writes: Coalescer[_Put, None] | None = None
        if options.coalesce_writes:
            self._writes = self._coalescer(self._put_many, "writes")
        # One coalescer per statement shape: (reverse, rows per record).
        self._readers: dict[tuple[bool, int], Coalescer[tuple[str, int], list[StoredItem]]] = {}
        stem = sql.table_stem(namespace)
        self.items_table = f"prism_kv_{stem}"
        self.tokens_table = f"prism_kv_{stem}_idem"
        self.tombstones_table = f"prism_kv_{stem}_tomb"
        self._sql = sql.Statements(self.items_table, self.tokens_table, self.tombstones_table)
        self._tombstone_ttl_ms = tombstone_ttl_ms(options.tombstone_ttl_s)
        self._purge_next_ms = 0
        self._opened = False
        self._closed = False

    async def open(self) -> None:
        """Connect and create the tables if missing. Idempotent."""
        if self._opened or self._closed:
            return
        with ERRORS:
            await self._pool.create_schema(sql.lock_key(self.items_table), self._sql.schema)
        self._opened = True

    async def aclose(self) -> None:
        """Wait for calls in flight, then close every connection."""
        if self._closed:
            return
        self._closed = True
        await self._pool.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("postgres backend is closed")
        if not self._opened:
            raise RuntimeError("PostgresBackend.open() was not awaited")

    async def get_items(
        self,
        id: str,
        predicate: Predicate,
        *,
        reverse: bool,
        after: bytes | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> ItemPage:
        self._check_open()
        if self._coalesce and after is None and isinstance(predicate, MatchAll):
            with ERRORS:
                fetched = await self._reader(reverse, limit_items + 1).get((id, now_ms))
            items = [i for i in fetched if not i.expires_at_ms or i.expires_at_ms > now_ms]
            # Rows another caller's clock let through but ours filtered: when
            # the record filled its row limit, the page's end is unknown; ask alone.
            if len(items) == len(fetched) or len(fetched) <= limit_items:
                return page_items(items, limit_items, limit_bytes)
        statement = self._sql.get(predicate, reverse=reverse, after=after is not None)
        params: list[pgio.Param] = [id, now_ms, limit_items + 1]
        if after is not None:
            params.append(after)
        params.extend(sql.predicate_params(predicate))
        with ERRORS:
            rows = await self._pool.execute(statement, params)
        return page_items((StoredItem(*row) for row in rows), limit_items, limit_bytes)

    def _reader(self, reverse: bool, limit: int) -> Coalescer[tuple[str, int], list[StoredItem]]:
        reader = self._readers.get((reverse, limit))
        if reader is None:
            if len(self._readers) >= 64:  # many page sizes in use: keep it bounded
                self._readers.clear()
            reader = self._readers[(reverse, limit)] = self._coalescer(
                lambda keys: self._get_many(keys, reverse, limit), "reads"
            )
        return reader

    def _coalescer(self, fetch: Callable[[list[K]], Awaitable[Sequence[V]]], what: str) -> Coalescer[K, V]:
        pool = self._pool
        return Coalescer(
            fetch,
            slots=min(2, pool.size),
            wait_timeout_s=pool.acquire_timeout_s,
            timeout_error=lambda: pgio.PoolTimeout(
                f"postgres: {what} waited {pool.acquire_timeout_s:g} s behind busy connections"
            ),
        )

    async def _get_many(
        self, keys: list[tuple[str, int]], reverse: bool, limit: int
    ) -> list[list[StoredItem]]:
        # Expiry is filtered by the earliest caller's clock in SQL (a
        # superset for the others) and by each caller's own in get_items.
        ids = [id for id, _ in keys]
        now_ms = min(now for _, now in keys)
        rows = await self._pool.execute(self._sql.get_many(reverse=reverse), [ids, now_ms, limit])
        out: list[list[StoredItem]] = [[] for _ in ids]
        for n, key, value, expires_at_ms in rows:
            out[n - 1].append(StoredItem(key, value, expires_at_ms))
        return out

    async def ping(self) -> None:
        """Raise unless the server answers a trivial query (health checks)."""
        self._check_open()
        with ERRORS:
            await self._pool.execute(b"SELECT 1")

    async def scan_items(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> RecordPage:
        """Rows come in chunks, all from one REPEATABLE READ snapshot, and are
        read only as far as the first record that does not fit."""
        return await self._scan(after, limit_items, limit_bytes, now_ms, stamps=False)

    async def export_records(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> ExportPage:
        """``Migratable``: as ``scan_items``, each item with its stamp."""
        return export_page(await self._scan(after, limit_items, limit_bytes, now_ms, stamps=True))

    async def _scan(
        self, after: str | None, limit_items: int, limit_bytes: int, now_ms: int, *, stamps: bool
    ) -> RecordPage:
        self._check_open()
        chunk = max(64, min(limit_items + 1, SCAN_CHUNK_MAX))
        pager = RecordPager(limit_items, limit_bytes)
        with ERRORS:
            conn = await self._pool.acquire()
            try:
                await conn.execute(b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                rows = await self._scan_chunk(conn, now_ms, chunk, after, None, stamps)
                while rows:
                    for row in rows:
                        item = StampedItem(*row[1:]) if stamps else StoredItem(*row[1:])
                        page = pager.add_row(row[0], item)
                        if page is not None:
                            await conn.execute(b"COMMIT")
                            return page
                    if len(rows) < chunk:
                        break
                    last = rows[-1]
                    rows = await self._scan_chunk(conn, now_ms, chunk, last[0], last[1], stamps)
                await conn.execute(b"COMMIT")
            finally:
                await self._pool.release(conn)
        return pager.last_page()

    async def _scan_chunk(
        self,
        conn: pgio.Connection,
        now_ms: int,
        chunk: int,
        after_id: str | None,
        after_key: bytes | None,
        stamps: bool,
    ) -> list[pgio.Row]:
        params: list[pgio.Param] = [now_ms, chunk]
        if after_id is not None:
            params.append(after_id)
        if after_key is not None:
            params.append(after_key)
        statement = self._sql.scan(
            after_row=after_key is not None, after_id=after_id is not None, stamps=stamps
        )
        return await conn.execute(statement, params)

    async def count_records(self, now_ms: int) -> int:
        """``Migratable``: one statement."""
        self._check_open()
        with ERRORS:
            conn = await self._pool.acquire()
            try:
                rows = await conn.execute(self._sql.count(), [now_ms])
            finally:
                await self._pool.release(conn)
        return int(rows[0][0])

    async def import_records(self, records: Sequence[tuple[str, Sequence[StampedItem]]], now_ms: int) -> None:
        """``Migratable``: one statement (the coalesced puts' upsert, which takes
        a stamp per row), so all of it or none; no token."""
        self._check_open()
        rows: dict[tuple[str, bytes], StampedItem] = {}
        for id, items in records:
            check_items(items)
            for it in items:
                held = rows.get((id, it.key))
                if not is_expired(it.expires_at_ms, now_ms) and (
                    held is None or (held.stamp_us, held.token) <= (it.stamp_us, it.token)
                ):
                    rows[(id, it.key)] = it  # ON CONFLICT cannot touch a row twice
        if not rows:
            return
        params: list[pgio.Param] = [
            [id for id, _ in rows],
            [key for _, key in rows],
            [it.value for it in rows.values()],
            [it.expires_at_ms for it in rows.values()],
            [it.stamp_us for it in rows.values()],
            [it.token for it in rows.values()],
            now_ms,
        ]
        with ERRORS:
            await self._pool.execute(self._sql.upsert_many, params, prepare=True)

    def _upsert(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> Statement:
        # One row per key (the last write of a key wins, as it would one by
        # one: its stamp equals the earlier one's): ON CONFLICT cannot touch
        # a row twice in one statement.
        last = {item.key: item for item in items}
        keys = list(last)
        return self._sql.upsert, [
            id,
            keys,
            [last[k].value for k in keys],
            [last[k].expires_at_ms for k in keys],
            stamp.generation_time_us,
            stamp.token,
            now_ms,
        ]

    def _delete(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> Statement:
        forget_at = now_ms + self._tombstone_ttl_ms
        params: list[pgio.Param] = [id, stamp.generation_time_us, stamp.token]
        if isinstance(predicate, MatchKeys):
            params += [list(set(predicate.keys)), -forget_at, now_ms]
            return self._sql.tombstone_keys, params
        start, end = key_range(predicate) or (b"", b"")
        params += [start, end, forget_at, now_ms]
        return self._sql.delete_range(predicate), params

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        check_items(items)
        if self._writes is not None and items and not stamp.token and now_ms < self._purge_next_ms:
            self._check_open()
            with ERRORS:
                await self._writes.get((id, items, stamp, now_ms))
            return
        if items and stamp.token and now_ms < self._purge_next_ms:
            await self._put_claimed([(id, items, stamp)], now_ms)  # one statement, not a transaction
            return
        await self._write(id, stamp, now_ms, [self._upsert(id, items, stamp, now_ms)] if items else [])

    async def put_batch(self, puts: Sequence[tuple[str, Sequence[ItemWrite], Stamp]], now_ms: int) -> None:
        """``BatchWritable``: in one statement, all or none (when the minute's
        purge is due, the first goes alone, carrying it, then the rest)."""
        for _, items, _ in puts:
            check_items(items)
        if puts and now_ms >= self._purge_next_ms:
            await self.put_items(*puts[0], now_ms)
            puts = puts[1:]
        if puts:
            await self._put_claimed(puts, now_ms)

    async def _put_claimed(self, puts: Sequence[tuple[str, Sequence[ItemWrite], Stamp]], now_ms: int) -> None:
        self._check_open()
        if len({id for id, _, _ in puts}) != len(puts):
            raise ValueError("put_batch: one put per record")
        rows: list[tuple[str, ItemWrite, Stamp]] = []
        claims: list[tuple[str, str]] = []
        for id, items, stamp in sorted(puts, key=lambda p: p[0]):  # rows locked in id order
            rows += [(id, item, stamp) for item in {item.key: item for item in items}.values()]
            if stamp.token:
                claims.append((id, stamp.token))
        params: list[pgio.Param] = [
            [id for id, _, _ in rows],
            [item.key for _, item, _ in rows],
            [item.value for _, item, _ in rows],
            [item.expires_at_ms for _, item, _ in rows],
            [stamp.generation_time_us for _, _, stamp in rows],
            [stamp.token for _, _, stamp in rows],
            now_ms,
            [id for id, _ in claims],
            [token for _, token in claims],
            now_ms - IDEMPOTENCY_WINDOW_MS,
        ]
        with ERRORS:
            await self._pool.execute(self._sql.upsert_claimed, params, prepare=True)

    async def _put_many(self, puts: list[_Put]) -> list[None]:
        # Concurrent puts without a token, as one autocommit statement: the
        # same rows end up stored as if each put ran alone, in any order.
        # Per (id, key) only the put that would win goes in (ON CONFLICT
        # cannot touch a row twice): the greatest stamp, the later one of
        # equal stamps (as the upsert's WHERE lets a later equal stamp win).
        # Expiry is judged at the latest caller's clock: the statement runs
        # after every caller's now. All the puts commit together or fail
        # together (each put is still all or nothing, as alone).
        rows: dict[tuple[str, bytes], tuple[ItemWrite, Stamp]] = {}
        for id, items, stamp, _ in puts:
            for item in items:
                held = rows.get((id, item.key))
                if held is None or (held[1].generation_time_us, held[1].token) <= (
                    stamp.generation_time_us,
                    stamp.token,
                ):
                    rows[(id, item.key)] = (item, stamp)
        params: list[pgio.Param] = [
            [id for id, _ in rows],
            [key for _, key in rows],
            [item.value for item, _ in rows.values()],
            [item.expires_at_ms for item, _ in rows.values()],
            [stamp.generation_time_us for _, stamp in rows.values()],
            [stamp.token for _, stamp in rows.values()],
            max(now for *_, now in puts),
        ]
        await self._pool.execute(self._sql.upsert_many, params, prepare=True)
        return [None] * len(puts)

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        await self._write(id, stamp, now_ms, [self._delete(id, predicate, stamp, now_ms)])

    async def mutate_items(self, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int) -> None:
        check_mutations(mutations)
        statements = [
            self._upsert(id, (m.item,), stamp, now_ms)
            if isinstance(m, Put)
            else self._delete(id, m.predicate, stamp, now_ms)
            for m in mutations
        ]
        await self._write(id, stamp, now_ms, statements)

    async def _write(self, id: str, stamp: Stamp, now_ms: int, statements: list[Statement]) -> None:
        self._check_open()
        token = stamp.token
        purge = now_ms >= self._purge_next_ms
        if not token and not purge and len(statements) <= 1:
            if statements:
                with ERRORS:
                    await self._pool.execute(*statements[0], prepare=True)
            return
        with ERRORS:
            conn = await self._pool.acquire()
            try:
                await conn.execute(b"BEGIN")
                if token:
                    claimed = await conn.execute(
                        self._sql.claim_token, [id, token, now_ms, now_ms - IDEMPOTENCY_WINDOW_MS]
                    )
                    if not claimed:  # a replay: nothing to do
                        await conn.execute(b"ROLLBACK")
                        return
                for statement in statements:
                    await conn.execute(*statement, prepare=True)
                full = False
                if purge:
                    counts = [
                        await conn.execute_count(purge_sql, [now_ms, PURGE_BATCH])
                        for purge_sql in self._sql.purges_at_now
                    ]
                    horizon = now_ms - IDEMPOTENCY_WINDOW_MS
                    counts.append(await conn.execute_count(self._sql.purge_tokens, [horizon, PURGE_BATCH]))
                    full = max(counts) >= PURGE_BATCH
                await conn.execute(b"COMMIT")
                if purge:
                    self._purge_next_ms = now_ms if full else now_ms + PURGE_INTERVAL_MS
            finally:
                await self._pool.release(conn)  # rolls back whatever is left open
