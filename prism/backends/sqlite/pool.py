"""What every SQLite backend shares: the file's WAL set-up, and the
connection pool that keeps blocking sqlite3 calls off the trio loop.

The threading model is the KeyValue backend's (see ``keyvalue.py``): writes
run in a worker thread under the backend's own CapacityLimiter, on one
writer connection behind a ``trio.Lock``; a few query-only reader
connections in WAL mode beside it. Concurrent reads share a thread hop and
concurrent writes a transaction (``SqlitePool.read`` / ``write``).

Reads run on the event loop's own thread first, on a query-only connection
of their own, as long as they are short: a statement that runs past
``INLINE_STEPS`` steps of SQLite's virtual machine (a progress handler), or
meets a lock (no busy wait there), is interrupted, which changes nothing
for a read, and the read goes to a thread as above. A point read in WAL
mode costs tens of microseconds; the thread hop cost several times that (two
thread wake-ups, the GIL handed over twice, trio's machinery), so
that at one call at a time a SQLite read cost the worker about twice a
memory namespace's (``bench/overload.py``'s open-loop steps, where calls
arrive one by one, paid it on every call). What the loop's thread can
wait on is a page that is not in the OS's cache: the statement's few page
reads from the disk, as any read of a local file would. A
connection is only handed back once its thread is done with it, so
cancellation never shares one between two threads. sqlite3 errors become
the gateway's through the engine's error table (``errors.ERRORS``).

Both the KeyValue (``keyvalue.py``) and TimeSeries backends run on ``SqlitePool``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from prism.backends.coalesce import Coalescer
from prism.backends.keyvalue import ItemPage, RecordPage
from prism.backends.sqlite.errors import ERRORS, DiskFull, FullDiskLog
from prism.backends.sqlite.files import create_private
from prism.errors import Internal, Unavailable
from prism.limits import shed
from prism.tracing.context import child

_T = TypeVar("_T")
READERS = 4  # reader connections; reads beyond this wait for one
BUSY_TIMEOUT_S = 5.0  # other processes (workers of the same tenant) may hold the lock


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls it all back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (e.g. after SQLITE_FULL), and a
    # failing rollback must not hide the error that caused it.
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def prepare_wal(
    conn: sqlite3.Connection, synchronous: str, schema: Sequence[str], version: int, *, app_id: int
) -> None:
    """Switch the file to WAL and create (or check) ``schema`` at ``version``.

    ``app_id`` (PRAGMA application_id) tells the file kinds apart, so that a
    namespace pointed at another abstraction's file fails to open instead of
    reading it wrongly."""
    (mode,) = retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
    if str(mode).lower() != "wal":
        raise Internal("sqlite: cannot enable WAL mode on this file system")
    conn.execute(f"PRAGMA synchronous = {synchronous}")  # FULL or NORMAL, checked
    with transaction(conn):
        (found_app,) = conn.execute("PRAGMA application_id").fetchone()
        (found,) = conn.execute("PRAGMA user_version").fetchone()
        if found_app not in (0, app_id) or (found_app == 0 and found != 0):
            raise Internal("sqlite: database file holds another kind of data")
        if found > version:
            raise Internal("sqlite: database was written by a newer Prism")
        if found < version:
            for statement in schema:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {int(app_id)}")
            conn.execute(f"PRAGMA user_version = {int(version)}")


def retry_locked(step: Callable[[], Any]) -> Any:
    """Switching a new file to WAL takes an exclusive lock, and SQLite answers
    "database is locked" at once (without its busy timeout) when two
    processes do it together, as the workers of one tenant do at start-up."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class SqlitePool:
    """One writer and ``READERS`` reader connections to ``path``, and one
    reader for the event loop's thread (``_read_inline``).

    ``prepare`` runs on the writer once, in a worker thread, at ``open()``."""

    def __init__(
        self, path: Path, prepare: Callable[[sqlite3.Connection], None], namespace: str = ""
    ) -> None:
        self.path = path
        self.full_log = FullDiskLog(namespace or path.stem, path)
        self._prepare = prepare
        self._limiter = trio.CapacityLimiter(READERS + 1)
        self._write_lock = trio.Lock()
        self._read_slots = trio.Semaphore(READERS)
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []
        self._inline: sqlite3.Connection | None = None
        self._closed = False
        # Concurrent calls share a thread hop (reads) or a transaction
        # (writes): the hop and the fsync, not the SQL, were most of a call's
        # cost (bench/backends.py measures GetItems and PutItems through
        # Prism). Reads: two batches at a time (they are CPU, and the GIL runs
        # one thread at once anyway). Writes: one (one writer).
        self._reads: Coalescer[Callable[[sqlite3.Connection], Any], Outcome] = Coalescer(
            self._read_batch, slots=2
        )
        self._writes: Coalescer[Callable[[sqlite3.Connection], Any], Outcome] = Coalescer(
            self._write_batch, slots=1
        )

    async def open(self) -> None:
        """Create the directory, file and schema, and connect. Idempotent."""
        if self._writer is not None or self._closed:
            return
        with ERRORS:
            writer, readers = await trio.to_thread.run_sync(self._connect_all, limiter=self._limiter)
        self._writer, self._readers = writer, readers[1:]
        self._inline = readers[0]
        self._inline.execute("PRAGMA busy_timeout = 0")
        self._inline.set_progress_handler(_over_budget, INLINE_STEPS)

    def _connect_all(self) -> tuple[sqlite3.Connection, list[sqlite3.Connection]]:
        create_private(self.path)
        conns: list[sqlite3.Connection] = []
        try:
            writer = self._connect()
            conns.append(writer)
            self._prepare(writer)
            for _ in range(READERS + 1):
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
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("sqlite backend is closed")
        if self._writer is None:
            raise RuntimeError("open() was not awaited")

    async def read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(reader)``, on its own statements: first on the event loop's
        thread (``_read_inline``); one that does not finish there goes to a
        worker thread, where reads that arrive meanwhile share the thread hop
        (run one after another), up to ``READ_HOP_BYTES`` of pages: the rest
        go again in the next hop."""
        inline = self._inline
        if inline is not None and not self._closed:
            await trio.lowlevel.checkpoint_if_cancelled()
            done, value = self._read_inline(inline, fn)
            if done:
                return value  # type: ignore[no-any-return]
        while True:
            outcome = await self._reads.get(fn)
            if outcome is not _NOT_RUN:
                return _unwrap(outcome)  # type: ignore[no-any-return]

    def _read_inline(
        self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]
    ) -> tuple[bool, Any]:
        """(True, ``fn(conn)``) if it finished within ``INLINE_STEPS`` of
        SQLite's virtual machine and met no lock; (False, None) if not, the
        statement interrupted (reads change nothing, so it can run again)."""
        attributes = {"db.system": "sqlite", "prism.batch_calls": 1, "prism.write": False}
        with child("prism.backend.sqlite", **attributes):
            try:
                return True, fn(conn)
            except sqlite3.OperationalError as exc:
                if str(exc) in _NOT_INLINE:
                    return False, None
                with ERRORS:
                    raise
            except sqlite3.Error:
                with ERRORS:
                    raise

    async def write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(writer)`` in a worker thread, all or nothing, committed on
        return. Writes that arrive meanwhile share its transaction (``group``),
        so ``fn`` must not begin or end one."""
        try:
            return _unwrap(await self._writes.get(fn))  # type: ignore[no-any-return]
        except DiskFull:
            self.full_log.note()
            raise

    async def _read_batch(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[Outcome]:
        self._check_open()
        with child("prism.pool.wait", **{"db.system": "sqlite"}):
            await self._read_slots.acquire()
        try:
            self._check_open()
            conn = self._readers.pop()
            try:
                with ERRORS:
                    return await self._in_thread(run_each, conn, fns)
            finally:
                self._readers.append(conn)
        finally:
            self._read_slots.release()

    async def _write_batch(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[Outcome]:
        self._check_open()
        with child("prism.pool.wait", **{"db.system": "sqlite"}):
            await self._write_lock.acquire()
        try:
            self._check_open()
            conn = self._writer
            assert conn is not None
            with ERRORS:
                return await self._in_thread(group, conn, fns)
        finally:
            self._write_lock.release()

    async def _in_thread(
        self,
        work: Callable[[sqlite3.Connection, Sequence[Callable[[sqlite3.Connection], Any]]], list[Outcome]],
        conn: sqlite3.Connection,
        fns: list[Callable[[sqlite3.Connection], Any]],
    ) -> list[Outcome]:
        """``work(conn, fns)`` in a thread. How long the hop took (the wait for
        a thread included) goes to the overload shedder (prism.limits.shed)."""
        began = time.perf_counter()
        started = [began]

        def run() -> list[Outcome]:
            started[0] = time.perf_counter()
            return work(conn, fns)

        with child(
            "prism.backend.sqlite",
            **{"db.system": "sqlite", "prism.batch_calls": len(fns), "prism.write": work is group},
        ):
            out = await trio.to_thread.run_sync(run, limiter=self._limiter)
        shed.observe(started[0] - began)
        return out


# A read on the loop's thread is interrupted after this many steps of
# SQLite's virtual machine, and goes to a thread: a point read takes a few
# dozen, a page of 100 items about 700; 20,000 took 5.6 ms here (the rows
# read meanwhile built), the most a read too long for the loop wastes.
INLINE_STEPS = 5_000
# What an interrupted read, or one that met a lock (no busy wait on the
# loop's thread), raises: it goes to a thread, where the busy timeout applies.
_NOT_INLINE = frozenset({"interrupted", "database is locked"})


def _over_budget() -> int:
    return 1  # called once INLINE_STEPS have run: stop the statement


Outcome = tuple[Any, Exception | None]  # what a call returned, or what it raised


def _unwrap(outcome: Outcome) -> Any:
    value, failed = outcome
    if failed is not None:
        with ERRORS:
            raise failed
    return value


# What one read hop may return at most (and one page more): a hop of 128
# large pages at once, all alive until their calls are answered, was the
# worker's peak RSS under a burst of large reads (prism.rpc.budget bounds
# what the answers then hold, not what the backend returns at once).
READ_HOP_BYTES = 8 * 1024 * 1024
_NOT_RUN: Outcome = (None, None)  # (identity-compared) left for the next hop


def run_each(conn: sqlite3.Connection, fns: Sequence[Callable[[sqlite3.Connection], Any]]) -> list[Outcome]:
    """Each of ``fns`` on ``conn``, one after another; one that raises does
    not stop the others. Past ``READ_HOP_BYTES`` of pages the rest are not run."""
    out: list[Outcome] = []
    size = 0
    for fn in fns:
        if size > READ_HOP_BYTES:
            out.append(_NOT_RUN)
            continue
        try:
            value = fn(conn)
        except Exception as exc:
            out.append((None, exc))
        else:
            out.append((value, None))
            size += _page_bytes(value)
    return out


def _page_bytes(value: object) -> int:
    if isinstance(value, ItemPage):
        return sum(len(item.key) + len(item.value) for item in value.items)
    if isinstance(value, RecordPage):
        return sum(len(item.key) + len(item.value) for _, items in value.records for item in items)
    return 0


def group(conn: sqlite3.Connection, fns: Sequence[Callable[[sqlite3.Connection], Any]]) -> list[Outcome]:
    """Each of ``fns`` in its own savepoint of one transaction, committed on
    return: one lock and one fsync for all (group commit). One that raises is
    rolled back to its savepoint alone, its error in its place; if SQLite
    drops the whole transaction (disk full, I/O error) every one fails."""
    out: list[Outcome] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for fn in fns:
            conn.execute("SAVEPOINT one_call")
            try:
                out.append((fn(conn), None))
            except Exception as exc:
                if not conn.in_transaction:
                    raise
                conn.execute("ROLLBACK TO one_call")
                out.append((None, exc))
            conn.execute("RELEASE one_call")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return out
