"""The SQL of the SQLite KeyValue backend: plain functions on a connection.

No trio here: ``keyvalue.py`` (through ``pool.SqlitePool``) decides which
thread runs these and when. Each function assumes it has the connection to
itself. The contract's rules are written in SQL so that they hold inside the
transaction that applies them:

- the stamp rule is the WHERE of the upsert and of the delete (row values
  compare as tuples, TEXT and BLOB with memcmp: the same order as Python's
  ``str`` and ``bytes``);
- a key's tombstone is its row in ``items`` with an empty value and
  ``expires_at_ms`` minus the time it is forgotten: reads, which keep rows
  with ``expires_at_ms`` 0 or in the future, never see one, and the upsert's
  stamp rule keeps it against older puts with no extra lookup. Range
  tombstones (``MatchRange``, ``MatchAll``) are rows of ``range_tombstones``,
  which the upsert checks in its own statement (``NOT EXISTS``: one index
  probe on ``id``). Schema version 2 added that table; a version 1 file gets
  it when it is opened;
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
    ExportPage,
    ItemPage,
    ItemWrite,
    MatchKeys,
    MatchRange,
    Mutation,
    Predicate,
    Put,
    RecordPage,
    Stamp,
    StampedItem,
    StoredItem,
    export_page,
)
from prism.backends.paging import RecordPager, page_items
from prism.backends.rules import is_expired, is_replay, key_range
from prism.backends.sqlite.pool import retry_locked, transaction
from prism.errors import Internal

Apply = Callable[[sqlite3.Connection], None]

SCHEMA_VERSION = 2
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
    # Version 2.
    """CREATE TABLE IF NOT EXISTS range_tombstones (
        id TEXT NOT NULL,
        start_key BLOB NOT NULL,
        end_key BLOB NOT NULL,
        stamp_us INTEGER NOT NULL,
        stamp_token TEXT NOT NULL,
        forget_at_ms INTEGER NOT NULL,
        PRIMARY KEY (id, start_key, end_key)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS range_tombstones_age ON range_tombstones (forget_at_ms)",
)

# The stored row (item or tombstone) loses to the write when its stamp is
# not newer, or when it has expired or been forgotten (it counts as absent,
# whatever its stamp).
_STAMP_RULE = """ON CONFLICT (id, key) DO UPDATE SET
    value = excluded.value,
    expires_at_ms = excluded.expires_at_ms,
    stamp_us = excluded.stamp_us,
    stamp_token = excluded.stamp_token
WHERE (items.stamp_us, items.stamp_token) <= (excluded.stamp_us, excluded.stamp_token)
   OR (items.expires_at_ms != 0 AND abs(items.expires_at_ms) <= ?7)
"""
# A put: ?1 id, ?2 key, ?3 value, ?4 expires_at_ms, ?5 stamp time, ?6 token, ?7 now.
# Nothing is inserted under a newer range tombstone that covers the key.
_UPSERT = f"""
INSERT INTO items (id, key, value, expires_at_ms, stamp_us, stamp_token)
SELECT ?1, ?2, ?3, ?4, ?5, ?6
WHERE NOT EXISTS (
    SELECT 1 FROM range_tombstones AS r
    WHERE r.id = ?1 AND r.start_key <= ?2 AND (r.end_key = x'' OR ?2 < r.end_key)
      AND (r.stamp_us, r.stamp_token) > (?5, ?6) AND r.forget_at_ms > ?7)
{_STAMP_RULE}"""
# A key's tombstone (a delete by keys): a put of an empty value whose ?4 is
# minus the time it is forgotten, made whatever range tombstone covers the
# key (it may outlive that one).
_TOMBSTONE = f"""
INSERT INTO items (id, key, value, expires_at_ms, stamp_us, stamp_token)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
{_STAMP_RULE}"""
# A range's tombstone: replaces the range's older (or forgotten) one.
# ?1 id, ?2 start, ?3 end, ?4 stamp time, ?5 token, ?6 forget at, ?7 now.
_RANGE_TOMBSTONE = """
INSERT INTO range_tombstones (id, start_key, end_key, stamp_us, stamp_token, forget_at_ms)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT (id, start_key, end_key) DO UPDATE SET
    stamp_us = excluded.stamp_us,
    stamp_token = excluded.stamp_token,
    forget_at_ms = excluded.forget_at_ms
WHERE (range_tombstones.stamp_us, range_tombstones.stamp_token) <= (excluded.stamp_us, excluded.stamp_token)
   OR range_tombstones.forget_at_ms <= ?7
"""
_LIVE = "(expires_at_ms = 0 OR expires_at_ms > ?)"
_KEYS_PER_STATEMENT = 500  # well under SQLite's 32766 bound parameters

# "expires_at_ms != 0" as the index's own WHERE says, so that it is used.
_PURGE_ITEMS = """DELETE FROM items WHERE (id, key) IN (
    SELECT id, key FROM items WHERE expires_at_ms != 0 AND expires_at_ms BETWEEN 1 AND ?1 LIMIT ?2)"""
