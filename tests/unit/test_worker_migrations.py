"""A worker's side of live migrations (``prism.workers.migrating``) over memory backends:
it opens a migrating namespace over both backends, applies a moved serial in place,
runs the backfill only on the tenant's first worker and only in phase BACKFILL,
and writes its counters for ``status``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio
import trio.testing

from prism.backends.keyvalue import ItemWrite, MatchAll, Stamp
from prism.config import NamespaceConfig
from prism.migrate.dual import MigratingKeyValue
from prism.migrate.requests import read_worker_stats
from prism.migrate.state import Endpoint, MigrationState, MigrationStore, Phase, Progress
from prism.workers.migrating import WorkerMigrations

NS = NamespaceConfig(name="profiles", backend="sqlite")


async def progress_when(data_dir: Path, ok: Callable[[Progress], bool]) -> Progress:
    """The backfill's saved progress once ``ok``; it is written from a thread (real time)."""
    for _ in range(2000):
        progress = MigrationStore(data_dir).load_progress("profiles")
        if progress is not None and ok(progress):
            return progress
        await trio.to_thread.run_sync(time.sleep, 0.002)
    raise AssertionError("the backfill never got there")


def state(phase: Phase, serial: int, rate: int = 1000) -> MigrationState:
    return MigrationState(
        "profiles", Endpoint("sqlite"), Endpoint("memory"), phase, rate=rate, serial=serial, started_ms=1
    )


async def test_a_worker_holds_applies_and_backfills_a_migrating_namespace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    w = WorkerMigrations(tmp_path, 0)
    assert not w.stale("profiles", object())  # no migration: the App keeps what it holds
    assert await w.open(NS, tmp_path) is None
    w.want([state(Phase.DUAL_WRITE, 1)])
    assert w.stale("profiles", object())  # a plain backend must give way to a migrating one
    kv = await w.open(NS, tmp_path)
    assert isinstance(kv, MigratingKeyValue)
    assert not w.stale("profiles", kv)
    for i in range(30):
        await kv.source.put_items(f"r{i:02d}", [ItemWrite(b"k", b"v")], Stamp(1000 + i), 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        w.settle({"profiles": kv}, tenant_first=True)
        await trio.sleep(2)
        assert MigrationStore(tmp_path).load_progress("profiles") is None  # no backfill in dual_write
        w.want([state(Phase.BACKFILL, 2, rate=10)])
        w.settle({"profiles": kv}, tenant_first=False)
        assert kv.state.serial == 2  # applied in place, no reopen
        await trio.sleep(5)
        assert MigrationStore(tmp_path).load_progress("profiles") is None  # not the first worker
        started = trio.current_time()
        w.settle({"profiles": kv}, tenant_first=True)
        done = await progress_when(tmp_path, lambda p: p.done)
        assert done.copied == 30
        assert trio.current_time() - started >= 2.0  # 30 records at 10/s: pages a second apart
        page = await kv.target.get_items(
            "r29", MatchAll(), reverse=False, after=None, limit_items=10, limit_bytes=1000, now_ms=0
        )
        assert [i.value for i in page.items] == [b"v"]
        assert [p.updated_ms > 0 for p in read_worker_stats(tmp_path, "profiles")] == [True]
        w.want([])  # aborted and removed: the namespace goes back to a plain backend
        assert w.stale("profiles", kv)
        w.settle({"profiles": object()}, tenant_first=True)
        nursery.cancel_scope.cancel()
    await kv.aclose()


async def test_new_endpoints_reopen_the_namespace(tmp_path: Path) -> None:
    w = WorkerMigrations(tmp_path, 0)
    w.want([state(Phase.DUAL_WRITE, 1)])
    kv = await w.open(NS, tmp_path)
    moved = msgspec.structs.replace(state(Phase.DUAL_WRITE, 1), target=Endpoint("memory", {"x": 1}))
    w.want([moved])
    assert w.stale("profiles", kv)
    assert kv is not None
    await kv.aclose()
