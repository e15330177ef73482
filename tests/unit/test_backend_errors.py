"""Driver errors as the client sees them: ``map_exceptions`` and each engine's table.

A client sees a ``PrismError`` as its ``grpc_status`` and ``str()`` (the
dispatcher's ``failure_status`` sends exactly those), so each case checks
both. No service is contacted: driver exceptions are built by hand, and
SQLite's come from real sqlite3 calls on local files.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from prism.backends.errors import map_exceptions
from prism.backends.nats.errors import ERRORS as NATS_ERRORS
from prism.backends.nats.errors import JetStreamError
from prism.backends.postgres.errors import ERRORS as PG_ERRORS
from prism.backends.redis.errors import ERRORS as REDIS_ERRORS
from prism.backends.sqlite.errors import ERRORS as SQLITE_ERRORS
from prism.drivers import nats as natsio
from prism.drivers import pg, resp
from prism.errors import NotFound, PrismError, ResourceExhausted, StatusCode, Unavailable


def seen_by_client(table: map_exceptions, exc: BaseException) -> tuple[StatusCode, str]:
    """Raise ``exc`` inside ``table``; the status and message the client gets."""
    with pytest.raises(PrismError) as info, table:
        raise exc
    assert info.value.__cause__ is exc  # the driver's error stays chained for the log
    return info.value.grpc_status, str(info.value)


# ---------------------------------------------------------------- the helper


class DriverError(Exception):
    pass


class DriverTimeout(DriverError):
    pass


class DriverBug(DriverError):
    pass


TABLE = map_exceptions(
    {
        DriverTimeout: ResourceExhausted,
        DriverBug: None,
        (KeyError, LookupError): lambda exc: NotFound(f"gone: {exc.args[0]}"),
        DriverError: Unavailable,
    }
)


def test_a_gateway_error_class_gets_the_driver_text() -> None:
    assert seen_by_client(TABLE, DriverError("db: connection lost")) == (
        StatusCode.UNAVAILABLE,
        "db: connection lost",
    )


def test_entries_are_tried_in_order_so_a_subclass_goes_first() -> None:
    assert seen_by_client(TABLE, DriverTimeout("db: all 8 busy")) == (
        StatusCode.RESOURCE_EXHAUSTED,
        "db: all 8 busy",
    )


def test_a_factory_decides_from_the_exception_and_tuples_match_any() -> None:
    assert seen_by_client(TABLE, KeyError("k1")) == (StatusCode.NOT_FOUND, "gone: k1")
    assert seen_by_client(TABLE, IndexError("i")) == (StatusCode.NOT_FOUND, "gone: i")


def test_none_and_unlisted_types_pass_through_unchanged() -> None:
    bug = DriverBug("misuse")
    with pytest.raises(DriverBug) as info, TABLE:
        raise bug
    assert info.value is bug
    with pytest.raises(ZeroDivisionError), TABLE:
        _ = 1 / 0
    with TABLE:
        pass  # nothing raised, nothing to do


async def test_one_instance_serves_concurrent_tasks() -> None:
    got: list[tuple[str, str]] = []

    async def call(text: str, exc: Exception | None) -> None:
        try:
            with TABLE:
                await trio.sleep(0)  # both tasks are inside the same manager here
                if exc is not None:
                    raise exc
        except PrismError as mapped:
            got.append((text, str(mapped)))
        else:
            got.append((text, "ok"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "a", DriverError("a failed"))
        nursery.start_soon(call, "b", None)
        nursery.start_soon(call, "c", DriverTimeout("c waited"))
    assert sorted(got) == [("a", "a failed"), ("b", "ok"), ("c", "c waited")]


async def test_cancellation_is_never_mapped() -> None:
    with trio.CancelScope() as scope:
        with TABLE:
            scope.cancel()
            await trio.sleep(1)
    assert scope.cancelled_caught


# ---------------------------------------------------------------- PostgreSQL


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (
            pg.PoolTimeout("postgres: all 8 connections busy for 0.5 s"),
            StatusCode.RESOURCE_EXHAUSTED,
            "postgres: all 8 connections busy for 0.5 s",
        ),
        (
            pg.PgError("postgres: connection lost: server closed the connection"),
            StatusCode.UNAVAILABLE,
            "postgres: connection lost: server closed the connection",
        ),
        (
            pg.PgError("postgres: cannot connect within 5 s"),
            StatusCode.UNAVAILABLE,
            "postgres: cannot connect within 5 s",
        ),
        *(
            (
                pg.PgError("the server's text, not shown", state),
                StatusCode.UNAVAILABLE,
                f"postgres: database unavailable (SQLSTATE {state})",
            )
            for state in ("08006", "53300", "57P01", "57P03", "40001", "40P01", "57014")
        ),
        (
            pg.PgError("could not extend file: No space left on device", "53100"),
            StatusCode.RESOURCE_EXHAUSTED,
            "postgres: disk is full (SQLSTATE 53100)",
        ),
        *(
            (
                pg.PgError("duplicate key value violates unique constraint", state),
                StatusCode.INTERNAL,
                f"postgres: database error (SQLSTATE {state})",
            )
            for state in ("23505", "42P01", "57000", "22P02")
        ),
    ],
)
def test_postgres_table(exc: pg.PgError, status: StatusCode, message: str) -> None:
    assert seen_by_client(PG_ERRORS, exc) == (status, message)


# ---------------------------------------------------------------- Redis


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (
            resp.PoolTimeout("redis: all 8 connections busy for 0.5 s"),
            StatusCode.RESOURCE_EXHAUSTED,
            "redis: all 8 connections busy for 0.5 s",
        ),
        (
            resp.ConnectionLost("redis: connection lost: [Errno 104] Connection reset by peer"),
            StatusCode.UNAVAILABLE,
            "redis: connection lost: [Errno 104] Connection reset by peer",
        ),
        (
            resp.CannotConnect("redis: cannot connect to 127.0.0.1:1: refused"),
            StatusCode.UNAVAILABLE,
            "redis: cannot connect to 127.0.0.1:1: refused",
        ),
        (
            resp.PoolClosed("redis: connection pool is closed"),
            StatusCode.UNAVAILABLE,
            "redis: connection pool is closed",
        ),
        (
            resp.ReplyError("LOADING Redis is loading the dataset in memory"),
            StatusCode.UNAVAILABLE,
            "redis: server unavailable (LOADING)",
        ),
        (
            resp.ReplyError("OOM command not allowed when used memory > 'maxmemory'."),
            StatusCode.UNAVAILABLE,
            "redis: server unavailable (OOM)",
        ),
        (
            resp.ReplyError("ERR Error running script: bad argument"),
            StatusCode.INTERNAL,
            "redis: server error: ERR Error running script: bad argument",
        ),
    ],
)
def test_redis_table(exc: resp.RedisError, status: StatusCode, message: str) -> None:
    assert seen_by_client(REDIS_ERRORS, exc) == (status, message)


# ---------------------------------------------------------------- NATS


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (
            natsio.PayloadTooLarge("nats: message of 2000000 bytes is over the server's 1048576"),
            StatusCode.INVALID_ARGUMENT,
            "nats: message of 2000000 bytes is over the server's 1048576",
        ),
        (
            JetStreamError(
                "$JS.API.STREAM.INFO.S", {"code": 404, "err_code": 10059, "description": "stream not found"}
            ),
            StatusCode.INTERNAL,
            "nats: $JS.API.STREAM.INFO.S: stream not found (err_code 10059)",
        ),
        (
            natsio.ConnectionLost("nats: connection lost: closed by the server"),
            StatusCode.UNAVAILABLE,
            "nats: connection lost: closed by the server",
        ),
        (
            natsio.CannotConnect("nats: cannot connect to h:1 within 2 s"),
            StatusCode.UNAVAILABLE,
            "nats: cannot connect to h:1 within 2 s",
        ),
        (
            natsio.NoReply("nats: no reply on s within 5 s"),
            StatusCode.UNAVAILABLE,
            "nats: no reply on s within 5 s",
        ),
        (natsio.NoResponders("nats: no responders on s"), StatusCode.UNAVAILABLE, "nats: no responders on s"),
    ],
)
def test_nats_table(exc: Exception, status: StatusCode, message: str) -> None:
    assert seen_by_client(NATS_ERRORS, exc) == (status, message)


def test_jetstream_error_keeps_its_code_for_the_backend() -> None:
    assert JetStreamError("s", {"err_code": 10014}).err_code == 10014
    assert JetStreamError("s", {}).err_code == 0


# ---------------------------------------------------------------- SQLite (real sqlite3 errors)


def sqlite_error(action: object) -> sqlite3.Error:
    try:
        action()  # type: ignore[operator]
    except sqlite3.Error as exc:
        return exc
    raise AssertionError("no sqlite3 error")


def test_sqlite_locked_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        exc = sqlite_error(lambda: other.execute("BEGIN IMMEDIATE"))
        assert seen_by_client(SQLITE_ERRORS, exc) == (StatusCode.UNAVAILABLE, "sqlite: database is locked")
    finally:
        other.close()
        holder.close()


def test_sqlite_file_errors_are_internal_and_name_no_path(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not sqlite" * 100)
    conn = sqlite3.connect(junk)
    try:
        exc = sqlite_error(lambda: conn.execute("SELECT * FROM sqlite_master"))
    finally:
        conn.close()
    status, message = seen_by_client(SQLITE_ERRORS, exc)
    assert (status, message) == (StatusCode.INTERNAL, "sqlite: file is not a database")
    exc = sqlite_error(lambda: sqlite3.connect(tmp_path / "missing-dir" / "x.sqlite3"))
    assert seen_by_client(SQLITE_ERRORS, exc) == (StatusCode.INTERNAL, "sqlite: cannot open database file")


def test_sqlite_constraint_and_unknown_codes_are_internal() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (x PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    exc = sqlite_error(lambda: conn.execute("INSERT INTO t VALUES (1)"))
    assert seen_by_client(SQLITE_ERRORS, exc) == (StatusCode.INTERNAL, "sqlite: constraint failed")
    exc = sqlite_error(lambda: conn.execute("SELECT nosuch FROM t"))  # SQLITE_ERROR: no message of its own
    assert seen_by_client(SQLITE_ERRORS, exc) == (StatusCode.INTERNAL, "sqlite: database error")
    conn.close()


def test_sqlite_full_database_is_resource_exhausted(tmp_path: Path) -> None:
    # max_page_count reached is the same SQLITE_FULL as a full file system
    # (tests/integration/test_disk_full.py fills a real one).
    conn = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("PRAGMA max_page_count = 3")
    exc = sqlite_error(lambda: conn.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,)))
    conn.close()
    assert seen_by_client(SQLITE_ERRORS, exc) == (StatusCode.RESOURCE_EXHAUSTED, "sqlite: disk is full")


def test_sqlite_misuse_is_our_bug_and_passes_unchanged() -> None:
    conn = sqlite3.connect(":memory:")
    conn.close()
    exc = sqlite_error(lambda: conn.execute("SELECT 1"))
    assert isinstance(exc, sqlite3.ProgrammingError)
    with pytest.raises(sqlite3.ProgrammingError) as info, SQLITE_ERRORS:
        raise exc
    assert info.value is exc
