"""The SQL of the PostgreSQL KeyValue backend, per namespace table pair.

The contract's rules hold in the statements themselves, as in
``sqlite_ops``: the stamp rule is the WHERE of the upsert and of the delete
(row values compare as tuples; ``stamp_token`` and ``id`` are ``text COLLATE
"C"``, which compares UTF-8 bytewise, i.e. in code point order like Python's
``str``; ``key`` is ``bytea``, which compares as unsigned bytes, shorter
prefix first, like Python's ``bytes``), and an expired stored item loses to
any write. Tables are created if missing and never dropped.

Tombstones are kept as in SQLite (``prism.backends.sqlite.keyvalue_ops``): a
key's is its row in the items table with an empty value and
``expires_at_ms`` minus the time it is forgotten (reads never see it, and
the upsert's own WHERE keeps it against older puts); a range's is a row of
the ``_tomb`` table, which the upsert checks in the same statement (``NOT
EXISTS``), and a range delete writes in the same statement as it deletes.
The ``_tomb`` table is created at open beside tables made before it existed.
"""

from __future__ import annotations

import hashlib
import re

from prism.backends.keyvalue import MatchKeys, MatchRange, Predicate

_SAFE = re.compile(r"[^a-z0-9_]")
_MAX_STEM = 40  # 63-byte identifiers: "prism_kv_" + stem + "_idem" (or "_tomb") + margin


def table_stem(namespace: str) -> str:
    """A lowercase identifier part for ``namespace``; distinct namespaces get
    distinct stems (a hash suffix whenever sanitising changed or cut the name)."""
    stem = _SAFE.sub("_", namespace.lower())
    if stem != namespace or len(stem) > _MAX_STEM:
        digest = hashlib.sha1(namespace.encode()).hexdigest()[:10]
        stem = f"{stem[: _MAX_STEM - 11]}_{digest}"
    return stem


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)


def _stamp_rule(now: str) -> str:
    """The stamp rule of every upsert: a stored item (or key tombstone) is
    replaced by a write whose stamp is not older, or whatever its stamp once
    it has expired (or been forgotten) at ``now`` (a parameter)."""
    return f"""ON CONFLICT (id, key) DO UPDATE SET
                value = excluded.value,
                expires_at_ms = excluded.expires_at_ms,
                stamp_us = excluded.stamp_us,
                stamp_token = excluded.stamp_token
            WHERE (old.stamp_us, old.stamp_token) <= (excluded.stamp_us, excluded.stamp_token)
               OR (old.expires_at_ms != 0 AND abs(old.expires_at_ms) <= {now}::int8)"""


def _not_covered(tombs: str, id: str, key: str, stamp: str, now: str) -> str:
    """No range tombstone of ``tombs`` newer than ``stamp`` covers ``key`` of ``id`` at ``now``."""
    return f"""NOT EXISTS (SELECT 1 FROM {tombs} AS r
                WHERE r.id = {id} AND r.start_key <= {key} AND (r.end_key = ''::bytea OR {key} < r.end_key)
                  AND (r.stamp_us, r.stamp_token) > {stamp} AND r.forget_at_ms > {now})"""


