"""PostgreSQL helpers for tests: the server the suite uses, and clean-up.

Tests may drop tables; the product never does."""

from __future__ import annotations

import os

import psycopg
from psycopg.conninfo import make_conninfo

from prism.backends.postgres.keyvalue import PostgresBackend

# .ci/run gives each run a database of its own (and drops it at the end).
DSN = os.environ.get("PRISM_TEST_PG_DSN", "postgresql://127.0.0.1/test")


def dsn_via(port: int) -> str:
    """``DSN`` reached through 127.0.0.1:``port`` (a relay a test can cut)."""
    return make_conninfo(DSN, host="127.0.0.1", port=str(port))


def drop_tables(backend: PostgresBackend) -> None:
    with psycopg.connect(DSN, autocommit=True) as conn:
        for table in (backend.items_table, backend.tokens_table, backend.tombstones_table):
            conn.execute(f'DROP TABLE IF EXISTS "{table}"'.encode())
