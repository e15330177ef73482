"""Options of the PostgreSQL backends (msgspec only at import: config loading
imports this; psycopg is imported only to check a DSN)."""

from __future__ import annotations

import re

from prism.backends.options import (
    DEFAULT_TOMBSTONE_TTL_S,
    Days,
    NonEmpty,
    OptionError,
    Options,
    PoolSize,
    Seconds,
    TombstoneTtl,
)
from prism.redact import MASK, has_secret, redact

DEFAULT_DSN = "postgresql://127.0.0.1/test"
_QUOTED = re.compile(r'"([^"]*)"')
_SYNTAX = frozenset({"=", "]"})  # what libpq quotes of its own syntax ('missing "=" after ...')


def conninfo(dsn: str) -> str:
    """``dsn`` as libpq connection info naming Prism as the application;
    ValueError saying what is wrong with it, with no password in it."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import make_conninfo

    try:
        return make_conninfo(dsn, application_name="prism")
    except ProgrammingError as exc:
        reason = str(exc).strip()
        if has_secret(dsn):
            # libpq quotes the part it could not parse, which can be the raw
            # password itself ('invalid percent-encoded token: "p%zz..."'),
            # or a piece of one that a blank split: no pattern finds those.
            reason = _QUOTED.sub(_mask_quoted, reason)
        raise ValueError(redact(reason)) from None


def _mask_quoted(match: re.Match[str]) -> str:
    return match.group(0) if match.group(1) in _SYNTAX else f'"{MASK}"'


class PostgresOptions(Options, frozen=True):
    """The connection options every PostgreSQL backend takes: ``dsn`` (a
    libpq URI or key=value string), ``pool_size`` (connections),
    ``connect_timeout_s``, and ``pool_timeout_s`` (the longest wait for a
    free connection before RESOURCE_EXHAUSTED)."""

    dsn: NonEmpty = DEFAULT_DSN
    pool_size: PoolSize = 8
    connect_timeout_s: Seconds = 5.0
    pool_timeout_s: Seconds = 0.5

    def __post_init__(self) -> None:
        try:
            conninfo(self.dsn)
        except ValueError as exc:
            raise OptionError("dsn", f"is invalid: {exc}") from None


class PostgresKeyValueOptions(PostgresOptions, frozen=True):
    """The connection options, and ``coalesce_reads`` (concurrent whole-record
    reads share one statement) and ``coalesce_writes`` (concurrent PutItems
    without an idempotency token share one statement), both on by default,
    and ``tombstone_ttl_s`` (how long a delete's tombstones are kept)."""

    coalesce_reads: bool = True
    coalesce_writes: bool = True
    tombstone_ttl_s: TombstoneTtl = DEFAULT_TOMBSTONE_TTL_S


class PostgresTimeSeriesOptions(PostgresOptions, frozen=True):
    """The connection options, and ``retention_days``: events older than
    this are never returned and get purged (0: keep forever)."""

    retention_days: Days = 0.0
