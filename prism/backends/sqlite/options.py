"""Options of the SQLite backends (msgspec only: config loading imports this)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from prism.backends.options import (
    DEFAULT_TOMBSTONE_TTL_S,
    Days,
    NonEmpty,
    OptionError,
    Options,
    TombstoneTtl,
)

SYNCHRONOUS = ("FULL", "NORMAL")


class SqliteFileOptions(Options, frozen=True):
    """``path``: the file, absolute or relative to the data dir (default
    ``<namespace>.sqlite3``). ``synchronous``: "FULL" (the default) or
    "NORMAL", any case: WAL commits survive a process kill either way, only
    FULL also survives power loss."""

    # "" (which config cannot give: the field must not be empty) means the default.
    path: NonEmpty = ""
    synchronous: str = "FULL"

    def __post_init__(self) -> None:
        upper = self.synchronous.upper()
        if upper not in SYNCHRONOUS:
            raise OptionError("synchronous", f"{self.synchronous!r} is not 'FULL' or 'NORMAL'")
        msgspec.structs.force_setattr(self, "synchronous", upper)

    def file(self, data_dir: Path, namespace: str) -> Path:
        """The database file of ``namespace``."""
        return Path(data_dir) / (self.path or f"{namespace}.sqlite3")


class SqliteOptions(SqliteFileOptions, frozen=True):
    """KeyValue: the file's ``path`` and ``synchronous``, and ``tombstone_ttl_s``
    (how long a delete's tombstones are kept)."""

    tombstone_ttl_s: TombstoneTtl = DEFAULT_TOMBSTONE_TTL_S


class SqliteTimeSeriesOptions(SqliteFileOptions, frozen=True):
    """``path`` and ``synchronous`` as for KeyValue, and ``retention_days``:
    events older than this are never returned and get purged (0: keep forever)."""

    retention_days: Days = 0.0
