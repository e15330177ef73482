"""PostgreSQL from trio: libpq's non-blocking protocol driven by trio's I/O.

Decision. psycopg 3 (3.3) has no trio support: ``AsyncConnection`` is
asyncio-only (under ``trio.run`` its ``connect`` fails with "RuntimeError:
no running event loop": ``psycopg.waiting`` calls
``asyncio.get_running_loop()``, and there is no anyio path).
Running the sync driver in threads costs a thread hop per query. psycopg's
``generators`` module, though, is sans-I/O: ``connect``/``execute``/``cancel``
are generators (C-accelerated in psycopg-binary) that yield what they wait
for, ``(fileno, Wait.R/W)``, and are resumed with ``Ready``. This module
drives them with ``trio.lowlevel.wait_readable/wait_writable``: no thread,
no asyncio, one trio checkpoint per wait. Parameters go out and rows come
back in PostgreSQL's binary format, encoded and decoded here for the few
types the backends use (bytea, int8, text, bool), which skips psycopg's
adaptation layer.

Cost. ``bench/pg_driver_cpu.py`` compares the client CPU per query of a
sync psycopg connection, sync psycopg in ``trio.to_thread`` (with a
CapacityLimiter), and this module (results in
``bench/results/pg_driver_cpu.json``). A thread hop costs far more than the
query itself, while driving libpq from trio adds little over a bare sync
client (one ``wait_readable`` per query: epoll registration and a trip
through trio's scheduler). A primary-key get is as cheap as ``SELECT 1``
because parameters and rows skip psycopg's adapters.

Prepared statements. ``execute(..., prepare=True)`` prepares the statement
on the connection the first time (one extra round trip per connection and
statement) and runs it by name afterwards: the server parses and plans it
once instead of per call, which is most of the cost of a statement with a
subquery (a KeyValue put checks its range tombstones in one). Named
statements live in the server session: behind PgBouncer that takes
session pooling, or version 1.21 or later with ``max_prepared_statements``.

Errors. This module knows nothing of gRPC: it raises ``PgError`` (with the
server's SQLSTATE when the server sent one) and ``PoolTimeout``, and the
PostgreSQL backends map them to the gateway's errors
(``prism.backends.postgres.errors``).

Cancellation. When the trio task is cancelled while a query is in flight, the
query is cancelled on the server (libpq's non-blocking cancel connection,
driven the same way), the connection is drained to idle under a shielded,
bounded scope, and only then is the ``Cancelled`` re-raised. A connection that
cannot be brought back to idle is closed and never reused.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

import trio
from psycopg import errors as pgerrors
from psycopg import generators, pq
from psycopg.pq.abc import PGconn, PGresult
from psycopg.waiting import Ready, Wait

from prism.drivers.pool import BoundedPool
from prism.redact import redact
from prism.tracing.context import child

_T = TypeVar("_T")

CANCEL_TIMEOUT_S = 2.0  # cancel + drain after a trio cancellation, then give up on the connection

Param = bytes | str | int | bool | None | list[bytes] | list[int] | list[str]
Row = tuple[Any, ...]

_INT8 = struct.Struct("!q")
_INT4 = struct.Struct("!i")
_OID_BYTEA, _OID_INT8, _OID_TEXT, _OID_BOOL, _OID_INT4, _OID_VARCHAR = 17, 20, 25, 16, 23, 1043
_OID_BYTEA_ARRAY, _OID_INT8_ARRAY, _OID_TEXT_ARRAY = 1001, 1016, 1009
_ARRAY_HEAD = struct.Struct("!iiiii")  # ndim, has nulls, element oid, length, lower bound


def _array(items: list[bytes] | list[int] | list[str]) -> tuple[bytes, int]:
    """A one-dimensional array in binary format: bytea[] (also when empty), int8[] or text[]."""
    if not items:
        return struct.pack("!iii", 0, 0, _OID_BYTEA), _OID_BYTEA_ARRAY
    parts: list[bytes] = []
    if isinstance(items[0], int):
        parts.append(_ARRAY_HEAD.pack(1, 0, _OID_INT8, len(items), 1))
        for i in items:
            assert isinstance(i, int)
            parts.append(b"\x00\x00\x00\x08" + _INT8.pack(i))
        return b"".join(parts), _OID_INT8_ARRAY
    if isinstance(items[0], str):
        parts.append(_ARRAY_HEAD.pack(1, 0, _OID_TEXT, len(items), 1))
        for t in items:
            assert isinstance(t, str)
            data = t.encode()
            parts.append(_INT4.pack(len(data)))
            parts.append(data)
        return b"".join(parts), _OID_TEXT_ARRAY
    parts.append(_ARRAY_HEAD.pack(1, 0, _OID_BYTEA, len(items), 1))
    for b in items:
        assert isinstance(b, bytes)
        parts.append(_INT4.pack(len(b)))
        parts.append(b)
    return b"".join(parts), _OID_BYTEA_ARRAY


class PgError(Exception):
    """A server error (``sqlstate`` set) or a connection failure (``sqlstate`` None)."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _encode(params: Sequence[Param]) -> tuple[list[bytes | None], list[int], list[int]]:
    values: list[bytes | None] = []
    types: list[int] = []
    for p in params:
        if p is None:
            values.append(None)
            types.append(0)
        elif isinstance(p, bytes):
            values.append(p)
            types.append(_OID_BYTEA)
        elif isinstance(p, str):
            values.append(p.encode())
            types.append(_OID_TEXT)
        elif isinstance(p, bool):
            values.append(b"\x01" if p else b"\x00")
            types.append(_OID_BOOL)
        elif isinstance(p, int):
            values.append(_INT8.pack(p))
            types.append(_OID_INT8)
        else:
            data, oid = _array(p)
            values.append(data)
            types.append(oid)
    return values, types, [1] * len(values)


