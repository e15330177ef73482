"""A namespace's health follows its backend: NOT_SERVING while PostgreSQL is
unreachable, SERVING again by itself when it is back.

PostgreSQL is made unreachable for the namespace by a TCP relay the test
controls (the real server behind it keeps running for everyone else).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from prism.api import health
from prism.backends.keyvalue import MatchAll
from prism.backends.postgres.keyvalue import PostgresBackend
from prism.config import NamespaceConfig, ServerConfig
from prism.errors import Unavailable
from prism.workers.app import App
from tests.pg import drop_tables, dsn_via
from tests.rd import delete_keys, new_prefix

pytestmark = pytest.mark.services("postgres", "redis", "nats")


class Relay:
    """127.0.0.1:port -> a real server (PostgreSQL by default), which the test
    can cut and restore."""

    def __init__(self, upstream_port: int = 5432) -> None:
        self.upstream_port = upstream_port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._scope: trio.CancelScope | None = None

    async def _pipe(self, a: trio.SocketStream, b: trio.SocketStream) -> None:
        try:
            async for chunk in a:
                await b.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await b.aclose()

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        async with trio.open_nursery() as n:
            n.start_soon(self._pipe, client, upstream)
            n.start_soon(self._pipe, upstream, client)

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def up(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()  # closes the listener and every relayed connection


@asynccontextmanager
async def app_with_pg(tmp_path: Path, port: int) -> AsyncIterator[App]:
    name = f"prism_test_{uuid.uuid4().hex[:12]}"
    ns = NamespaceConfig(
        name=name,
        backend="postgres",
        options={"dsn": dsn_via(port), "connect_timeout_s": 1, "pool_size": 2},
    )
    app = App(ServerConfig(data_dir=str(tmp_path), namespaces=(ns,)))
    try:
        yield app
    finally:
        held = app.namespaces.keyvalue.get(name)
        await app.aclose()
        if held is not None and isinstance(held.backend, PostgresBackend):
            drop_tables(held.backend)


@pytest.mark.trio
async def test_health_follows_the_backend(tmp_path: Path) -> None:
    relay = Relay()
    async with trio.open_nursery() as nursery:
        await relay.up(nursery)
        async with app_with_pg(tmp_path, relay.port) as app:
            [ns] = app.config.namespaces
            assert await app.apply(app.config.namespaces) == []
            await app.check_health()
            assert app.health.get(ns.name) == health.SERVING
            backend = app.namespaces.keyvalue[ns.name].backend

            relay.down()
            with trio.fail_after(5):
                with pytest.raises(Unavailable):
                    await backend.get_items(
                        "r", MatchAll(), reverse=False, after=None, limit_items=10, limit_bytes=1000, now_ms=0
                    )
            await app.check_health()
            assert app.health.get(ns.name) == health.NOT_SERVING

            await relay.up(nursery)
            await app.check_health()
            assert app.health.get(ns.name) == health.SERVING
            page = await backend.get_items(
                "r", MatchAll(), reverse=False, after=None, limit_items=10, limit_bytes=1000, now_ms=0
            )
            assert page.items == []
            relay.down()


@pytest.mark.trio
async def test_a_namespace_that_could_not_open_is_opened_when_the_backend_comes(tmp_path: Path) -> None:
    relay = Relay()  # not up yet: nothing listens on its port
    async with trio.open_nursery() as nursery, app_with_pg(tmp_path, relay.port) as app:
        [ns] = app.config.namespaces
        # strict: as at boot. PostgreSQL unreachable is waited for, not fatal.
        assert await app.apply(app.config.namespaces, strict=True) == [ns.name]
        assert app.health.get(ns.name) == health.NOT_SERVING
        assert not app.holds(ns.name)
        assert "postgres: cannot connect" in (app.unreachable(ns.name) or "")
        await relay.up(nursery)
        nursery.start_soon(app.keep_reopening)
        with trio.fail_after(10):  # the first retries are due within 0.75 s, 1.5 s, 3 s
            while not app.holds(ns.name):
                await trio.sleep(0.05)
        assert app.health.get(ns.name) == health.SERVING
        nursery.cancel_scope.cancel()
        relay.down()


@pytest.mark.trio
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_redis_and_nats_namespace_health_follows_the_backend(tmp_path: Path, kind: str) -> None:
    relay = Relay(6379 if kind == "redis" else 4222)
    name = f"prism_test_{uuid.uuid4().hex[:12]}"
    prefix = new_prefix()
    if kind == "redis":
        ns = NamespaceConfig(
            name=name,
            backend="redis",
            options={
                "url": f"redis://127.0.0.1:{relay.port}/0",
                "key_prefix": prefix,
                "connect_timeout_s": 1,
            },
        )
    else:
        ns = NamespaceConfig(
            name=name,
            abstraction="pubsub",
            backend="nats",
            options={"url": f"nats://127.0.0.1:{relay.port}", "stream": f"T{uuid.uuid4().hex}"},
        )
    app = App(ServerConfig(data_dir=str(tmp_path), namespaces=(ns,)))
    async with trio.open_nursery() as nursery:
        await relay.up(nursery)
        try:
            assert await app.apply(app.config.namespaces) == []
            await app.check_health()
            assert app.health.get(name) == health.SERVING
            relay.down()
            with trio.fail_after(5):
                await app.check_health()
            assert app.health.get(name) == health.NOT_SERVING
            await relay.up(nursery)
            with trio.fail_after(5):
                await app.check_health()
            assert app.health.get(name) == health.SERVING
            if kind == "nats":
                await app.namespaces.pubsub[name].backend.drop()  # type: ignore[attr-defined]
        finally:
            await app.aclose()
            await delete_keys(prefix)
            relay.down()
