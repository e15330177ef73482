"""KeyValue on a local SQLite file: the durable default backend.

Threading model. sqlite3 calls block, so every one runs in a worker thread
(``trio.to_thread.run_sync``) under this backend's own CapacityLimiter: a
slow disk in one namespace cannot use up the threads of another. There is
one writer connection, and a ``trio.Lock`` lets one write at a time reach it
(SQLite takes one writer anyway; queueing in trio is cheaper than spinning on
SQLITE_BUSY). Reads take one of a few reader connections from a pool; in
WAL mode they run beside the writer and each other, each statement on its
own snapshot. Thread hops are never abandoned on cancellation: a connection
is only ever handed back once its thread is done with it.

The semantics live in SQL: the stamp rule is the WHERE of an upsert and of
the delete, each write is one transaction (idempotency check, changes,
token) committed before the call returns, and reads filter expired items.
Expired items and old tokens are purged in small batches inside a write's
transaction, at most once a minute of caller time.

``SqliteBackend(...)`` only checks options; ``await open()`` creates the
file and schema and must come before any other call.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import trio

from prism.backends import sqlite_ops as ops
from prism.backends.base import (
    ItemPage,
    ItemWrite,
    Mutation,
    Predicate,
    RecordPage,
    Stamp,
)
from prism.backends.common import check_items, check_mutations
from prism.errors import ConfigError, Internal, Unavailable

_T = TypeVar("_T")

READERS = 4  # reader connections; reads beyond this wait for one
BUSY_TIMEOUT_S = 5.0  # other processes (workers of the same tenant) may hold the lock
_SYNCHRONOUS = ("FULL", "NORMAL")

# Primary result codes -> what the client is told. Messages stay short and
# carry no paths; the driver's exception is chained for the log.
_UNAVAILABLE = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_MESSAGES = {
    sqlite3.SQLITE_IOERR: "sqlite: disk I/O error",
    sqlite3.SQLITE_CORRUPT: "sqlite: database file is corrupt",
    sqlite3.SQLITE_NOTADB: "sqlite: file is not a database",
    sqlite3.SQLITE_FULL: "sqlite: disk is full",
    sqlite3.SQLITE_CANTOPEN: "sqlite: cannot open database file",
    sqlite3.SQLITE_READONLY: "sqlite: database is read-only",
    sqlite3.SQLITE_CONSTRAINT: "sqlite: constraint failed",
}


def translate(exc: sqlite3.Error) -> Exception:
    """The PrismError a driver error becomes. Misuse of the driver
    (ProgrammingError, InterfaceError) is our bug and is returned unchanged."""
    if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in _UNAVAILABLE:
        return Unavailable("sqlite: database is locked")
    return Internal(_MESSAGES.get(primary or -1, "sqlite: database error"))


@contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        mapped = translate(exc)
        if mapped is exc:
            raise
        raise mapped from exc


class SqliteBackend:
    """One SQLite file per namespace. Options: ``path`` (absolute, or relative
    to ``data_dir``; default ``<data_dir>/<namespace>.sqlite3``) and
    ``synchronous`` ("FULL", the default, or "NORMAL": WAL commits survive a
    process kill either way, only FULL also survives power loss)."""

    def __init__(self, options: Mapping[str, object], *, data_dir: Path, namespace: str) -> None:
        opts = dict(options)
        path = opts.pop("path", f"{namespace}.sqlite3")
        synchronous = opts.pop("synchronous", "FULL")
        if opts:
            raise ConfigError(f"sqlite backend: unknown option {next(iter(opts))!r}")
        if not isinstance(path, (str, Path)) or not str(path):
            raise ConfigError("sqlite backend: option 'path' must be a non-empty string")
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
            raise ConfigError("sqlite backend: option 'synchronous' must be 'FULL' or 'NORMAL'")
        self.path = Path(data_dir) / path
        self.synchronous = synchronous.upper()
        self._limiter = trio.CapacityLimiter(READERS + 1)
        self._write_lock = trio.Lock()
        self._read_slots = trio.Semaphore(READERS)
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self._purger = ops.Purger()
        self._closed = False

    async def open(self) -> None:
        """Create the directory, file and schema, and connect. Idempotent."""
        if self._writer is not None or self._closed:
            return
        with _mapped_errors():
            writer, readers = await trio.to_thread.run_sync(self._connect_all, limiter=self._limiter)
        self._writer, self._readers = writer, readers

    def _connect_all(self) -> tuple[sqlite3.Connection, list[sqlite3.Connection]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conns: list[sqlite3.Connection] = []
        try:
            writer = self._connect()
            conns.append(writer)
            ops.prepare_writer(writer, self.synchronous)
            for _ in range(READERS):
                conns.append(self._connect())
                conns[-1].execute("PRAGMA query_only = ON")
        except BaseException:
            for conn in conns:
                conn.close()
            raise
        return writer, conns[1:]

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        # check_same_thread=False: a connection moves between pool threads,
        # but the lock (writer) or the pool (readers) gives it one user at a time.
        return sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )

    async def aclose(self) -> None:
        """Wait for calls in flight, then close every connection."""
        if self._closed:
            return
        self._closed = True
        async with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        for _ in range(READERS):  # every slot back means no read is running
            await self._read_slots.acquire()
        for conn in self._readers:
            conn.close()
        self._readers = []

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("sqlite backend is closed")
        if self._writer is None:
            raise RuntimeError("SqliteBackend.open() was not awaited")

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        self._check_open()
        async with self._read_slots:
            self._check_open()
            conn = self._readers.pop()
            try:
                with _mapped_errors():
                    return await trio.to_thread.run_sync(fn, conn, limiter=self._limiter)
            finally:
                self._readers.append(conn)

    async def _write(self, id: str, stamp: Stamp, now_ms: int, apply: ops.Apply) -> None:
        self._check_open()
        async with self._write_lock:
            self._check_open()
            conn = self._writer
            assert conn is not None
            with _mapped_errors():
                await trio.to_thread.run_sync(
                    ops.write, conn, id, stamp, now_ms, apply, self._purger, limiter=self._limiter
                )

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
        def apply(conn: sqlite3.Connection) -> None:
            ops.delete(conn, id, predicate, stamp)

        await self._write(id, stamp, now_ms, apply)

    async def mutate_items(self, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int) -> None:
        check_mutations(mutations)

        def apply(conn: sqlite3.Connection) -> None:
            ops.mutate(conn, id, mutations, stamp, now_ms)

        await self._write(id, stamp, now_ms, apply)