def _decoder(oid: int) -> Callable[[bytes], Any]:
    if oid == _OID_BYTEA:
        return bytes
    if oid == _OID_INT8:
        return lambda b: _INT8.unpack(b)[0]
    if oid in (_OID_TEXT, _OID_VARCHAR):
        return lambda b: bytes(b).decode()
    if oid == _OID_INT4:
        return lambda b: _INT4.unpack(b)[0]
    if oid == _OID_BOOL:
        return lambda b: b == b"\x01"
    raise PgError(f"postgres: no binary decoder for type oid {oid}")


def _rows(res: PGresult) -> list[Row]:
    ntuples, nfields = res.ntuples, res.nfields
    if not ntuples:
        return []
    decs = [_decoder(res.ftype(i)) for i in range(nfields)]
    out: list[Row] = []
    for r in range(ntuples):
        row = []
        for c in range(nfields):
            v = res.get_value(r, c)
            row.append(None if v is None else decs[c](v))
        out.append(tuple(row))
    return out


def _error(res: PGresult) -> PgError:
    state = res.error_field(pq.DiagnosticField.SQLSTATE)
    msg = res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"error"
    return PgError(msg.decode(errors="replace"), state.decode() if state else None)


async def _wait(fileno: int, wait: int) -> int:
    if wait == Wait.R:
        await trio.lowlevel.wait_readable(fileno)
        return Ready.R
    if wait == Wait.W:
        await trio.lowlevel.wait_writable(fileno)
        return Ready.W
    # Both: libpq has more to send while the server may be sending to us
    # (large statements). Rare; race the two waits.
    ready = 0
    async with trio.open_nursery() as nursery:

        async def on(w: Callable[[int], Any], flag: int) -> None:
            nonlocal ready
            await w(fileno)
            ready |= flag
            nursery.cancel_scope.cancel()

        nursery.start_soon(on, trio.lowlevel.wait_readable, Ready.R)
        nursery.start_soon(on, trio.lowlevel.wait_writable, Ready.W)
    return ready


