"""A write whose commit outcome is unknown is never reported OK, and its retry
with the same idempotency token has exactly one effect (PostgreSQL, Redis).

A TCP relay between the backend and the real server lets the write's last
message (PostgreSQL's COMMIT, Redis's EVALSHA) through, then drops the
answer and closes the client's side: the server applied the write, the
client cannot know. The retry carries a later stamp (as a retry stamped by
the server's clock would), so without the token it would delete the item a
later write put back; with it, it must do nothing.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from prism.backends.keyvalue import ItemWrite, KeyValueBackend, MatchAll, Stamp, StoredItem
from prism.backends.postgres.keyvalue import PostgresBackend
from prism.backends.postgres.options import PostgresKeyValueOptions
from prism.errors import Unavailable
from tests import rd
from tests.pg import drop_tables, dsn_via

pytestmark = pytest.mark.services("postgres", "redis")

NOW = 1_700_000_000_000


class CuttingRelay:
    """127.0.0.1:port -> upstream; once armed, the first client message that
    holds ``trigger`` is delivered, its answer dropped and the client cut."""

    def __init__(self, upstream: tuple[str, int], trigger: bytes) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.upstream = upstream
        self.trigger = trigger
        self.armed = False
        self.fired = trio.Event()

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(*self.upstream)
        cut = False

        async def up() -> None:
            nonlocal cut
            async for chunk in client:
                if self.armed and self.trigger in chunk:
                    self.armed, cut = False, True  # before the answer can come back
                    await upstream.send_all(chunk)
                    await trio.sleep(0.2)  # the server applies it meanwhile
                    self.fired.set()
                    nursery.cancel_scope.cancel()
                else:
                    await upstream.send_all(chunk)

        async def down() -> None:
            async for chunk in upstream:
                if not cut:
                    await client.send_all(chunk)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(up)
                nursery.start_soon(down)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await client.aclose()
            await upstream.aclose()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)


async def items(kv: KeyValueBackend) -> list[StoredItem]:
    page = await kv.get_items(
        "r", MatchAll(), reverse=False, after=None, limit_items=10, limit_bytes=1 << 20, now_ms=NOW
    )
    return page.items


async def unknown_outcome_then_retry(kv: KeyValueBackend, relay: CuttingRelay) -> None:
    await kv.put_items("r", [ItemWrite(b"k", b"v0")], Stamp(1, ""), NOW)
    relay.armed = True
    with pytest.raises(Unavailable):  # never OK: the answer was lost
        await kv.delete_items("r", MatchAll(), Stamp(10, "T"), NOW)
    assert relay.fired.is_set()
    assert await items(kv) == []  # it was applied all the same
    await kv.put_items("r", [ItemWrite(b"k", b"v2")], Stamp(20, ""), NOW)
    await kv.delete_items("r", MatchAll(), Stamp(30, "T"), NOW)  # the client's retry: OK
    assert [(i.key, i.value) for i in await items(kv)] == [(b"k", b"v2")]  # one effect, not two


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def run_case(
    nursery: trio.Nursery,
    relay: CuttingRelay,
    make: Callable[[], KeyValueBackend],
    cleanup: Callable[[KeyValueBackend], Awaitable[None]],
) -> None:
    await nursery.start(relay.serve)
    kv = make()
    await kv.open()
    try:
        with trio.fail_after(20):
            await unknown_outcome_then_retry(kv, relay)
    finally:
        await kv.aclose()
        await cleanup(kv)


async def test_postgres_unknown_commit(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = CuttingRelay(("127.0.0.1", 5432), b"COMMIT")

    def make() -> KeyValueBackend:
        return PostgresBackend(
            PostgresKeyValueOptions(dsn=dsn_via(relay.port), connect_timeout_s=2),
            namespace=f"prism_test_{uuid.uuid4().hex[:12]}",
        )

    async def cleanup(kv: KeyValueBackend) -> None:
        assert isinstance(kv, PostgresBackend)
        await trio.to_thread.run_sync(drop_tables, kv)

    await run_case(nursery, relay, make, cleanup)


async def test_redis_unknown_script_outcome(nursery: trio.Nursery, tmp_path: Path) -> None:
    target = urlsplit(rd.URL)
    relay = CuttingRelay((target.hostname or "127.0.0.1", target.port or 6379), b"EVALSHA")
    prefix = rd.new_prefix()

    def make() -> KeyValueBackend:
        url = f"redis://127.0.0.1:{relay.port}{target.path}"
        from prism.backends.redis.keyvalue import RedisBackend
        from prism.backends.redis.options import RedisOptions

        return RedisBackend(RedisOptions(url=url, key_prefix=prefix), namespace="ns")

    async def cleanup(kv: KeyValueBackend) -> None:
        await rd.delete_keys(prefix)

    await run_case(nursery, relay, make, cleanup)