_PURGE_KEY_TOMBSTONES = """DELETE FROM items WHERE (id, key) IN (
    SELECT id, key FROM items WHERE expires_at_ms != 0 AND expires_at_ms BETWEEN -?1 AND -1 LIMIT ?2)"""
_PURGE_RANGE_TOMBSTONES = """DELETE FROM range_tombstones WHERE (id, start_key, end_key) IN (
    SELECT id, start_key, end_key FROM range_tombstones WHERE forget_at_ms <= ? LIMIT ?)"""
_PURGE_TOKENS = """DELETE FROM idempotency WHERE (id, token) IN (
    SELECT id, token FROM idempotency WHERE applied_at_ms <= ? LIMIT ?)"""

_PURGES_AT_NOW = (_PURGE_ITEMS, _PURGE_KEY_TOMBSTONES, _PURGE_RANGE_TOMBSTONES)


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


def delete(
    conn: sqlite3.Connection, id: str, predicate: Predicate, stamp: Stamp, now_ms: int, forget_at_ms: int
) -> None:
    """Delete, and leave the tombstones (forgotten at ``forget_at_ms``)."""
    t, token = stamp.generation_time_us, stamp.token
    if isinstance(predicate, MatchKeys):
        rows = [(id, key, b"", -forget_at_ms, t, token, now_ms) for key in set(predicate.keys)]
        conn.executemany(_TOMBSTONE, rows)
        return
    for where, params in _clauses(predicate, reverse=False):
        conn.execute(
            f"DELETE FROM items WHERE id = ? AND {where} AND (stamp_us, stamp_token) <= (?, ?)",
            (id, *params, t, token),
        )
    start, end = key_range(predicate) or (b"", b"")
    conn.execute(_RANGE_TOMBSTONE, (id, start, end, t, token, forget_at_ms, now_ms))


def mutate(
    conn: sqlite3.Connection,
    id: str,
    mutations: Sequence[Mutation],
    stamp: Stamp,
    now_ms: int,
    forget_at_ms: int,
) -> None:
    for m in mutations:
        if isinstance(m, Put):
            put(conn, id, (m.item,), stamp, now_ms)
        else:
            delete(conn, id, m.predicate, stamp, now_ms, forget_at_ms)


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


def export_records(
    conn: sqlite3.Connection, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
) -> ExportPage:
    """``scan_items`` with each item's stamp (``Migratable``)."""
    sql = f"SELECT id, key, value, expires_at_ms, stamp_us, stamp_token FROM items WHERE {_LIVE}"
    params: tuple[object, ...] = (now_ms,)
    if after is not None:
        sql += " AND id > ?"
        params += (after,)
    cursor = conn.execute(sql + " ORDER BY id, key", params)
    pager = RecordPager(limit_items, limit_bytes)
    try:
        for row_id, key, value, expires_at_ms, stamp_us, token in cursor:
            page = pager.add_row(row_id, StampedItem(key, value, expires_at_ms, stamp_us, token))
            if page is not None:
                return export_page(page)
    finally:
        cursor.close()
    return export_page(pager.last_page())


def count_records(conn: sqlite3.Connection, now_ms: int) -> int:
    """Records with live items (``Migratable.count_records``)."""
    row = conn.execute(f"SELECT COUNT(DISTINCT id) FROM items WHERE {_LIVE}", (now_ms,)).fetchone()
    return int(row[0])


def import_records(
    conn: sqlite3.Connection, records: Sequence[tuple[str, Sequence[StampedItem]]], now_ms: int
) -> None:
    """Each item put under its own stamp, by the upsert every put uses (so the
    stamp rule and the tombstones decide); no token is checked or recorded."""
    conn.executemany(
        _UPSERT,
        [
            (id, it.key, it.value, it.expires_at_ms, it.stamp_us, it.token, now_ms)
            for id, items in records
            for it in items
            if not is_expired(it.expires_at_ms, now_ms)
        ],
    )


class Purger:
    """Deletes expired items, tokens past the idempotency window and
    tombstones past their time, in batches, at most once per ``INTERVAL_MS``
    of caller time (sooner while a batch comes back full). Reads filter
    expired items and tombstones anyway; this only bounds the file."""

    INTERVAL_MS = 60_000
    BATCH = 1000

    def __init__(self) -> None:
        self.next_ms = 0

    def maybe_purge(self, conn: sqlite3.Connection, now_ms: int) -> None:
        """Purge if due, inside the caller's transaction."""
        if now_ms < self.next_ms:
            return
        counts = [conn.execute(sql, (now_ms, self.BATCH)).rowcount for sql in _PURGES_AT_NOW]
        horizon = now_ms - IDEMPOTENCY_WINDOW_MS
        counts.append(conn.execute(_PURGE_TOKENS, (horizon, self.BATCH)).rowcount)
        full = max(counts) >= self.BATCH
        self.next_ms = now_ms if full else now_ms + self.INTERVAL_MS
