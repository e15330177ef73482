"""TimeSeries on PostgreSQL, driven from trio by ``prism.drivers.pg`` like the KeyValue backend.

One table per namespace, ``prism_ts_<stem>``, keyed by the event's identity
(series_id, event_time_us, event_id): a write is ``INSERT ... ON CONFLICT DO
NOTHING`` per event in one transaction, so the first write of an identity
stays and a batch is all or nothing. ``series_id`` and ``event_id`` are
``text COLLATE "C"`` (code-point order, as the contract and the other
backends have it). Retention is a lower time bound on every read, and old
rows are deleted by a write at most once a minute. Tables are created on
``open()`` and never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from prism.backends.postgres import keyvalue_sql as kv_sql
from prism.backends.postgres.errors import ERRORS
from prism.backends.postgres.keyvalue import pool_from_options
from prism.backends.postgres.options import PostgresTimeSeriesOptions
from prism.backends.timeseries import (
    Cursor,
    Event,
    EventPage,
    check_events,
    horizon_us,
    page_events,
    retention_ms,
)
from prism.drivers import pg as pgio
from prism.errors import Unavailable

_MIN_US = -(2**63)
_MAX_US = 2**63 - 1
_PURGE_EVERY_MS = 60_000
_tags_encoder = msgspec.json.Encoder()
_tags_decoder = msgspec.json.Decoder(dict[str, str])


class PostgresTimeSeriesBackend:
    """Options: ``PostgresTimeSeriesOptions`` (the connection, as for
    KeyValue, and ``retention_days``)."""

    def __init__(self, options: PostgresTimeSeriesOptions, *, namespace: str) -> None:
        self._retention_ms = retention_ms(options.retention_days)
        self._pool = pool_from_options(options)
        self.table = f"prism_ts_{kv_sql.table_stem(namespace)}"
        t = self.table
        self._schema = (
            f'CREATE TABLE IF NOT EXISTS "{t}" ('
            ' series_id text COLLATE "C" NOT NULL, event_time_us int8 NOT NULL,'
            ' event_id text COLLATE "C" NOT NULL, payload bytea NOT NULL, tags bytea NOT NULL,'
            " PRIMARY KEY (series_id, event_time_us, event_id))"
        ).encode()
        self._insert = (f'INSERT INTO "{t}" VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING').encode()
        self._purge = f'DELETE FROM "{t}" WHERE event_time_us < $1'.encode()
        select = f'SELECT event_time_us, event_id, payload, tags FROM "{t}"'
        where = " WHERE series_id = $1 AND event_time_us >= $2 AND event_time_us < $3"
        read = {
            (False, False): f"{select}{where} ORDER BY event_time_us, event_id LIMIT $4",
            (True, False): f"{select}{where} ORDER BY event_time_us DESC, event_id DESC LIMIT $4",
            (False, True): f"{select}{where} AND (event_time_us, event_id) > ($5, $6)"
            " ORDER BY event_time_us, event_id LIMIT $4",
            (True, True): f"{select}{where} AND (event_time_us, event_id) < ($5, $6)"
            " ORDER BY event_time_us DESC, event_id DESC LIMIT $4",
        }
        self._read = {shape: text.encode() for shape, text in read.items()}  # encoded once
        self._purge_next_ms = 0
        self._opened = False
        self._closed = False

    async def open(self) -> None:
        if self._opened or self._closed:
            return
        with ERRORS:
            await self._pool.create_schema(kv_sql.lock_key(self.table), [self._schema])
        self._opened = True

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.aclose()

    async def ping(self) -> None:
        self._check_open()
        with ERRORS:
            await self._pool.execute(b"SELECT 1")

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("postgres backend is closed")
        if not self._opened:
            raise RuntimeError("PostgresTimeSeriesBackend.open() was not awaited")

    async def write_events(self, events: Sequence[Event], now_ms: int) -> None:
        self._check_open()
        check_events(events)
        horizon = horizon_us(self._retention_ms, now_ms)
        with ERRORS:
            conn = await self._pool.acquire()
            try:
                await conn.execute(b"BEGIN")
                for e in events:
                    await conn.execute(
                        self._insert,
                        [e.series_id, e.event_time_us, e.event_id, e.payload, _tags_encoder.encode(e.tags)],
                    )
                if horizon is not None and now_ms >= self._purge_next_ms:
                    await conn.execute(self._purge, [horizon])
                    self._purge_next_ms = now_ms + _PURGE_EVERY_MS
                await conn.execute(b"COMMIT")
            finally:
                await self._pool.release(conn)  # rolls back whatever is left open

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
        self._check_open()
        low = _MIN_US if start_us is None else start_us
        horizon = horizon_us(self._retention_ms, now_ms)
        if horizon is not None:
            low = max(low, horizon)
        high = _MAX_US if end_us is None else end_us
        params: list[pgio.Param] = [series_id, low, high, limit_items + 1]
        if after is not None:
            params += [after[0], after[1]]
        with ERRORS:
            rows = await self._pool.execute(self._read[(reverse, after is not None)], params)
        events = (
            Event(series_id, t, eid, payload, _tags_decoder.decode(tags)) for t, eid, payload, tags in rows
        )
        return page_events(events, limit_items, limit_bytes)
