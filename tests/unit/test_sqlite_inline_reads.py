"""SQLite reads on the event loop's thread (prism.backends.sqlite.pool):
short ones are answered there, with no thread hop; long ones, and the
statements that fail, give what a thread's read gives."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from prism.backends.keyvalue import ItemWrite, MatchAll, MatchKeys, Stamp
from prism.backends.sqlite import pool
from prism.backends.sqlite.keyvalue import SqliteBackend
from prism.backends.sqlite.options import SqliteOptions
from prism.errors import PrismError


@pytest.fixture
async def kv(tmp_path: Path) -> AsyncIterator[SqliteBackend]:
    backend = SqliteBackend(SqliteOptions(), data_dir=tmp_path, namespace="ns")
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
def hops(kv: SqliteBackend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the pool's thread hops (one entry per hop), from once ``kv`` is open."""
    counted: list[int] = []
    run_sync = trio.to_thread.run_sync

    async def counting(*args: Any, **kwargs: Any) -> Any:
        counted.append(1)
        return await run_sync(*args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    return counted


async def _get(kv: SqliteBackend, id: str, limit: int = 100, keys: tuple[bytes, ...] = ()) -> list[bytes]:
    page = await kv.get_items(
        id, MatchKeys(keys) if keys else MatchAll(), reverse=False, after=None,
        limit_items=limit, limit_bytes=1 << 24, now_ms=int(time.time() * 1000),
    )  # fmt: skip
    return [item.value for item in page.items]


async def test_a_short_read_is_answered_without_a_thread(kv: SqliteBackend, hops: list[int]) -> None:
    items = [ItemWrite(b"a", b"1"), ItemWrite(b"b", b"2")]
    await kv.put_items("r", items, Stamp(1, ""), int(time.time() * 1000))
    hops.clear()  # (the write's hop)
    assert await _get(kv, "r") == [b"1", b"2"]
    assert await _get(kv, "r", keys=(b"b",)) == [b"2"]
    assert await _get(kv, "none") == []
    assert hops == []


async def test_a_read_past_the_budget_goes_to_a_thread_and_is_whole(
    kv: SqliteBackend, hops: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [ItemWrite(b"k%05d" % i, b"v%d" % i) for i in range(3000)]
    await kv.put_items("big", items, Stamp(1, ""), int(time.time() * 1000))
    hops.clear()
    got = await _get(kv, "big", limit=3000)
    assert got == [b"v%d" % i for i in range(3000)]
    assert len(hops) == 1  # interrupted on the loop's thread, answered by a thread
    # The loop's connection is whole after the interruption: short reads stay there.
    assert await _get(kv, "big", keys=(b"k00007",)) == [b"v7"]
    assert len(hops) == 1
    # Where the budget is not reached, the same read has no hop.
    monkeypatch.setattr(kv._pool, "_inline", kv._pool._inline)
    kv._pool._inline.set_progress_handler(None, 0)  # type: ignore[union-attr]
    assert await _get(kv, "big", limit=3000) == got
    assert len(hops) == 1
    kv._pool._inline.set_progress_handler(pool._over_budget, pool.INLINE_STEPS)  # type: ignore[union-attr]


async def test_a_failing_read_on_the_loops_thread_fails_as_in_a_thread(
    kv: SqliteBackend, hops: list[int]
) -> None:
    with pytest.raises(PrismError) as inline:
        await kv._read(lambda conn: conn.execute("SELECT no_such_column FROM items").fetchall())
    assert hops == []
    kv._pool._inline = None
    with pytest.raises(PrismError) as threaded:
        await kv._read(lambda conn: conn.execute("SELECT no_such_column FROM items").fetchall())
    assert len(hops) == 1
    assert (inline.value.grpc_status, str(inline.value)) == (threaded.value.grpc_status, str(threaded.value))


async def test_a_closed_pool_refuses_reads(tmp_path: Path) -> None:
    backend = SqliteBackend(SqliteOptions(), data_dir=tmp_path, namespace="ns")
    await backend.open()
    await backend.aclose()
    with pytest.raises(PrismError, match="closed"):
        await _get(backend, "r")
