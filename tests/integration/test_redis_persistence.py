"""A Redis KeyValue namespace on a Redis that keeps nothing on disk: a
warning at open naming the namespace and the address, or with
``require_persistence = true`` the namespace is NOT_SERVING (and served once
Redis persists). Each case runs its own throwaway redis-server."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prism.api import health
from prism.backends.redis.keyvalue import RedisBackend
from prism.backends.redis.options import RedisOptions
from prism.config import NamespaceConfig, ServerConfig
from prism.drivers import resp
from prism.drivers.addresses import RedisAddress
from prism.errors import Unavailable
from prism.proto import kv_pb2, kv_pb2_grpc
from prism.workers.app import App
from tests.throwaway import redis_plain

from .conftest import PrismProcess

NO_DISK = ("--save", "", "--appendonly", "no")
NO_CONFIG = ("--rename-command", "CONFIG", "")
NO_INFO = ("--rename-command", "INFO", "")
LOSES = "a restart of Redis would lose every acknowledged write"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "prism.backends.redis"]


async def open_backend(port: int, *, require: bool = False) -> RedisBackend:
    options = RedisOptions(url=f"redis://127.0.0.1:{port}/0", require_persistence=require)
    kv = RedisBackend(options, namespace="sessions")
    try:
        await kv.open()
    except BaseException:
        await kv.aclose()
        raise
    return kv


@pytest.mark.trio
@pytest.mark.parametrize(
    ("settings", "how"),
    [
        (NO_DISK, "has neither AOF nor RDB persistence (appendonly no, save '')"),
        (NO_DISK + NO_CONFIG, "could not be checked for persistence (CONFIG GET refused; INFO: no AOF"),
        (NO_DISK + NO_CONFIG + NO_INFO, "could not be checked for persistence (CONFIG GET and INFO refused)"),
    ],
    ids=["no-persistence", "config-disabled", "config-and-info-disabled"],
)
async def test_unpersisted_redis_warns_once_at_open_or_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, settings: tuple[str, ...], how: str
) -> None:
    with redis_plain(tmp_path, *settings) as port, caplog.at_level(logging.WARNING, "prism.backends.redis"):
        kv = await open_backend(port)
        await kv.aclose()
        assert len(warnings(caplog)) == 1
        line = warnings(caplog)[0]
        assert line.startswith(f"namespace sessions: redis at 127.0.0.1:{port} {how}"), line
        assert line.endswith(LOSES)
        caplog.clear()
        with pytest.raises(Unavailable) as refused:
            await open_backend(port, require=True)
        assert str(refused.value).startswith(f"redis at 127.0.0.1:{port} {how}")
        assert str(refused.value).endswith("not served (require_persistence = true)")
        assert warnings(caplog) == []


@pytest.mark.trio
@pytest.mark.parametrize(
    "settings",
    [
        ("--appendonly", "yes", "--save", ""),
        ("--appendonly", "no", "--save", "3600 1"),
        ("--appendonly", "yes", "--save", "", *NO_CONFIG),
    ],
    ids=["aof", "rdb", "aof-config-disabled"],
)
async def test_persisted_redis_opens_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, settings: tuple[str, ...]
) -> None:
    with redis_plain(tmp_path, *settings) as port, caplog.at_level(logging.WARNING, "prism.backends.redis"):
        kv = await open_backend(port, require=True)
        await kv.aclose()
    assert warnings(caplog) == []


@pytest.mark.trio
async def test_required_persistence_is_not_serving_until_redis_persists(tmp_path: Path) -> None:
    with redis_plain(tmp_path, *NO_DISK) as port:
        url = f"redis://127.0.0.1:{port}/0"
        options = {"url": url, "require_persistence": True}
        ns = NamespaceConfig(name="sessions", backend="redis", options=options)
        app = App(ServerConfig(data_dir=str(tmp_path), namespaces=(ns,)))
        try:
            # At boot (strict) too: not a halt, the namespace waits like one whose backend is down.
            assert await app.apply(app.config.namespaces, strict=True) == ["sessions"]
            assert app.health.get("sessions") == health.NOT_SERVING
            assert not app.holds("sessions")
            why = app.unreachable("sessions")  # what its calls are answered (UNAVAILABLE)
            assert why is not None and why.endswith("not served (require_persistence = true)")
            admin = await resp.connect(RedisAddress(url), timeout_s=5)
            try:
                await admin.call("CONFIG", "SET", "appendonly", "yes")
            finally:
                admin.close()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(app.keep_reopening)
                with trio.fail_after(10):
                    while app.health.get("sessions") != health.SERVING:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            assert app.holds("sessions")
        finally:
            await app.aclose()


def test_prism_serve_serves_the_rest_and_says_why_not_this_one(tmp_path: Path) -> None:
    with redis_plain(tmp_path, *NO_DISK) as port:
        config = (
            'workers = 1\n[[namespaces]]\nname = "default"\nbackend = "sqlite"\n'
            '[[namespaces]]\nname = "sessions"\nbackend = "redis"\n'
            f'options = {{ url = "redis://127.0.0.1:{port}/0", require_persistence = true }}\n'
        )
        server = PrismProcess(tmp_path / "data", config)
        server.start()
        try:
            with grpc.insecure_channel(server.endpoint) as channel:
                kv = kv_pb2_grpc.KeyValueStub(channel)
                item = kv_pb2.Item(key=b"k", value=b"v")
                kv.PutItems(kv_pb2.PutItemsRequest(namespace="default", id="a", items=[item]), timeout=5)
                with pytest.raises(grpc.RpcError) as refused:
                    kv.PutItems(kv_pb2.PutItemsRequest(namespace="sessions", id="a", items=[item]), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert refused.value.details().endswith(
                    f"redis at 127.0.0.1:{port} has neither AOF nor RDB persistence "
                    "(appendonly no, save ''): not served (require_persistence = true)"
                )
                check = health_pb2_grpc.HealthStub(channel).Check
                assert check(health_pb2.HealthCheckRequest(service="sessions"), timeout=5).status == (
                    health_pb2.HealthCheckResponse.NOT_SERVING
                )
        finally:
            server.stop()
