"""The Redis cache tier (``prism.cache.redis``) against the real Redis.

Every test has a key prefix of its own and deletes its keys at the end.
Redis is made to fail with ``CLIENT PAUSE ... WRITE`` from a second
connection (writes, and scripts that may write, wait) or by pointing a tier
at a port nothing listens on."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from prometheus_client import REGISTRY

from prism.cache.redis import RedisTier
from prism.drivers import resp
from prism.proto import kv_pb2
from tests.rd import URL, admin_client, delete_keys, new_prefix

pytestmark = pytest.mark.services("redis")

DEAD_URL = "redis://127.0.0.1:1/0"


class Backend:
    """A stand-in for the backend read: one record's items, and a count of reads."""

    def __init__(self) -> None:
        self.items: dict[bytes, bytes] = {b"k": b"v1"}
        self.expires: dict[bytes, int] = {}
        self.reads = 0

    async def read(self) -> kv_pb2.GetItemsResponse:
        self.reads += 1
        return self.answer()

    def answer(self) -> kv_pb2.GetItemsResponse:
        return kv_pb2.GetItemsResponse(
            items=[
                kv_pb2.Item(key=k, value=v, expires_at_ms=self.expires.get(k, 0))
                for k, v in sorted(self.items.items())
            ]
        )


def values(answer: bytes) -> dict[bytes, bytes]:
    return {i.key: i.value for i in kv_pb2.GetItemsResponse.FromString(answer).items}


REQUEST = kv_pb2.GetItemsRequest(namespace="ns", id="r").SerializeToString()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    p = new_prefix()
    try:
        yield p
    finally:
        await delete_keys(p)


@pytest.fixture
async def redis() -> AsyncIterator[resp.Connection]:
    """A client outside the tier, to look at keys and pause the server."""
    async with admin_client() as conn:
        yield conn


@pytest.fixture
async def make_tier(prefix: str) -> AsyncIterator[Callable[..., RedisTier]]:
    """Tiers on the test's prefix (namespace "ns" unless given); closed at the end."""
    made: list[RedisTier] = []

    def make(namespace: str = "ns", **kw: Any) -> RedisTier:
        options: dict[str, Any] = {
            "url": URL,
            "key_prefix": prefix,
            "ttl_ms": 30_000,
            "max_value_bytes": 16 * 1024,
            **kw,
        }
        tier = RedisTier(namespace, **options)
        made.append(tier)
        return tier

    try:
        yield make
    finally:
        for tier in made:
            await tier.aclose()


def counter(name: str, namespace: str) -> float:
    return REGISTRY.get_sample_value(name, {"namespace": namespace}) or 0.0


async def test_second_read_is_a_hit_and_counted(
    make_tier: Callable[..., RedisTier], redis: resp.Connection
) -> None:
    ns = f"hit-{uuid.uuid4().hex[:8]}"
    tier = make_tier(namespace=ns)
    db = Backend()
    first = await tier.get_items("r", REQUEST, db.read)
    second = await tier.get_items("r", REQUEST, db.read)
    assert first == second == db.answer().SerializeToString()
    assert db.reads == 1
    assert counter("prism_cache_hits_total", ns) == 1
    assert counter("prism_cache_misses_total", ns) == 1
    assert await redis.call("EXISTS", tier.entry_key(REQUEST)) == 1
    # Another process (another tier object on the same Redis and prefix) hits too.
    other = make_tier(namespace=ns)
    assert await other.get_items("r", REQUEST, db.read) == first
    assert db.reads == 1


async def test_invalidate_makes_the_next_read_miss(make_tier: Callable[..., RedisTier]) -> None:
    writer, reader = make_tier(), make_tier()
    db = Backend()
    await reader.get_items("r", REQUEST, db.read)
    db.items[b"k"] = b"v2"
    await writer.invalidate("r")  # after the "commit", from another process
    assert values(await reader.get_items("r", REQUEST, db.read)) == {b"k": b"v2"}
    assert db.reads == 2
    # Another record's invalidation does not touch this one.
    await writer.invalidate("other")
    await reader.get_items("r", REQUEST, db.read)
    assert db.reads == 2


