"""The Redis backend when the server is unreachable, saturated or stalled.

Real server, real time: a call is held up by ``CLIENT PAUSE ... WRITE``
issued from another connection (the product has no test hooks)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from prism.backends.keyvalue import ItemWrite, MatchAll, Stamp, StoredItem
from prism.backends.redis.keyvalue import RedisBackend
from prism.backends.redis.options import RedisOptions
from prism.drivers import resp
from prism.errors import ResourceExhausted, Unavailable
from tests.rd import admin_client, delete_keys, new_backend

pytestmark = pytest.mark.services("redis")

NOW = 1_700_000_000_000


@pytest.fixture
async def kv(tmp_path: Path) -> AsyncIterator[RedisBackend]:
    backend = new_backend(pool_size=2, pool_timeout_s=0.05)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()
        await delete_keys(backend.key_prefix)


@pytest.fixture
async def admin() -> AsyncIterator[resp.Connection]:
    """A second client, outside Prism, to pause the server."""
    async with admin_client() as conn:
        yield conn


async def put(kv: RedisBackend, key: bytes, value: bytes = b"v") -> None:
    await kv.put_items("r", [ItemWrite(key, value)], Stamp(1), NOW)


async def get_all(kv: RedisBackend) -> list[StoredItem]:
    page = await kv.get_items(
        "r", MatchAll(), reverse=False, after=None, limit_items=100, limit_bytes=1 << 20, now_ms=NOW
    )
    return page.items


async def test_unreachable_server_is_unavailable_within_connect_timeout(tmp_path: Path) -> None:
    kv = RedisBackend(RedisOptions(url="redis://127.0.0.1:1/0", connect_timeout_s=0.5), namespace="ns")
    start = trio.current_time()
    with pytest.raises(Unavailable):
        await kv.open()
    assert trio.current_time() - start < 1.0
    await kv.aclose()


async def test_connect_timeout_is_unavailable(tmp_path: Path) -> None:
    # A listener that never accepts beyond its backlog is hard to build
    # portably; a blackhole address (TEST-NET-1) does not answer.
    kv = RedisBackend(RedisOptions(url="redis://192.0.2.1:6379/0", connect_timeout_s=0.2), namespace="ns")
    start = trio.current_time()
    with pytest.raises(Unavailable):
        await kv.open()
    assert trio.current_time() - start < 1.0
    await kv.aclose()


async def test_pool_exhausted_is_resource_exhausted_quickly(kv: RedisBackend, admin: resp.Connection) -> None:
    await put(kv, b"a")
    await admin.call("CLIENT", "PAUSE", 2000, "WRITE")
    async with trio.open_nursery() as nursery:
        for i in range(2):  # both connections of the pool, stuck on the pause
            nursery.start_soon(put, kv, b"k%d" % i)
            # One at a time: concurrent writes would share one batch and one connection.
            await trio.sleep(0.1)
        start = trio.current_time()
        with pytest.raises(ResourceExhausted):
            await put(kv, b"x")
        assert trio.current_time() - start < 0.5
        await admin.call("CLIENT", "UNPAUSE")
    assert [i.key for i in await get_all(kv)] == [b"a", b"k0", b"k1"]


async def test_cancelled_call_leaves_the_pool_usable(kv: RedisBackend, admin: resp.Connection) -> None:
    await put(kv, b"a")
    await admin.call("CLIENT", "PAUSE", 1000, "WRITE")
    with trio.move_on_after(0.1) as scope:
        await put(kv, b"b", b"late")
    assert scope.cancelled_caught
    await admin.call("CLIENT", "UNPAUSE")
    # Every pooled connection still answers its own calls (none is left with
    # an unread reply), and nothing blocks.
    with trio.fail_after(2):
        for _ in range(4):
            assert (await get_all(kv))[0].key == b"a"
            await put(kv, b"c")
    keys = [i.key for i in await get_all(kv)]
    assert keys[0] == b"a" and b"c" in keys


async def test_scripts_are_reloaded_after_script_flush(kv: RedisBackend, admin: resp.Connection) -> None:
    await put(kv, b"a")
    await admin.call("SCRIPT", "FLUSH")  # EVALSHA now answers NOSCRIPT: SCRIPT LOAD, then again
    await put(kv, b"b")
    await admin.call("SCRIPT", "FLUSH")
    assert [i.key for i in await get_all(kv)] == [b"a", b"b"]
