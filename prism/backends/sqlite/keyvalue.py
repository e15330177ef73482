"""KeyValue on a local SQLite file: the durable default backend.

Threading model (``pool.SqlitePool``, shared with TimeSeries).
sqlite3 calls block, so writes, and reads that are not short, run in a
worker thread (``trio.to_thread.run_sync``) under this backend's own
CapacityLimiter: a slow disk in one namespace cannot use up the threads of
another. A short read (within a budget of SQLite's steps, meeting no lock)
runs on the event loop's thread, where it costs less than the hop. There is
one writer connection, and a ``trio.Lock`` lets one write at a time reach it
(SQLite takes one writer anyway; queueing in trio is cheaper than spinning on
SQLITE_BUSY). Reads take one of a few reader connections from a pool; in
WAL mode they run beside the writer and each other, each statement on its
own snapshot. Thread hops are never abandoned on cancellation: a connection
is only ever handed back once its thread is done with it. Concurrent reads
share a thread hop (each runs its own statements, as alone), and concurrent
writes share a transaction (``SqlitePool``): the hop and the fsync, not the
SQL, were most of a call's cost.

The semantics live in SQL: the stamp rule is the WHERE of an upsert and of
the delete (tombstones are rows: see ``keyvalue_ops``), each write
(idempotency check, changes, token) is all or nothing and committed before
the call returns, and reads filter expired items. Concurrent writes share
one transaction, each in its own savepoint (``SqlitePool.write``): one
fsync per batch, not per write. Expired items, old tokens and tombstones
are purged in small batches inside a write's transaction, at most once a
minute of caller time.

``SqliteBackend(...)`` touches no file; ``await open()`` creates the
file and schema and must come before any other call.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from prism.backends.keyvalue import (
    ExportPage,
    ItemPage,
    ItemWrite,
    Mutation,
    Predicate,
    RecordPage,
    Stamp,
    StampedItem,
)
from prism.backends.options import tombstone_ttl_ms
from prism.backends.rules import check_items, check_mutations
from prism.backends.sqlite import keyvalue_ops as ops
from prism.backends.sqlite.options import SqliteOptions
from prism.backends.sqlite.pool import SqlitePool

_T = TypeVar("_T")


class SqliteBackend:
    """One SQLite file per namespace. Options: ``SqliteOptions`` (the file's
    ``path`` and ``synchronous``, and ``tombstone_ttl_s``)."""

    def __init__(self, options: SqliteOptions, *, data_dir: Path, namespace: str) -> None:
        self.path = options.file(data_dir, namespace)
        self.synchronous = synchronous = options.synchronous
        self._pool = SqlitePool(self.path, lambda conn: ops.prepare_writer(conn, synchronous), namespace)
        self._purger = ops.Purger()
        self._tombstone_ttl_ms = tombstone_ttl_ms(options.tombstone_ttl_s)

    async def open(self) -> None:
        """Create the directory, file and schema, and connect. Idempotent."""
        await self._pool.open()

    async def aclose(self) -> None:
        """Wait for calls in flight, then close every connection."""
        await self._pool.aclose()

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._pool.read(fn)

    async def _write(self, id: str, stamp: Stamp, now_ms: int, apply: ops.Apply) -> None:
        def run(conn: sqlite3.Connection) -> None:
            ops.write_once(conn, id, stamp, now_ms, apply, self._purger)

        await self._pool.write(run)

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
        def run(conn: sqlite3.Connection) -> ItemPage:
            return ops.get_items(conn, id, predicate, reverse, after, limit_items, limit_bytes, now_ms)

        return await self._read(run)

    async def scan_items(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> RecordPage:
        def run(conn: sqlite3.Connection) -> RecordPage:
            return ops.scan_items(conn, after, limit_items, limit_bytes, now_ms)

        return await self._read(run)

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        check_items(items)

        def apply(conn: sqlite3.Connection) -> None:
            ops.put(conn, id, items, stamp, now_ms)

        await self._write(id, stamp, now_ms, apply)

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        forget_at = now_ms + self._tombstone_ttl_ms

        def apply(conn: sqlite3.Connection) -> None:
            ops.delete(conn, id, predicate, stamp, now_ms, forget_at)

        await self._write(id, stamp, now_ms, apply)

    async def mutate_items(self, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int) -> None:
        check_mutations(mutations)
        forget_at = now_ms + self._tombstone_ttl_ms

        def apply(conn: sqlite3.Connection) -> None:
            ops.mutate(conn, id, mutations, stamp, now_ms, forget_at)

        await self._write(id, stamp, now_ms, apply)

    async def export_records(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> ExportPage:
        """``Migratable``: one statement, so the page comes from one snapshot."""

        def run(conn: sqlite3.Connection) -> ExportPage:
            return ops.export_records(conn, after, limit_items, limit_bytes, now_ms)

        return await self._read(run)

    async def count_records(self, now_ms: int) -> int:
        """``Migratable``: one statement on a reader."""

        def run(conn: sqlite3.Connection) -> int:
            return ops.count_records(conn, now_ms)

        return await self._read(run)

    async def import_records(self, records: Sequence[tuple[str, Sequence[StampedItem]]], now_ms: int) -> None:
        """``Migratable``: in one savepoint of the writer's transaction."""
        for _, items in records:
            check_items(items)

        def run(conn: sqlite3.Connection) -> None:
            ops.import_records(conn, records, now_ms)
            self._purger.maybe_purge(conn, now_ms)

        await self._pool.write(run)