class Statements:
    """Every statement the backend sends, rendered once for its tables."""

    def __init__(self, items: str, tokens: str, tombstones: str) -> None:
        self.items, self.tokens, self.tombstones = items, tokens, tombstones
        i, t, r = f'"{items}"', f'"{tokens}"', f'"{tombstones}"'
        self.schema = (
            f"""CREATE TABLE IF NOT EXISTS {i} (
                id text COLLATE "C" NOT NULL,
                key bytea NOT NULL,
                value bytea NOT NULL,
                expires_at_ms bigint NOT NULL,
                stamp_us bigint NOT NULL,
                stamp_token text COLLATE "C" NOT NULL,
                PRIMARY KEY (id, key))""".encode(),
            f"""CREATE INDEX IF NOT EXISTS "{items}_expiry" ON {i} (expires_at_ms)
                WHERE expires_at_ms != 0""".encode(),
            f"""CREATE TABLE IF NOT EXISTS {t} (
                id text COLLATE "C" NOT NULL,
                token text COLLATE "C" NOT NULL,
                applied_at_ms bigint NOT NULL,
                PRIMARY KEY (id, token))""".encode(),
            f'CREATE INDEX IF NOT EXISTS "{tokens}_age" ON {t} (applied_at_ms)'.encode(),
            f"""CREATE TABLE IF NOT EXISTS {r} (
                id text COLLATE "C" NOT NULL,
                start_key bytea NOT NULL,
                end_key bytea NOT NULL,
                stamp_us bigint NOT NULL,
                stamp_token text COLLATE "C" NOT NULL,
                forget_at_ms bigint NOT NULL,
                PRIMARY KEY (id, start_key, end_key))""".encode(),
            f'CREATE INDEX IF NOT EXISTS "{tombstones}_age" ON {r} (forget_at_ms)'.encode(),
        )
        # One statement for a whole put: the caller passes each key once.
        # $1 id, $2 keys, $3 values, $4 expiries, $5 stamp time, $6 token, $7 now.
        self.upsert = f"""INSERT INTO {i} AS old (id, key, value, expires_at_ms, stamp_us, stamp_token)
            SELECT $1::text, k, v, e, $5::int8, $6::text
            FROM unnest($2::bytea[], $3::bytea[], $4::int8[]) AS u(k, v, e)
            WHERE {_not_covered(r, "$1::text", "u.k", "($5::int8, $6::text)", "$7::int8")}
            {_stamp_rule("$7")}""".encode()
        # Several records' items in one statement (coalesced puts without a
        # token): $1 ids, $2 keys, $3 values, $4 expiries, $5 stamps, $6
        # tokens (one entry per row, no (id, key) twice), $7 now.
        self.upsert_many = f"""INSERT INTO {i} AS old (id, key, value, expires_at_ms, stamp_us, stamp_token)
            SELECT u.id, u.k, u.v, u.e, u.s, u.t
            FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::int8[], $5::int8[], $6::text[])
                AS u(id, k, v, e, s, t)
            WHERE {_not_covered(r, "u.id", "u.k", "(u.s, u.t)", "$7::int8")}
            {_stamp_rule("$7")}""".encode()
        # Puts of distinct records, each with its own stamp and token (an
        # empty token: none), in one statement: each token is claimed as
        # ``claim_token`` does, and a put's rows go in only if its token was
        # claimed (or it has none). One round trip for what is otherwise
        # BEGIN, claim, upsert, COMMIT. $1 ids, $2 keys, $3 values, $4
        # expiries, $5 stamps, $6 tokens (one entry per row, no (id, key)
        # twice), $7 now, $8 ids and $9 tokens to claim (each pair once),
        # $10 now - the idempotency window.
        self.upsert_claimed = f"""WITH claim AS (
                INSERT INTO {t} AS old (id, token, applied_at_ms)
                SELECT c.id, c.token, $7::int8 FROM unnest($8::text[], $9::text[]) AS c(id, token)
                ON CONFLICT (id, token) DO UPDATE SET applied_at_ms = excluded.applied_at_ms
                WHERE old.applied_at_ms <= $10::int8
                RETURNING id, token)
            INSERT INTO {i} AS old (id, key, value, expires_at_ms, stamp_us, stamp_token)
            SELECT u.id, u.k, u.v, u.e, u.s, u.t
            FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::int8[], $5::int8[], $6::text[])
                AS u(id, k, v, e, s, t)
            WHERE (u.t = '' OR EXISTS (SELECT 1 FROM claim AS c WHERE c.id = u.id AND c.token = u.t))
              AND {_not_covered(r, "u.id", "u.k", "(u.s, u.t)", "$7::int8")}
            {_stamp_rule("$7")}""".encode()
        # Key tombstones (a delete by keys): $1 id, $2 stamp time, $3 token,
        # $4 keys (each once), $5 minus the time they are forgotten, $6 now.
        # Made whatever range tombstone covers a key (it may outlive that one).
        self.tombstone_keys = f"""INSERT INTO {i} AS old
                (id, key, value, expires_at_ms, stamp_us, stamp_token)
            SELECT $1::text, k, ''::bytea, $5::int8, $2::int8, $3::text FROM unnest($4::bytea[]) AS u(k)
            {_stamp_rule("$6")}""".encode()
        # A row back means the token is fresh (new, or past the window) and
        # is now recorded; none means a replay. A concurrent write with the
        # same token waits on the row lock and then sees it as a replay.
        # $1 id, $2 token, $3 now, $4 now - window.
        self.claim_token = f"""INSERT INTO {t} AS old (id, token, applied_at_ms)
            VALUES ($1::text, $2::text, $3::int8)
            ON CONFLICT (id, token) DO UPDATE SET applied_at_ms = excluded.applied_at_ms
            WHERE old.applied_at_ms <= $4::int8
            RETURNING 1""".encode()
        # $1 now, $2 batch ("expires_at_ms != 0" as the index's own WHERE says).
        self.purges_at_now = (
            f"""DELETE FROM {i} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {i} WHERE expires_at_ms != 0 AND expires_at_ms BETWEEN 1 AND $1::int8
            LIMIT $2::int8))""".encode(),
            f"""DELETE FROM {i} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {i} WHERE expires_at_ms != 0 AND expires_at_ms BETWEEN -$1::int8 AND -1
            LIMIT $2::int8))""".encode(),
            f"""DELETE FROM {r} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {r} WHERE forget_at_ms <= $1::int8 LIMIT $2::int8))""".encode(),
        )
        self.purge_tokens = f"""DELETE FROM {t} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {t} WHERE applied_at_ms <= $1::int8 LIMIT $2::int8))""".encode()
        self._i, self._r = i, r
        self._cache: dict[tuple[object, ...], bytes] = {}

    def delete_range(self, predicate: Predicate) -> bytes:
        """A delete by range (or of the whole record) and its tombstone, in
        one statement: $1 id, $2 stamp time, $3 token, $4 start, $5 end
        (``b""``: unbounded), $6 the time it is forgotten, $7 now. The
        tombstone replaces the range's older (or forgotten) one."""
        cache_key = ("delete", _kind(predicate))
        sql = self._cache.get(cache_key)
        if sql is None:
            conds = ["true"]
            if isinstance(predicate, MatchRange) and predicate.start:
                conds.append("key >= $4::bytea")
            if isinstance(predicate, MatchRange) and predicate.end:
                conds.append("key < $5::bytea")
            sql = self._cache[cache_key] = f"""WITH gone AS (
                DELETE FROM {self._i} WHERE id = $1::text AND {" AND ".join(conds)}
                  AND (stamp_us, stamp_token) <= ($2::int8, $3::text))
            INSERT INTO {self._r} AS old (id, start_key, end_key, stamp_us, stamp_token, forget_at_ms)
            VALUES ($1::text, $4::bytea, $5::bytea, $2::int8, $3::text, $6::int8)
            ON CONFLICT (id, start_key, end_key) DO UPDATE SET
                stamp_us = excluded.stamp_us,
                stamp_token = excluded.stamp_token,
                forget_at_ms = excluded.forget_at_ms
            WHERE (old.stamp_us, old.stamp_token) <= (excluded.stamp_us, excluded.stamp_token)
               OR old.forget_at_ms <= $7::int8""".encode()
        return sql

    def get(self, predicate: Predicate, *, reverse: bool, after: bool) -> bytes:
        """SELECT of live items: $1 id, $2 now, $3 limit, [$4 after], then the
        predicate's parameters."""
        cache_key = ("get", _kind(predicate), reverse, after)
        sql = self._cache.get(cache_key)
        if sql is None:
            text = (
                f"SELECT key, value, expires_at_ms FROM {self._i}"
                " WHERE id = $1::text AND (expires_at_ms = 0 OR expires_at_ms > $2::int8)"
            )
            if after:
                text += " AND key < $4::bytea" if reverse else " AND key > $4::bytea"
            where = _where(predicate, 5 if after else 4)
            text += f" AND {where} ORDER BY key {'DESC' if reverse else 'ASC'} LIMIT $3::int8"
            sql = self._cache[cache_key] = text.encode()
        return sql

    def get_many(self, *, reverse: bool) -> bytes:
        """The live items of several records in one statement (coalesced
        reads): $1 ids (text[]), $2 now, $3 limit per record. Rows are
        (position of the id in $1, from 1; key; value; expires_at_ms), each
        record's rows in key order, as ``get`` would return them."""
        cache_key = ("get_many", reverse)
        sql = self._cache.get(cache_key)
        if sql is None:
            sql = self._cache[cache_key] = (
                "SELECT q.n, r.key, r.value, r.expires_at_ms"
                " FROM unnest($1::text[]) WITH ORDINALITY AS q(id, n)"
                " CROSS JOIN LATERAL (SELECT key, value, expires_at_ms"
                f" FROM {self._i} WHERE id = q.id"
                " AND (expires_at_ms = 0 OR expires_at_ms > $2::int8)"
                f" ORDER BY key {'DESC' if reverse else 'ASC'} LIMIT $3::int8) AS r"
            ).encode()
        return sql

    def count(self) -> bytes:
        """Records with live items: $1 now (``Migratable.count_records``)."""
        return (
            f"SELECT count(DISTINCT id) FROM {self._i} WHERE (expires_at_ms = 0 OR expires_at_ms > $1::int8)"
        ).encode()

    def scan(self, *, after_row: bool, after_id: bool, stamps: bool = False) -> bytes:
        """Live rows in (id, key) order: $1 now, $2 limit, then [$3 id, $4 key]
        (strictly after that row) or [$3 id] (strictly after that record).
        Columns: id, key, value, expires_at_ms, and with ``stamps`` stamp_us,
        stamp_token (an export, ``Migratable``)."""
        columns = "id, key, value, expires_at_ms" + (", stamp_us, stamp_token" if stamps else "")
        sql = f"SELECT {columns} FROM {self._i} WHERE (expires_at_ms = 0 OR expires_at_ms > $1::int8)"
        if after_row:
            sql += " AND (id, key) > ($3::text, $4::bytea)"
        elif after_id:
            sql += " AND id > $3::text"
        return (sql + " ORDER BY id, key LIMIT $2::int8").encode()


def _kind(predicate: Predicate) -> str:
    if isinstance(predicate, MatchKeys):
        return "keys"
    if isinstance(predicate, MatchRange):
        return f"range{int(bool(predicate.start))}{int(bool(predicate.end))}"
    return "all"


def _where(predicate: Predicate, first: int) -> str:
    """The predicate's WHERE fragment with parameters numbered from ``first``."""
    if isinstance(predicate, MatchKeys):
        return f"key = ANY(${first}::bytea[])"
    if isinstance(predicate, MatchRange):
        conds: list[str] = []
        n = first
        if predicate.start:
            conds.append(f"key >= ${n}::bytea")
            n += 1
        if predicate.end:
            conds.append(f"key < ${n}::bytea")
            n += 1
        return " AND ".join(conds) or "true"
    return "true"


def predicate_params(predicate: Predicate) -> list[bytes | list[bytes]]:
    """The parameters ``_where`` numbered, in order."""
    if isinstance(predicate, MatchKeys):
        return [list(predicate.keys)]
    if isinstance(predicate, MatchRange):
        return [b for b in (predicate.start, predicate.end) if b]
    return []
