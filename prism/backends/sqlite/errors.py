"""SQLite's error table: what each sqlite3 error tells the client.

By primary result code: a database locked by another process (past the busy
timeout) is UNAVAILABLE, the client may retry; the rest (I/O error, corrupt
file, disk full...) are INTERNAL with a short message that names no path.
Misuse of the driver (``ProgrammingError``, ``InterfaceError``) is our bug
and goes through unchanged, to be logged and answered INTERNAL by the
dispatcher. The sqlite3 exception is chained for the log either way.
"""

from __future__ import annotations

import sqlite3

from prism.backends.errors import map_exceptions
from prism.errors import Internal, PrismError, Unavailable

_UNAVAILABLE = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_MESSAGES = {
    sqlite3.SQLITE_IOERR: "sqlite: disk I/O error",
    sqlite3.SQLITE_CORRUPT: "sqlite: database file is corrupt",
    sqlite3.SQLITE_NOTADB: "sqlite: file is not a database",
    sqlite3.SQLITE_FULL: "sqlite: disk is full",
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
    return Internal(_MESSAGES.get(primary or -1, "sqlite: database error"))


ERRORS = map_exceptions(
    {(sqlite3.ProgrammingError, sqlite3.InterfaceError): None, sqlite3.Error: database_error}
)
