"""TimeSeries on a local SQLite file, one file per namespace.

The threading model is ``pool.SqlitePool``'s (the KeyValue
backend's): one writer behind a trio lock, reader connections in WAL mode,
every sqlite3 call in a worker thread. The contract's rules are written in
SQL so that they hold inside the transaction that applies them:

- immutability is ``INSERT ... ON CONFLICT DO NOTHING`` on the primary key
  (series_id, event_time_us, event_id); a batch is one transaction;
- order is the primary key's: TEXT compares with memcmp over UTF-8, the same
  order as Python's ``str`` (the memory backend's);
- retention is a WHERE on every read; past-retention rows are deleted in
  batches inside a write's transaction, at most once a minute of caller time.

Tags are stored as msgspec JSON (``b""`` when there are none).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec

from prism.backends.sqlite.options import SqliteTimeSeriesOptions
from prism.backends.sqlite.pool import SqlitePool, prepare_wal
from prism.backends.timeseries import (
    Cursor,
    Event,
    EventPage,
    check_events,
    horizon_us,
    page_events,
    retention_ms,
)

SCHEMA_VERSION = 1
APPLICATION_ID = 0x50525453  # "PRTS": a Prism TimeSeries file
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        series_id TEXT NOT NULL,
        event_time_us INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        tags BLOB NOT NULL,
        PRIMARY KEY (series_id, event_time_us, event_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS events_time ON events (event_time_us)",
)
_INSERT = """INSERT INTO events (series_id, event_time_us, event_id, payload, tags)
VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"""
_PURGE = """DELETE FROM events WHERE (series_id, event_time_us, event_id) IN (
    SELECT series_id, event_time_us, event_id FROM events WHERE event_time_us < ? LIMIT ?)"""

_encode_tags = msgspec.json.Encoder().encode
_decode_tags = msgspec.json.Decoder(dict[str, str]).decode


class Purger:
    """Deletes events past retention in batches, at most once per
    ``INTERVAL_MS`` of caller time (sooner while a batch comes back full).
    Reads filter them anyway; this only bounds the file."""

    INTERVAL_MS = 60_000
    BATCH = 1000

    def __init__(self) -> None:
        self.next_ms = 0

    def maybe_purge(self, conn: sqlite3.Connection, horizon: int | None, now_ms: int) -> None:
        if horizon is None or now_ms < self.next_ms:
            return
        n = conn.execute(_PURGE, (horizon, self.BATCH)).rowcount
        self.next_ms = now_ms if n >= self.BATCH else now_ms + self.INTERVAL_MS


def _row(e: Event) -> tuple[str, int, str, bytes, bytes]:
    return (e.series_id, e.event_time_us, e.event_id, e.payload, _encode_tags(e.tags) if e.tags else b"")


def _event(cursor: sqlite3.Cursor, row: tuple[str, int, str, bytes, bytes]) -> Event:
    sid, t, eid, payload, tags = row
    return Event(sid, t, eid, payload, _decode_tags(tags) if tags else {})


class SqliteTimeSeriesBackend:
    """Options: ``SqliteTimeSeriesOptions`` (``path`` and ``synchronous`` as
    for KeyValue, and ``retention_days``). ``SqliteTimeSeriesBackend(...)``
    touches no file; ``await open()`` creates the file and schema and must
    come before any other call."""

    def __init__(self, options: SqliteTimeSeriesOptions, *, data_dir: Path, namespace: str) -> None:
        self.synchronous = options.synchronous
        self.retention_ms = retention_ms(options.retention_days)
        self.path = options.file(data_dir, namespace)
        self._pool = SqlitePool(self.path, self._prepare, namespace)
        self._purger = Purger()

    def _prepare(self, conn: sqlite3.Connection) -> None:
        prepare_wal(conn, self.synchronous, _SCHEMA, SCHEMA_VERSION, app_id=APPLICATION_ID)

    async def open(self) -> None:
        await self._pool.open()

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def write_events(self, events: Sequence[Event], now_ms: int) -> None:
        check_events(events)
        horizon = horizon_us(self.retention_ms, now_ms)
        # An event written already past retention is accepted and never returned.
        rows = [_row(e) for e in events if horizon is None or e.event_time_us >= horizon]

        def run(conn: sqlite3.Connection) -> None:  # in the pool's transaction
            conn.executemany(_INSERT, rows)
            self._purger.maybe_purge(conn, horizon, now_ms)

        await self._pool.write(run)

    async def read_events(
        self,
        series_id: str,
        start_us: int | None,
        end_us: int | None,
        *,
        reverse: bool,
        after: Cursor | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> EventPage:
        sql = "SELECT series_id, event_time_us, event_id, payload, tags FROM events WHERE series_id = ?"
        params: list[object] = [series_id]
        horizon = horizon_us(self.retention_ms, now_ms)
        for low in (start_us, horizon):
            if low is not None:
                sql += " AND event_time_us >= ?"
                params.append(low)
        if end_us is not None:
            sql += " AND event_time_us < ?"
            params.append(end_us)
        if after is not None:
            sql += " AND (event_time_us, event_id) " + ("< (?, ?)" if reverse else "> (?, ?)")
            params.extend(after)
        order = "DESC" if reverse else "ASC"
        sql += f" ORDER BY event_time_us {order}, event_id {order} LIMIT ?"
        params.append(limit_items + 1)

        def run(conn: sqlite3.Connection) -> EventPage:
            cursor = conn.cursor()
            cursor.row_factory = _event
            try:
                rows: Iterator[Event] = cursor.execute(sql, params)
                return page_events(rows, limit_items, limit_bytes)
            finally:
                cursor.close()  # ends the read snapshot even when rows were left unread

        return await self._pool.read(run)
