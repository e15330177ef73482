"""The SQL of the SQLite KeyValue backend: plain functions on a connection.

No trio here: ``keyvalue.py`` (through ``pool.SqlitePool``) decides which
thread runs these and when. Each function assumes it has the connection to
itself. The contract's rules are written in SQL so that they hold inside the
transaction that applies them:

- the stamp rule is the WHERE of the upsert and of the delete (row values
  compare as tuples, TEXT and BLOB with memcmp: the same order as Python's
  ``str`` and ``bytes``);
- a write (token check, changes, token record: ``write_once``) runs in its
  own savepoint of the pool's ``BEGIN IMMEDIATE`` transaction
  (``SqlitePool.write``): any exception rolls all of it back, and the call
  returns only after COMMIT.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence

from prism.backends.keyvalue import (
    IDEMPOTENCY_WINDOW_MS,
    ItemPage,
    ItemWrite,
    MatchKeys,
    MatchRange,
    Mutation,
    Predicate,
    Put,
    RecordPage,
    Stamp,
    StoredItem,
)
from prism.backends.paging import RecordPager, page_items
from prism.backends.rules import is_replay
from prism.backends.sqlite.pool import retry_locked, transaction
from prism.errors import Internal

Apply = Callable[[sqlite3.Connection], None]

SCHEMA_VERSION = 1
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS items (
        id TEXT NOT NULL,
        key BLOB NOT NULL,
        value BLOB NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        stamp_us INTEGER NOT NULL,
        stamp_token TEXT NOT NULL,
        PRIMARY KEY (id, key)
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS items_expiry
        ON items (expires_at_ms) WHERE expires_at_ms != 0""",
    """CREATE TABLE IF NOT EXISTS idempotency (
        id TEXT NOT NULL,
        token TEXT NOT NULL,
        applied_at_ms INTEGER NOT NULL,
        PRIMARY KEY (id, token)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency (applied_at_ms)",
)

# The stored item loses to the write when its stamp is not newer, or when it
# has expired (an expired item counts as absent, whatever its stamp).
_UPSERT = """
INSERT INTO items (id, key, value, expires_at_ms, stamp_us, stamp_token)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT (id, key) DO UPDATE SET
    value = excluded.value,
    expires_at_ms = excluded.expires_at_ms,
    stamp_us = excluded.stamp_us,
    stamp_token = excluded.stamp_token
WHERE (items.stamp_us, items.stamp_token) <= (excluded.stamp_us, excluded.stamp_token)
   OR (items.expires_at_ms != 0 AND items.expires_at_ms <= ?7)
