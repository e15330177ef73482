"""KeyValue on Redis, trio-native I/O (``prism.drivers.resp``: no threads, no asyncio).

The data model and the Lua scripts are in ``keyvalue_lua``: every write is
one script run, hence atomic; a read is one script run per record. This
module runs them on a pool of ``resp`` connections, pipelines concurrent
calls together (``_coalescer``), and pages the answers. Driver errors reach
the client through the engine's error table (``errors.ERRORS``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
from prism.backends.redis import keyvalue_lua as lua
from prism.backends.redis import persistence
from prism.backends.redis.errors import ERRORS
from prism.backends.redis.options import RedisOptions
from prism.backends.rules import check_items, check_mutations, is_expired, key_range
from prism.drivers import resp
from prism.errors import Unavailable

log = logging.getLogger("prism.backends.redis")

SCAN_CHUNK = 64  # records read per round trip of a scan
BIG = 1 << 53


class RedisBackend:
    """Options: ``RedisOptions`` (the server, the pool, the key prefix, and
    whether concurrent calls are pipelined together, see ``_coalescer``)."""

    def __init__(self, options: RedisOptions, *, namespace: str) -> None:
        self.key_prefix = options.key_prefix
        self._namespace = namespace
        self._where = f"{options.address().host}:{options.address().port}"
        self._require_persistence = options.require_persistence
        self._base = f"{options.key_prefix}{namespace}:".encode()
        self._ids_key = self._base + b"ids"
        self._pool = resp.Pool(
            options.address(),
            size=options.pool_size,
            connect_timeout_s=options.connect_timeout_s,
            acquire_timeout_s=options.pool_timeout_s,
            ca_file=options.ca_file,
        )
        self._reads: Coalescer[tuple[list[resp.Arg], list[resp.Arg]], resp.Reply] | None = None
        self._writes: Coalescer[tuple[list[resp.Arg], list[resp.Arg]], resp.Reply] | None = None
        if options.coalesce_reads:
            self._reads = self._coalescer(lua.READ, "reads", options.pool_size, options.pool_timeout_s)
            self._writes = self._coalescer(lua.WRITE, "writes", options.pool_size, options.pool_timeout_s)
        self._tombstone_ttl_ms = tombstone_ttl_ms(options.tombstone_ttl_s)
        self._opened = False
        self._closed = False

    def _keys(self, id: str) -> list[resp.Arg]:
        b, i = self._base, id.encode()
        return [
            b + b"z:" + i,
            b + b"h:" + i,
            b + b"m:" + i,
            b + b"t:" + i,
            self._ids_key,
            b + b"x:" + i,
            b + b"r:" + i,
        ]

    async def open(self) -> None:
        """Connect once (so that a wrong URL shows at start-up) and check that
        Redis persists writes: a warning if not, or Unavailable (the
        namespace NOT_SERVING, retried) with ``require_persistence``. Idempotent."""
        if self._opened or self._closed:
            return
        with ERRORS:
            await self._pool.call("PING")
            state, how = await persistence.check(self._pool)
        if state is not persistence.Persistence.ON:
            if self._require_persistence:
                raise Unavailable(f"redis at {self._where} {how}: not served (require_persistence = true)")
            log.warning(
                "namespace %s: redis at %s %s: a restart of Redis would lose every acknowledged write",
                self._namespace,
                self._where,
                how,
            )
        self._opened = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._pool.aclose()

    async def ping(self) -> None:
        """Raise unless Redis answers PING (the namespace's health probe)."""
        self._check_open()
        with ERRORS:
            await self._pool.call("PING")

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("redis backend is closed")
        if not self._opened:
            raise RuntimeError("RedisBackend.open() was not awaited")

    async def _eval_many(
        self, script: resp.Script, calls: Sequence[tuple[Sequence[resp.Arg], Sequence[resp.Arg]]]
    ) -> list[resp.Reply]:
        with ERRORS:
            return await self._pool.eval_many(script, calls)

    def _read_call(
        self,
        id: str,
        predicate: Predicate,
        reverse: bool,
        after: bytes | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> tuple[list[resp.Arg], list[resp.Arg]]:
        keys = self._keys(id)[:2]
        head: list[resp.Arg] = [
            b"1" if reverse else b"0",
            now_ms,
            min(limit_items, BIG),
            min(limit_bytes, BIG),
        ]
        if isinstance(predicate, MatchKeys):
            chosen = sorted(set(predicate.keys), reverse=reverse)
            if after is not None:
                chosen = [k for k in chosen if (k < after if reverse else k > after)]
            return keys, [b"k", *head, *chosen]
        lo, hi = lua.lex_range(predicate, reverse, after)
        return keys, [b"l", *head, lo, hi]

    @staticmethod
    def _items(reply: list[bytes]) -> list[StoredItem]:
        out = []
        for i in range(0, len(reply), 2):
            out.append(lua.unpack(reply[i], reply[i + 1]))
        return out

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
        call = self._read_call(id, predicate, reverse, after, limit_items, limit_bytes, now_ms)
        if self._reads is None:
            (reply,) = await self._eval_many(lua.READ, [call])
        else:
            with ERRORS:
                reply = await self._reads.get(call)
                if isinstance(reply, resp.ReplyError):
                    raise reply
        return page_items(self._items(reply), limit_items, limit_bytes)

    def _coalescer(
        self, script: resp.Script, what: str, pool_size: int, pool_timeout_s: float
    ) -> Coalescer[tuple[list[resp.Arg], list[resp.Arg]], resp.Reply]:
        """Concurrent calls of ``script`` go out together: one pipelined round
        trip per batch, each call still its own atomic script run, and each
        caller gets its own reply (an error, too, stays its own). A write in a
        batch whose leader was cancelled mid-flight may run again when its
        caller retries the batch: with its token that is a replay (no effect),
        without one it is the same stamped write again."""

        async def run(calls: list[tuple[list[resp.Arg], list[resp.Arg]]]) -> list[resp.Reply]:
            return await self._pool.eval_many(script, calls, raise_errors=False)

        return Coalescer(
            run,
            slots=min(2, pool_size),
            wait_timeout_s=pool_timeout_s,
            timeout_error=lambda: resp.PoolTimeout(
                f"redis: {what} waited {pool_timeout_s:g} s behind busy connections"
            ),
        )

    async def scan_items(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> RecordPage:
        return await self._scan(after, limit_items, limit_bytes, now_ms, stamps=False)

    async def count_records(self, now_ms: int) -> int:
        """``Migratable``: the records' id index (an expired record still in it
        counts until it is purged: an estimate)."""
        self._check_open()
        with ERRORS:
            return int(await self._pool.call("ZCARD", self._ids_key))

    async def export_records(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> ExportPage:
        """``Migratable``: as ``scan_items``, each item with its stamp."""
        return export_page(await self._scan(after, limit_items, limit_bytes, now_ms, stamps=True))

    async def _scan(
        self, after: str | None, limit_items: int, limit_bytes: int, now_ms: int, *, stamps: bool
    ) -> RecordPage:
        self._check_open()
        pager = RecordPager(limit_items, limit_bytes)
        cursor = b"-" if after is None else b"(" + after.encode()
        while True:
            with ERRORS:
                ids = await self._pool.call("ZRANGEBYLEX", self._ids_key, cursor, "+", "LIMIT", 0, SCAN_CHUNK)
            if not ids:
                break
            calls = [self._read_call(i.decode(), MatchAll(), False, None, BIG, BIG, now_ms) for i in ids]
            replies = await self._eval_many(lua.READ, calls)
            for raw_id, reply in zip(ids, replies, strict=True):
                items = self._stamped_items(reply) if stamps else self._items(reply)
                if not items:
                    continue
                size = sum(len(it.key) + len(it.value) for it in items)
                page = pager.add_record(raw_id.decode(), items, size)
                if page is not None:
                    return page
            if len(ids) < SCAN_CHUNK:
                break
            cursor = b"(" + ids[-1]
        return pager.last_page()

    @staticmethod
    def _stamped_items(reply: list[bytes]) -> list[StoredItem]:
        return [lua.unpack_stamped(reply[i], reply[i + 1]) for i in range(0, len(reply), 2)]

    async def import_records(self, records: Sequence[tuple[str, Sequence[StampedItem]]], now_ms: int) -> None:
        """``Migratable``: one run of the write script per record and stamp (a
        run has one stamp), pipelined, with no token (window 0). Each run is
        atomic; a failure part-way leaves a part applied, which a second
        import completes (the stamp rule makes applying twice harmless)."""
        self._check_open()
        calls: list[tuple[Sequence[resp.Arg], Sequence[resp.Arg]]] = []
        for id, items in records:
            check_items(items)
            by_stamp: dict[tuple[int, str], list[resp.Arg]] = {}
            for it in items:
                if is_expired(it.expires_at_ms, now_ms):
                    continue
                ops = by_stamp.setdefault((it.stamp_us, it.token), [])
                ops.extend(self._put_args(ItemWrite(it.key, it.value, it.expires_at_ms), it.stamp))
            for (us, token), ops in by_stamp.items():
                args: list[resp.Arg] = [id, now_ms, us, token, 0, self._tombstone_ttl_ms, b"0", *ops]
                calls.append((self._keys(id), args))
        if calls:
            await self._eval_many(lua.WRITE, calls)

    def _put_args(self, item: ItemWrite, stamp: Stamp) -> list[resp.Arg]:
        return [b"p", item.key, lua.pack(item, stamp), item.expires_at_ms]

    @staticmethod
    def _delete_args(predicate: Predicate) -> list[resp.Arg]:
        if isinstance(predicate, MatchAll):
            return [b"d", b"a"]
        if isinstance(predicate, MatchKeys):
            return [b"d", b"k", len(predicate.keys), *predicate.keys]
        lo, hi = lua.lex_range(predicate, False, None)
        start, end = key_range(predicate) or (b"", b"")
        return [b"d", b"r", lo, hi, start, end]

    async def _write(
        self, id: str, stamp: Stamp, now_ms: int, ops: list[resp.Arg], *, deletes: bool = False
    ) -> None:
        self._check_open()
        args: list[resp.Arg] = [
            id,
            now_ms,
            stamp.generation_time_us,
            stamp.token,
            IDEMPOTENCY_WINDOW_MS,
            self._tombstone_ttl_ms,
            b"1" if deletes else b"0",
            *ops,
        ]
        if self._writes is None:
            await self._eval_many(lua.WRITE, [(self._keys(id), args)])
            return
        with ERRORS:
            reply = await self._writes.get((self._keys(id), args))
            if isinstance(reply, resp.ReplyError):
                raise reply

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        check_items(items)
        ops: list[resp.Arg] = []
        for item in items:
            ops.extend(self._put_args(item, stamp))
        await self._write(id, stamp, now_ms, ops)

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        await self._write(id, stamp, now_ms, self._delete_args(predicate), deletes=True)

    async def mutate_items(self, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int) -> None:
        check_mutations(mutations)
        ops: list[resp.Arg] = []
        for m in mutations:
            ops.extend(
                self._put_args(m.item, stamp) if isinstance(m, Put) else self._delete_args(m.predicate)
            )
        await self._write(id, stamp, now_ms, ops, deletes=not all(isinstance(m, Put) for m in mutations))
