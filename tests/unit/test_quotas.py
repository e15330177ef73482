"""Quotas as a client sees them: an App on memory backends, a real h2 client
over memory streams, trio's MockClock for the token refill.

RESOURCE_EXHAUSTED with the limit named and a ``grpc-retry-pushback-ms``
trailer, counted by namespace and reason; a neighbour namespace served
meanwhile; the answer-without-waiting path (a shared-cache hit) and a call
forwarded from another worker held to the same quota; a reload changes it.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from prism.cache.shared import SharedCache
from prism.config import NamespaceConfig, ServerConfig
from prism.config.namespaces import CacheConfig
from prism.config.quotas import LimitsConfig
from prism.errors import StatusCode
from prism.limits import QuotaExceeded, Quotas
from prism.proto import kv_pb2
from prism.router.table import NamespaceEntry, Routes
from prism.rpc.rest import LIMITED_REST_S
from prism.workers.app import App

from .apps import connection_to, serving_app
from .h2client import H2Client, Response, frame
from .test_forwarding import Node, client_of, forwarded, ipc_dir, routes, running  # noqa: F401 (a fixture)

PUT = "/prism.kv.v1.KeyValue/PutItems"
GET = "/prism.kv.v1.KeyValue/GetItems"
PUSHBACK = "grpc-retry-pushback-ms"


def limited(namespace: str, reason: str) -> float:
    sample = REGISTRY.get_sample_value(
        "prism_calls_limited_total", {"namespace": namespace, "reason": reason}
    )
    return sample or 0.0


def table(limits: dict[str, dict[str, Any]], tenant_limits: dict[str, Any] | None = None) -> Routes:
    """Routes of tenant "t": namespaces "profiles" (cached) and "neighbour", with ``limits``."""
    namespaces = {
        name: NamespaceEntry(name, "t", "keyvalue", "memory", limits=limits.get(name, {}))
        for name in ("profiles", "neighbour")
    }
    return Routes(1, namespaces, {}, tenant_limits={"t": tenant_limits} if tenant_limits else {})


@asynccontextmanager
async def served(tmp_path: Path, routes: Routes) -> AsyncIterator[tuple[App, H2Client]]:
    cache = SharedCache.create(1 << 20, 1024, version_words=1024)
    app = App(ServerConfig(data_dir=str(tmp_path / "data")), shared_cache=cache)
    await app.apply(
        [
            NamespaceConfig("profiles", backend="memory", cache=CacheConfig(enabled=True)),
            NamespaceConfig("neighbour", backend="memory"),
        ]
    )
    app.apply_limits("t", routes)
    async with serving_app(app) as client:
        yield app, client


async def put(client: H2Client, namespace: str) -> Response:
    request = kv_pb2.PutItemsRequest(namespace=namespace, id="r", items=[kv_pb2.Item(key=b"k", value=b"v")])
    return await client.call(PUT, frame(request.SerializeToString()))


async def get(client: H2Client, namespace: str) -> Response:
    request = kv_pb2.GetItemsRequest(namespace=namespace, id="r")
    return await client.call(GET, frame(request.SerializeToString()))


def refusal(r: Response) -> tuple[int | None, str, str | None]:
    return r.status, r.message, r.trailers.get(PUSHBACK, r.headers.get(PUSHBACK))


async def test_past_its_rps_a_namespace_is_refused_with_a_pushback_and_its_neighbour_is_served(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    before = limited("profiles", "rps")
    async with served(tmp_path, table({"profiles": {"rps": 4, "burst": 2}})) as (_, client):
        assert (await put(client, "profiles")).status == StatusCode.OK
        assert (await put(client, "profiles")).status == StatusCode.OK
        # The burst is spent: the next token comes in 1/4 s.
        assert refusal(await put(client, "profiles")) == (
            StatusCode.RESOURCE_EXHAUSTED,
            'namespace "profiles": rps limit 4 exceeded',
            "250",
        )
        # (The connection rests before its next read: test_quota_rest.)
        mock_clock.jump(0.1)  # 0.4 of a token: 150 ms to go
        assert refusal(await put(client, "profiles"))[2] == "150"
        mock_clock.jump(0.15)
        assert (await put(client, "profiles")).status == StatusCode.OK
        for _ in range(5):  # the bucket empty again, the neighbour is served
            assert (await put(client, "neighbour")).status == StatusCode.OK
        assert limited("profiles", "rps") == before + 2
        assert limited("neighbour", "rps") == 0


async def test_a_shared_cache_hit_is_held_to_the_quota_too(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with served(tmp_path, table({"profiles": {"rps": 1, "burst": 3}})) as (app, client):
        assert (await put(client, "profiles")).status == StatusCode.OK
        assert (await get(client, "profiles")).status == StatusCode.OK  # a miss: fills the cache
        hit = await get(client, "profiles")  # answered at once, from the cache
        assert hit.status == StatusCode.OK and kv_pb2.GetItemsResponse.FromString(hit.messages()[0]).items
        assert refusal(await get(client, "profiles"))[:2] == (
            StatusCode.RESOURCE_EXHAUSTED,
            'namespace "profiles": rps limit 1 exceeded',
        )
        # A hit takes no place under a concurrency limit: nothing is left held.
        assert all(
            limit.inflight == 0
            for lease in app.settings.admission.quotas.by_namespace.values()
            for limit in lease.limits
        )


async def test_a_tenants_rps_is_shared_by_its_namespaces(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    before = limited("neighbour", "tenant_rps")
    async with served(tmp_path, table({}, {"rps": 2, "burst": 2})) as (_, client):
        assert (await put(client, "profiles")).status == StatusCode.OK
        assert (await put(client, "neighbour")).status == StatusCode.OK
        assert refusal(await put(client, "neighbour")) == (
            StatusCode.RESOURCE_EXHAUSTED,
            'tenant "t": rps limit 2 exceeded',
            "500",
        )
        assert limited("neighbour", "tenant_rps") == before + 1


async def test_a_reload_changes_a_limit_and_keeps_what_was_spent(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with served(tmp_path, table({"profiles": {"rps": 1, "burst": 1}})) as (app, client):
        assert (await put(client, "profiles")).status == StatusCode.OK
        assert (await put(client, "profiles")).status == StatusCode.RESOURCE_EXHAUSTED
        app.apply_limits("t", table({"profiles": {"rps": 1000, "burst": 1}}))  # the bucket stays empty
        async with connection_to(app) as other:  # (``client`` rests before its next read)
            assert refusal(await put(other, "profiles"))[1:] == (
                'namespace "profiles": rps limit 1000 exceeded',
                "1",
            )
        mock_clock.jump(LIMITED_REST_S)  # the rest; and at 1000/s, a token (at 1/s it would not be)
        assert (await put(client, "profiles")).status == StatusCode.OK
        app.apply_limits("t", table({}))  # limits removed: unlimited
        assert not app.settings.admission.quotas.active
        for _ in range(10):
            assert (await put(client, "profiles")).status == StatusCode.OK


def test_a_concurrency_limit_holds_places_until_released() -> None:
    quotas = Quotas()
    quotas.apply("payments", LimitsConfig(concurrency=2), {"a": LimitsConfig(concurrency=1), "b": None}, 0.0)
    lease_a = quotas.by_namespace["a"].admit("a", 0.0)
    with pytest.raises(QuotaExceeded) as info:
        quotas.by_namespace["a"].admit("a", 0.0)
    assert (str(info.value), info.value.reason) == (
        'namespace "a": concurrency limit 1 exceeded',
        "concurrency",
    )
    quotas.by_namespace["b"].admit("b", 0.0)
    with pytest.raises(QuotaExceeded) as info:
        quotas.by_namespace["b"].admit("b", 0.0)
    assert (str(info.value), info.value.reason) == (
        'tenant "payments": concurrency limit 2 exceeded',
        "tenant_concurrency",
    )
    lease_a.release()
    quotas.by_namespace["a"].admit("a", 0.0)  # its own place is free again, and the tenant has one
    with pytest.raises(QuotaExceeded) as info:
        quotas.by_namespace["b"].admit("b", 0.0)
    assert info.value.reason == "tenant_concurrency"


async def test_a_forwarded_call_is_held_to_the_owners_quota_and_its_client_gets_the_pushback(
    ipc_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = Node(1, "a", ipc_dir, tmp_path), Node(2, "b", ipc_dir, tmp_path)
    r = routes(1, {"local": ("a", "keyvalue"), "remote": ("b", "keyvalue")}, a, b)
    r = msgspec.structs.replace(
        r,
        namespaces={
            **r.namespaces,
            "remote": msgspec.structs.replace(r.namespaces["remote"], limits={"rps": 0.1, "burst": 1}),
        },
    )
    # (Real time: at 0.1 rps no token comes back within the test; at 1 rps,
    # a slow CI machine took over a second for the 100 refusals below, and
    # one of them was served.)
    for node in (a, b):
        await node.install(r)
        node.app.apply_limits(node.tenant, r)
    assert not a.app.settings.admission.quotas.active  # the front worker counts nothing for b's namespace
    async with running(a, b), client_of(a) as client:
        with trio.fail_after(5):
            assert (await put(client, "remote")).status == StatusCode.OK
            status, message, pushback = refusal(await put(client, "remote"))
        assert (status, message) == (
            StatusCode.RESOURCE_EXHAUSTED,
            'namespace "remote": rps limit 0.1 exceeded',
        )
        assert pushback is not None and 0 < int(pushback) <= 10_000
        request = kv_pb2.PutItemsRequest(
            namespace="remote", id="r", items=[kv_pb2.Item(key=b"k", value=b"v")]
        )
        answer = await b.remote.serve(forwarded(PUT, request.SerializeToString(), None))
        assert answer.status == StatusCode.RESOURCE_EXHAUSTED and answer.pushback_ms > 0
        # Forwarded refusals leave no reference cycles either (see below).
        gc.collect()
        gc.disable()
        try:
            for _ in range(100):
                assert refusal(await put(client, "remote"))[0] == StatusCode.RESOURCE_EXHAUSTED
            cyclic = gc.collect()
        finally:
            gc.enable()
        assert cyclic < 100, f"{cyclic} objects in reference cycles after 100 forwarded refusals"


async def test_refusals_leave_no_garbage_cycles(mock_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    """A flood refused thousands of times a second must not feed the garbage
    collector: a refusal held in a frame its own traceback holds is a
    reference cycle, and the collections it caused (10-57 ms each) stalled
    every call of the worker."""
    # (Each refusal rests the connection, LIMITED_REST_S: 200 rests are 4 s, 0.04 of a token.)
    async with served(tmp_path, table({"profiles": {"rps": 0.01, "burst": 1}})) as (_, client):
        assert (await get(client, "profiles")).status == StatusCode.OK
        for _ in range(3):  # warm: caches, first-time allocations
            assert refusal(await get(client, "profiles"))[0] == StatusCode.RESOURCE_EXHAUSTED
            mock_clock.jump(LIMITED_REST_S)
        gc.collect()
        gc.disable()
        try:
            for _ in range(200):
                assert refusal(await get(client, "profiles"))[0] == StatusCode.RESOURCE_EXHAUSTED
                mock_clock.jump(LIMITED_REST_S)
            cyclic = gc.collect()
        finally:
            gc.enable()
    assert cyclic < 20, f"{cyclic} objects in reference cycles after 200 refusals"