"""
_LIVE = "(expires_at_ms = 0 OR expires_at_ms > ?)"
_KEYS_PER_STATEMENT = 500  # well under SQLite's 32766 bound parameters

_PURGE_ITEMS = """DELETE FROM items WHERE (id, key) IN (
    SELECT id, key FROM items WHERE expires_at_ms != 0 AND expires_at_ms <= ? LIMIT ?)"""
_PURGE_TOKENS = """DELETE FROM idempotency WHERE (id, token) IN (
    SELECT id, token FROM idempotency WHERE applied_at_ms <= ? LIMIT ?)"""


def prepare_writer(conn: sqlite3.Connection, synchronous: str) -> None:
    """Switch the file to WAL and create (or check) the schema."""
    (mode,) = retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
    if str(mode).lower() != "wal":
        raise Internal("sqlite: cannot enable WAL mode on this file system")
    conn.execute(f"PRAGMA synchronous = {synchronous}")  # FULL or NORMAL, checked
    with transaction(conn):
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise Internal("sqlite: database was written by a newer Prism")
        if version < SCHEMA_VERSION:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def write_once(
    conn: sqlite3.Connection, id: str, stamp: Stamp, now_ms: int, apply: Apply, purger: Purger
) -> None:
    """``apply`` as one idempotent write of ``id``, inside the caller's
    transaction (``SqlitePool.write``): the idempotency check, the changes and
    the token; and the purge, when due (it rides in the same transaction: no
    second wait for a lock another process may hold)."""
    token = stamp.token
    if token:
        row = conn.execute(
            "SELECT applied_at_ms FROM idempotency WHERE id = ? AND token = ?", (id, token)
        ).fetchone()
        if is_replay(None if row is None else row[0], now_ms):
            return
    apply(conn)
    if token:
        conn.execute(
            "INSERT OR REPLACE INTO idempotency (id, token, applied_at_ms) VALUES (?, ?, ?)",
            (id, token, now_ms),
        )
    purger.maybe_purge(conn, now_ms)


def put(conn: sqlite3.Connection, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
    t, token = stamp.generation_time_us, stamp.token
    conn.executemany(_UPSERT, [(id, it.key, it.value, it.expires_at_ms, t, token, now_ms) for it in items])


def delete(conn: sqlite3.Connection, id: str, predicate: Predicate, stamp: Stamp) -> None:
    for where, params in _clauses(predicate, reverse=False):
        conn.execute(
            f"DELETE FROM items WHERE id = ? AND {where} AND (stamp_us, stamp_token) <= (?, ?)",
            (id, *params, stamp.generation_time_us, stamp.token),
        )


def mutate(
    conn: sqlite3.Connection, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int
) -> None:
    for m in mutations:
        if isinstance(m, Put):
            put(conn, id, (m.item,), stamp, now_ms)
        else:
            delete(conn, id, m.predicate, stamp)


def _clauses(predicate: Predicate, *, reverse: bool) -> list[tuple[str, tuple[bytes, ...]]]:
    """WHERE fragments that together select ``predicate``, in travel order.
    A long key list becomes several statements, each with a sorted chunk."""
    if isinstance(predicate, MatchKeys):
        keys = sorted(set(predicate.keys), reverse=reverse)
        n = _KEYS_PER_STATEMENT
        chunks = [tuple(keys[i : i + n]) for i in range(0, len(keys), n)]
        return [(f"key IN ({', '.join('?' * len(c))})", c) for c in chunks]
    if isinstance(predicate, MatchRange):
        conds, params = [], []
        if predicate.start:
            conds.append("key >= ?")
            params.append(predicate.start)
        if predicate.end:
            conds.append("key < ?")
            params.append(predicate.end)
        return [(" AND ".join(conds) or "1", tuple(params))]
    return [("1", ())]


def _stored_item(cursor: sqlite3.Cursor, row: tuple[bytes, bytes, int]) -> StoredItem:
    return StoredItem(*row)


def get_items(
    conn: sqlite3.Connection,
    id: str,
    predicate: Predicate,
    reverse: bool,
    after: bytes | None,
    limit_items: int,
    limit_bytes: int,
    now_ms: int,
) -> ItemPage:
    cursor = conn.cursor()
    cursor.row_factory = _stored_item
    try:
        rows = _item_rows(cursor, id, predicate, reverse, after, limit_items + 1, now_ms)
        return page_items(rows, limit_items, limit_bytes)
    finally:
        cursor.close()  # ends the read snapshot even when rows were left unread


def _item_rows(
    cursor: sqlite3.Cursor,
    id: str,
    predicate: Predicate,
    reverse: bool,
    after: bytes | None,
    limit: int,
    now_ms: int,
) -> Iterator[StoredItem]:
    head = f"SELECT key, value, expires_at_ms FROM items WHERE id = ? AND {_LIVE}"
    params: tuple[object, ...] = (id, now_ms)
    if after is not None:
        head += " AND key < ?" if reverse else " AND key > ?"
        params += (after,)
    order = "DESC" if reverse else "ASC"
    for where, where_params in _clauses(predicate, reverse=reverse):
        sql = f"{head} AND {where} ORDER BY key {order} LIMIT ?"
        yield from cursor.execute(sql, (*params, *where_params, limit))


def scan_items(
    conn: sqlite3.Connection, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
) -> RecordPage:
    """One statement, so the page comes from one snapshot. Rows are read only
    as far as the first record that does not fit."""
    sql = f"SELECT id, key, value, expires_at_ms FROM items WHERE {_LIVE}"
    params: tuple[object, ...] = (now_ms,)
    if after is not None:
        sql += " AND id > ?"
        params += (after,)
    cursor = conn.execute(sql + " ORDER BY id, key", params)
    pager = RecordPager(limit_items, limit_bytes)
    try:
        for row_id, key, value, expires_at_ms in cursor:
            page = pager.add_row(row_id, StoredItem(key, value, expires_at_ms))
            if page is not None:
                return page
    finally:
        cursor.close()
    return pager.last_page()


class Purger:
    """Deletes expired items and tokens past the idempotency window, in
    batches, at most once per ``INTERVAL_MS`` of caller time (sooner while a
    batch comes back full). Reads filter expired items anyway; this only
    bounds the file."""

    INTERVAL_MS = 60_000
    BATCH = 1000

    def __init__(self) -> None:
        self.next_ms = 0

    def maybe_purge(self, conn: sqlite3.Connection, now_ms: int) -> None:
        """Purge if due, inside the caller's transaction."""
        if now_ms < self.next_ms:
            return
        items = conn.execute(_PURGE_ITEMS, (now_ms, self.BATCH)).rowcount
        horizon = now_ms - IDEMPOTENCY_WINDOW_MS
        tokens = conn.execute(_PURGE_TOKENS, (horizon, self.BATCH)).rowcount
        full = items >= self.BATCH or tokens >= self.BATCH
        self.next_ms = now_ms if full else now_ms + self.INTERVAL_MS