async def test_an_answer_read_before_a_concurrent_write_is_never_served(
    make_tier: Callable[..., RedisTier],
) -> None:
    reader, writer = make_tier(), make_tier()
    db = Backend()
    reading, written = trio.Event(), trio.Event()

    async def slow_read() -> kv_pb2.GetItemsResponse:
        answer = db.answer()  # the old value, read before the write commits
        reading.set()
        await written.wait()
        db.reads += 1
        return answer

    async def write() -> None:
        await reading.wait()
        db.items[b"k"] = b"v2"
        await writer.invalidate("r")
        written.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        stale = await reader.get_items("r", REQUEST, slow_read)
    assert values(stale) == {b"k": b"v1"}  # it started before the write was acknowledged
    # The entry was stored under the version taken before the write: it must miss.
    assert values(await reader.get_items("r", REQUEST, db.read)) == {b"k": b"v2"}
    assert db.reads == 2


async def test_entries_expire_after_the_ttl_or_with_their_items(
    make_tier: Callable[..., RedisTier], redis: resp.Connection
) -> None:
    tier = make_tier(ttl_ms=150)
    db = Backend()
    await tier.get_items("r", REQUEST, db.read)
    await tier.get_items("r", REQUEST, db.read)
    assert db.reads == 1
    await trio.sleep(0.25)
    await tier.get_items("r", REQUEST, db.read)
    assert db.reads == 2

    long_tier = make_tier(ttl_ms=60_000, namespace="long")
    db.expires[b"k"] = time.time_ns() // 1_000_000 + 2_000
    await long_tier.get_items("r", REQUEST, db.read)
    pttl = await redis.call("PTTL", long_tier.entry_key(REQUEST))
    assert 0 < pttl <= 2_000  # the item expires before the tier's TTL would


async def test_an_answer_over_max_value_bytes_is_not_stored(
    make_tier: Callable[..., RedisTier], redis: resp.Connection
) -> None:
    tier = make_tier(max_value_bytes=64)
    db = Backend()
    db.items[b"big"] = b"x" * 100
    await tier.get_items("r", REQUEST, db.read)
    assert await redis.call("EXISTS", tier.entry_key(REQUEST)) == 0
    await tier.get_items("r", REQUEST, db.read)
    assert db.reads == 2


async def test_redis_down_is_bypassed_without_errors(make_tier: Callable[..., RedisTier]) -> None:
    ns = f"down-{uuid.uuid4().hex[:8]}"
    tier = make_tier(url=DEAD_URL, namespace=ns)
    db = Backend()
    for _ in range(3):
        assert await tier.get_items("r", REQUEST, db.read) == db.answer().SerializeToString()
        await tier.invalidate("r")
    assert db.reads == 3
    assert counter("prism_cache_misses_total", ns) == 3
    assert tier.suspect


async def test_a_stalled_redis_costs_at_most_the_op_timeout(
    make_tier: Callable[..., RedisTier], redis: resp.Connection
) -> None:
    tier = make_tier(op_timeout_s=0.1, retry_after_s=60)
    db = Backend()
    await redis.call("CLIENT", "PAUSE", 5_000, "WRITE")
    start = trio.current_time()
    await tier.get_items("r", REQUEST, db.read)  # the lookup script may write: it waits
    assert trio.current_time() - start < 1.0
    # Backed off: the next calls do not even try.
    start = trio.current_time()
    await tier.get_items("r", REQUEST, db.read)
    await tier.invalidate("r")
    assert trio.current_time() - start < 0.05
    assert db.reads == 2


