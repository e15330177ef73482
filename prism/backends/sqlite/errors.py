"""SQLite's error table: what each sqlite3 error tells the client.

By primary result code: a database locked by another process (past the busy
timeout) is UNAVAILABLE, the client may retry; a full file system (or
``max_page_count`` reached) is RESOURCE_EXHAUSTED, as gRPC's status codes
name "the entire file system is out of space", and logged by the pool, at
most once a minute per namespace (``FullDiskLog``); the rest (I/O error,
corrupt file...) are INTERNAL with a short message that names no path.
Misuse of the driver (``ProgrammingError``, ``InterfaceError``) is our bug
and goes through unchanged, to be logged and answered INTERNAL by the
dispatcher. The sqlite3 exception is chained for the log either way.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from prism.backends.errors import map_exceptions
from prism.errors import Internal, PrismError, ResourceExhausted, Unavailable

log = logging.getLogger("prism.backends.sqlite")

FULL_LOG_INTERVAL_S = 60.0


class DiskFull(ResourceExhausted):
    """SQLITE_FULL: no room for what a write needs (reads still work)."""


_UNAVAILABLE = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_MESSAGES = {
    sqlite3.SQLITE_IOERR: "sqlite: disk I/O error",
    sqlite3.SQLITE_CORRUPT: "sqlite: database file is corrupt",
    sqlite3.SQLITE_NOTADB: "sqlite: file is not a database",
    sqlite3.SQLITE_CANTOPEN: "sqlite: cannot open database file",
    sqlite3.SQLITE_READONLY: "sqlite: database is read-only",
    sqlite3.SQLITE_CONSTRAINT: "sqlite: constraint failed",
}


def database_error(exc: sqlite3.Error) -> PrismError:
    """The gateway error for a sqlite3 error, by its primary result code."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in _UNAVAILABLE:
        return Unavailable("sqlite: database is locked")
    if primary == sqlite3.SQLITE_FULL:
        return DiskFull("sqlite: disk is full")
    return Internal(_MESSAGES.get(primary or -1, "sqlite: database error"))


ERRORS = map_exceptions(
    {(sqlite3.ProgrammingError, sqlite3.InterfaceError): None, sqlite3.Error: database_error}
)


class FullDiskLog:
    """One log line per ``FULL_LOG_INTERVAL_S`` for a namespace's full disk,
    naming the file: a full disk fails every write, and a line per failure
    would flood the log (and the disk the log may be on)."""

    def __init__(self, namespace: str, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.namespace = namespace
        self.path = path
        self._clock = clock
        self._last: float | None = None
        self._since = 0  # failed writes not logged since the last line

    def note(self) -> None:
        """A write failed for want of space."""
        now = self._clock()
        if self._last is not None and now - self._last < FULL_LOG_INTERVAL_S:
            self._since += 1
            return
        more = f" ({self._since} more since the last line)" if self._since else ""
        log.error(
            "namespace %s: no space left for %s: writes answer RESOURCE_EXHAUSTED, reads go on%s",
            self.namespace,
            self.path,
            more,
        )
        self._last, self._since = now, 0
