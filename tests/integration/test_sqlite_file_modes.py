"""SQLite namespaces' files are 0600 (with their -wal and -shm) in 0700
directories whatever the umask; an existing one open to others is left as it
is, with one warning line from `prism serve`."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.backends.keyvalue import ItemWrite, Stamp
from prism.backends.sqlite.keyvalue import SqliteBackend
from prism.backends.sqlite.options import SqliteOptions, SqliteTimeSeriesOptions
from prism.backends.sqlite.timeseries import SqliteTimeSeriesBackend

from .conftest import PrismProcess

NOW = 1_700_000_000_000


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o000, 0o022], ids=["umask-000", "umask-022"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.mark.trio
async def test_backends_create_0600_files_in_0700_dirs(tmp_path: Path, umask: int) -> None:
    data = tmp_path / "data"
    kv = SqliteBackend(SqliteOptions(path="kv/deep/ns.sqlite3"), data_dir=data, namespace="ns")
    await kv.open()
    await kv.put_items("r", [ItemWrite(key=b"k", value=b"v")], Stamp(generation_time_us=1), NOW)
    ts = SqliteTimeSeriesBackend(SqliteTimeSeriesOptions(), data_dir=data, namespace="events")
    await ts.open()
    try:
        for name in (
            "kv/deep/ns.sqlite3",
            "kv/deep/ns.sqlite3-wal",
            "kv/deep/ns.sqlite3-shm",
            "events.sqlite3",
        ):
            assert mode(data / name) == 0o600, name
        for name in ("", "kv", "kv/deep"):
            assert mode(data / name) == 0o700, name
    finally:
        await kv.aclose()
        await ts.aclose()


def test_serve_under_umask_000_then_warns_about_a_loosened_file(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        server = PrismProcess(tmp_path / "data", '[[namespaces]]\nname = "default"\nbackend = "sqlite"\n')
        server.start()
        server.stop()
    finally:
        os.umask(previous)
    db = tmp_path / "data" / "default.sqlite3"
    assert server.stderr is not None and "open to group or others" not in server.stderr
    assert mode(tmp_path / "data") == 0o700
    assert mode(tmp_path / "data" / "run") == 0o700
    assert mode(db) == 0o600
    db.chmod(0o644)
    server.start()
    server.stop()
    assert mode(db) == 0o644  # left as it is
    warned = [line for line in server.stderr.splitlines() if "open to group or others" in line]
    assert len(warned) == 1 and f"{db} is open to group or others (mode 0644)" in warned[0], server.stderr
    assert f"chmod 600 {db}*" in warned[0]
