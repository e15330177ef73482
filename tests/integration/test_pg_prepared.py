"""``prism.drivers.pg``'s prepared statements, against the real server: a
statement is prepared once per connection and then run by name with new
parameters each time; a statement that fails to prepare raises the server's
error and is prepared again next time; an error while running one leaves
the connection usable."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from prism.backends.postgres.options import conninfo
from prism.drivers import pg as pgio
from tests.pg import DSN

pytestmark = pytest.mark.services("postgres")


@pytest.fixture
async def conn() -> AsyncIterator[pgio.Connection]:
    conn = await pgio.connect(conninfo(DSN), timeout_s=5)
    try:
        yield conn
    finally:
        conn.close()


async def prepared_names(conn: pgio.Connection) -> list[str]:
    rows = await conn.execute(b"SELECT name FROM pg_prepared_statements ORDER BY name")
    return [name for (name,) in rows]


@pytest.mark.trio
async def test_a_statement_is_prepared_once_and_run_with_new_parameters(conn: pgio.Connection) -> None:
    sql = b"SELECT $1::int8 + 1, $2::bytea"
    assert await conn.execute(sql, [1, b"a"], prepare=True) == [(2, b"a")]
    assert await conn.execute(sql, [41, b"b"], prepare=True) == [(42, b"b")]
    assert await prepared_names(conn) == ["prism_1"]
    assert await conn.execute(sql, [0, b"c"]) == [(1, b"c")]  # unprepared, as before
    assert await prepared_names(conn) == ["prism_1"]


@pytest.mark.trio
async def test_errors_leave_the_connection_usable(conn: pgio.Connection) -> None:
    table = f"prism_test_prepared_{uuid.uuid4().hex[:8]}"
    insert = f'INSERT INTO "{table}" (k) VALUES ($1::int8)'.encode()
    with pytest.raises(pgio.PgError) as info:  # the table does not exist yet
        await conn.execute(insert, [1], prepare=True)
    assert info.value.sqlstate == "42P01"
    await conn.execute(f'CREATE TABLE "{table}" (k int8 PRIMARY KEY)'.encode())
    try:
        assert await conn.execute_count(insert, [1], prepare=True) == 1  # prepared now
        with pytest.raises(pgio.PgError) as info:
            await conn.execute(insert, [1], prepare=True)
        assert info.value.sqlstate == "23505"  # unique violation, while running it
        assert await conn.execute_count(insert, [2], prepare=True) == 1
        assert await conn.execute(f'SELECT k FROM "{table}" ORDER BY k'.encode()) == [(1,), (2,)]
        assert await prepared_names(conn) == ["prism_2"]  # prism_1 never got prepared
    finally:
        await conn.execute(f'DROP TABLE "{table}"'.encode())