async def test_an_undelivered_invalidation_bypasses_reads_until_delivered(
    make_tier: Callable[..., RedisTier], redis: resp.Connection
) -> None:
    writer = make_tier(op_timeout_s=0.1, retry_after_s=0.2)
    reader = make_tier()
    db = Backend()
    await reader.get_items("r", REQUEST, db.read)
    await writer.get_items("r", REQUEST, db.read)
    assert db.reads == 1  # both see the cached v1

    await redis.call("CLIENT", "PAUSE", 5_000, "WRITE")
    db.items[b"k"] = b"v2"
    await writer.invalidate("r")  # cannot reach Redis: remembered, and the call still succeeds
    assert writer.suspect
    await redis.call("CLIENT", "UNPAUSE")
    # The writer's process never serves the old entry: it bypasses while backed off...
    assert values(await writer.get_items("r", REQUEST, db.read)) == {b"k": b"v2"}
    await trio.sleep(0.25)
    # ...and delivers the invalidation first thing once it tries Redis again.
    assert values(await writer.get_items("r", REQUEST, db.read)) == {b"k": b"v2"}
    assert not writer.suspect
    assert values(await reader.get_items("r", REQUEST, db.read)) == {b"k": b"v2"}


async def test_too_many_undelivered_invalidations_bump_the_namespace_epoch(
    make_tier: Callable[..., RedisTier], redis: resp.Connection
) -> None:
    writer = make_tier(op_timeout_s=0.1, retry_after_s=0.2, max_pending=2)
    reader = make_tier()
    db = Backend()
    other = kv_pb2.GetItemsRequest(namespace="ns", id="s").SerializeToString()
    await reader.get_items("r", REQUEST, db.read)
    await reader.get_items("s", other, db.read)
    await redis.call("CLIENT", "PAUSE", 5_000, "WRITE")
    for id in ("a", "b", "c"):  # more than max_pending ids: the namespace is what is pending
        await writer.invalidate(id)
    await redis.call("CLIENT", "UNPAUSE")
    await trio.sleep(0.25)
    await writer.invalidate("z")  # delivers the epoch bump first
    assert not writer.suspect
    await reader.get_items("r", REQUEST, db.read)
    await reader.get_items("s", other, db.read)
    assert db.reads == 4  # every entry of the namespace missed


async def test_invalidation_survives_the_callers_cancellation(
    make_tier: Callable[..., RedisTier], redis: resp.Connection
) -> None:
    tier = make_tier()
    db = Backend()
    await tier.get_items("r", REQUEST, db.read)
    before = await redis.call("GET", tier.version_key("r"))
    with trio.CancelScope() as scope:
        scope.cancel()
        await tier.invalidate("r")
    assert await redis.call("GET", tier.version_key("r")) != before
    await tier.get_items("r", REQUEST, db.read)
    assert db.reads == 2


async def test_namespaces_and_prefixes_are_isolated(make_tier: Callable[..., RedisTier], prefix: str) -> None:
    db = Backend()
    a = make_tier(namespace="a")
    b = make_tier(namespace="b")
    c = make_tier(namespace="a", key_prefix=prefix + "other:")
    await a.get_items("r", REQUEST, db.read)
    await b.get_items("r", REQUEST, db.read)
    await c.get_items("r", REQUEST, db.read)
    assert db.reads == 3
    await b.invalidate("r")
    await a.get_items("r", REQUEST, db.read)
    assert db.reads == 3


async def test_a_flushed_lookup_script_is_loaded_again_and_still_hits(
    make_tier: Callable[..., RedisTier], redis: resp.Connection
) -> None:
    tier = make_tier()
    db = Backend()
    await tier.get_items("r", REQUEST, db.read)
    await redis.call("SCRIPT", "FLUSH")  # a Redis restart or failover loses loaded scripts
    assert await tier.get_items("r", REQUEST, db.read) == db.answer().SerializeToString()
    assert db.reads == 1  # answered from the cache, not bypassed
    assert not tier.suspect