async def _drive_conn(gen: Generator[tuple[int, int], int, _T]) -> _T:
    """Run a generator that yields ``(fileno, wait)`` (connect, cancel)."""
    try:
        fileno, wait = next(gen)
        while True:
            fileno, wait = gen.send(await _wait(fileno, wait))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _drive(gen: Generator[int, int, _T], fileno: int) -> _T:
    """Run a generator that yields ``wait`` on one socket (execute)."""
    try:
        wait = next(gen)
        while True:
            wait = gen.send(await _wait(fileno, wait))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def connect(conninfo: str, *, timeout_s: float) -> Connection:
    """Open a connection; PgError (no sqlstate) if it fails or takes over ``timeout_s``."""
    with trio.move_on_after(timeout_s) as scope:
        try:
            pgconn = await _drive_conn(generators.connect(conninfo))
        except pgerrors.OperationalError as exc:
            raise PgError(f"postgres: cannot connect: {_one_line(exc)}") from exc
    if scope.cancelled_caught:
        raise PgError(f"postgres: cannot connect within {timeout_s:g} s")
    return Connection(pgconn)


def _one_line(exc: BaseException) -> str:
    """libpq's message, for a client or a log: its lines joined (the first
    says what failed, a hint may follow), with no password (it can quote the
    connection string)."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines()]
    return redact("; ".join(line for line in lines if line)) or type(exc).__name__


class Connection:
    """One libpq connection. Not safe for concurrent use: one task at a time
    (the pool hands it out). ``broken`` once it cannot be trusted any more."""

    def __init__(self, pgconn: PGconn) -> None:
        self.pgconn = pgconn
        self.fileno = pgconn.socket
        self.broken = False
        self._prepared: dict[bytes, bytes] = {}  # statement -> its name in this session
        self._names = 0  # names handed out, prepared or not (a cancelled prepare may have been)

    def close(self) -> None:
        self.broken = True
        self.pgconn.finish()

    @property
    def in_transaction(self) -> bool:
        return self.pgconn.transaction_status != pq.TransactionStatus.IDLE

    async def execute(self, sql: bytes, params: Sequence[Param] = (), *, prepare: bool = False) -> list[Row]:
        """Run one statement (prepared once per connection with ``prepare``);
        its rows (empty for commands). PgError on failure."""
        with child("prism.backend.postgresql", **{"db.system": "postgresql", "db.operation": _verb(sql)}):
            return (await self._run(sql, params, prepare))[0]

    async def execute_count(self, sql: bytes, params: Sequence[Param] = (), *, prepare: bool = False) -> int:
        """Run one command; the number of rows it affected."""
        with child("prism.backend.postgresql", **{"db.system": "postgresql", "db.operation": _verb(sql)}):
            return (await self._run(sql, params, prepare))[1]

    async def _run(self, sql: bytes, params: Sequence[Param], prepare: bool) -> tuple[list[Row], int]:
        if self.broken:
            raise PgError("postgres: connection is closed")
        pgconn = self.pgconn
        if not prepare:
            if params:
                values, types, formats = _encode(params)
                return _outcome(
                    await self._roundtrip(lambda: pgconn.send_query_params(sql, values, types, formats, 1))
                )
            return _outcome(
                await self._roundtrip(lambda: pgconn.send_query_params(sql, None, result_format=1))
            )
        values, types, formats = _encode(params)
        name = self._prepared.get(sql)
        if name is None:
            self._names += 1
            fresh = b"prism_%d" % self._names
            _outcome(await self._roundtrip(lambda: pgconn.send_prepare(fresh, sql, types)))
            name = self._prepared[sql] = fresh
        return _outcome(await self._roundtrip(lambda: pgconn.send_query_prepared(name, values, formats, 1)))

    async def _roundtrip(self, send: Callable[[], None]) -> list[PGresult]:
        """``send`` one request and read its results, or lose the connection."""
        pgconn = self.pgconn
        try:
            send()
            results: list[PGresult] = await _drive(generators.execute(pgconn), self.fileno)
        except pgerrors.OperationalError as exc:
            self.close()
            raise PgError(f"postgres: connection lost: {_one_line(exc)}") from exc
        except BaseException:
            # Cancelled (or a bug) with the statement in flight: stop it on the
            # server and bring the connection back to idle before going on.
            await self._cancel_in_flight()
            raise
        if pgconn.status == pq.ConnStatus.BAD:  # e.g. the server ended the session (57P01)
            self.close()
        for res in results:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                raise _error(res)
        if self.broken:
            raise PgError("postgres: connection lost")
        return results

    async def _cancel_in_flight(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CANCEL_TIMEOUT_S
            try:
                cancel_conn = self.pgconn.cancel_conn()
                cancel_conn.start()
                await _drive_conn(generators.cancel(cancel_conn))
                cancel_conn.finish()
                # Drain: the statement ends with 57014 (or finished meanwhile).
                await _drive(generators.execute(self.pgconn), self.fileno)
                if self.in_transaction:
                    self.pgconn.send_query(b"ROLLBACK")
                    await _drive(generators.execute(self.pgconn), self.fileno)
            except Exception:
                self.close()
        if scope.cancelled_caught or self.pgconn.status == pq.ConnStatus.BAD:
            self.close()

    async def rollback(self) -> None:
        """End a failed or abandoned transaction; closes the connection if that fails."""
        if self.broken or not self.in_transaction:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CANCEL_TIMEOUT_S
            try:
                await self.execute(b"ROLLBACK")
            except PgError:
                self.close()
        if scope.cancelled_caught:
            self.close()


def _outcome(results: list[PGresult]) -> tuple[list[Row], int]:
    """The rows and the count of rows affected, from a statement's results."""
    rows: list[Row] = []
    count = 0
    for res in results:
        status = res.status
        if status == pq.ExecStatus.TUPLES_OK:
            rows = _rows(res)
            count = res.ntuples
        elif status == pq.ExecStatus.COMMAND_OK:
            tuples = res.command_tuples
            count = tuples if tuples is not None else 0
    return rows, count


class PoolTimeout(PgError):
    """Every connection stayed busy for longer than the pool's acquire timeout."""


class Pool(BoundedPool[Connection]):
    """At most ``size`` connections (``prism.drivers.pool``); PoolTimeout when
    all stay busy past ``acquire_timeout_s``. A connection goes back only
    when it is idle (not broken, no transaction open)."""

    def __init__(
        self, conninfo: str, *, size: int, connect_timeout_s: float, acquire_timeout_s: float
    ) -> None:
        super().__init__(size=size, connect_timeout_s=connect_timeout_s, acquire_timeout_s=acquire_timeout_s)
        self.conninfo = conninfo

    async def _open(self) -> Connection:
        return await connect(self.conninfo, timeout_s=self.connect_timeout_s)

    def _busy_error(self) -> Exception:
        return PoolTimeout(f"postgres: all {self.size} connections busy for {self.acquire_timeout_s:g} s")

    def _closed_error(self) -> Exception:
        return PgError("postgres: connection pool is closed")

    async def release(self, conn: Connection) -> None:
        try:
            if not conn.broken and conn.in_transaction:
                await conn.rollback()
        finally:
            self.put_back(conn)

    async def execute(self, sql: bytes, params: Sequence[Param] = (), *, prepare: bool = False) -> list[Row]:
        """One statement on a pooled connection (acquire, run, give back)."""
        conn = await self.acquire()
        try:
            return await conn.execute(sql, params, prepare=prepare)
        finally:
            await self.release(conn)

    async def create_schema(self, lock_key: int, statements: Sequence[bytes]) -> None:
        """Run ``statements`` (CREATE ... IF NOT EXISTS) in one transaction.
        Workers of one tenant open together, and CREATE ... IF NOT EXISTS alone
        can still collide on the catalog, so the advisory lock ``lock_key``
        serialises them."""
        conn = await self.acquire()
        try:
            await conn.execute(b"BEGIN")
            await conn.execute(b"SELECT 1 FROM pg_advisory_xact_lock($1::int8)", [lock_key])
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(b"COMMIT")
        finally:
            await self.release(conn)


def _verb(sql: bytes) -> str:
    """A statement's first word (SELECT, INSERT, BEGIN...): a span's ``db.operation``."""
    return sql.lstrip().split(None, 1)[0].decode("ascii", "replace").upper() if sql.strip() else ""
