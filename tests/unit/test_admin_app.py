"""The admin ASGI app, called directly: what a scraper, a probe or an operator's tool would get back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from prism.admin.app import ASGIApp, make_app
from prism.router.table import (
    NamespaceEntry,
    Routes,
    RoutingTableReader,
    RoutingTableUnavailable,
    RoutingTableWriter,
    WorkerEntry,
)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.body.decode()


async def call(
    app: ASGIApp, path: str, method: str = "GET", headers: tuple[tuple[bytes, bytes], ...] = ()
) -> Response:
    """One HTTP request through the app, as an ASGI server would make it."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"admin"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8981),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    start, *bodies = sent
    assert start["type"] == "http.response.start"
    assert all(m["type"] == "http.response.body" for m in bodies)
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return Response(start["status"], headers, b"".join(m.get("body", b"") for m in bodies), sent)


def worker(wid: int, tenant: str, serving: bool = True) -> WorkerEntry:
    return WorkerEntry(
        id=wid,
        tenant=tenant,
        pid=4000 + wid,
        forward_address=f"ipc:///tmp/w{wid}.fwd",
        handoff_address=f"/tmp/w{wid}.sock",
        serving=serving,
    )


def routes(*workers: WorkerEntry, generation: int = 7) -> Routes:
    namespaces = {
        "orders": NamespaceEntry(
            name="orders",
            tenant="shop",
            abstraction="keyvalue",
            backend="postgres",
            cache={"enabled": True, "ttl_s": 30.0},
        ),
        "events": NamespaceEntry(
            name="events",
            tenant="default",
            abstraction="keyvalue",
            backend="sqlite",
            cache={"tier": "redis", "url": "redis://:r3dispw@cache:6379/0"},
        ),
    }
    return Routes(generation=generation, namespaces=namespaces, workers={w.id: w for w in workers})


def fixed(table: Routes) -> Callable[[], Routes]:
    return lambda: table


def unavailable() -> Routes:
    raise RoutingTableUnavailable("no valid routing table yet: bad magic b'\\x00\\x00\\x00\\x00'")


# -- /metrics ---------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = textwrap.dedent(
    """
    from prism import metrics
    metrics.REQUESTS.labels("ns", "GetItems", "OK").inc()
    """
)


def run_worker_that_counts(multiproc_dir: Path) -> None:
    """A separate process records one call, as a worker would, and exits."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    subprocess.run([sys.executable, "-c", WORKER_SCRIPT], env=env, cwd=REPO_ROOT, check=True, timeout=30)


async def test_metrics_merges_what_another_process_recorded(tmp_path: Path) -> None:
    run_worker_that_counts(tmp_path)
    app = make_app(unavailable, multiproc_dir=tmp_path)

    response = await call(app, "/metrics")

    assert response.status == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert 'prism_requests_total{namespace="ns",operation="GetItems",status="OK"} 1.0' in response.text


async def test_metrics_dir_defaults_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_worker_that_counts(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    response = await call(make_app(unavailable), "/metrics")

    assert response.status == 200
    assert 'operation="GetItems",status="OK"} 1.0' in response.text


async def test_metrics_without_a_multiproc_dir_is_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)

    response = await call(make_app(unavailable), "/metrics")

    assert response.status == 503
    assert "PROMETHEUS_MULTIPROC_DIR is not set" in response.text


async def test_metrics_with_a_missing_dir_is_503(tmp_path: Path) -> None:
    response = await call(make_app(unavailable, multiproc_dir=tmp_path / "gone"), "/metrics")

    assert response.status == 503
    assert response.text.startswith("metrics unavailable:")


# -- /healthz and /readyz ------------------------------------------------------------------------------


async def test_healthz_is_ok_even_without_a_routing_table() -> None:
    response = await call(make_app(unavailable), "/healthz")

    assert (response.status, response.text) == (200, "ok\n")


async def test_readyz_when_every_worker_serves() -> None:
    app = make_app(fixed(routes(worker(1, "shop"), worker(2, "default"))))

    response = await call(app, "/readyz")

    assert (response.status, response.text) == (200, "ready\n")


async def test_readyz_waits_for_a_serving_worker_of_every_namespace() -> None:
    # "orders" belongs to shop, whose only worker still boots: a call for it
    # would find nobody to forward to, so the gateway is not ready.
    app = make_app(fixed(routes(worker(1, "shop", serving=False), worker(3, "default"))))

    response = await call(app, "/readyz")

    assert (response.status, response.text) == (
        503,
        "1 namespace(s) have no serving worker yet (tenant 'shop')\n",
    )


async def test_readyz_is_ready_once_each_tenant_has_one_serving_worker() -> None:
    # Worker 2 (shop) still boots, but worker 1 serves shop's namespaces.
    app = make_app(fixed(routes(worker(1, "shop"), worker(2, "shop", serving=False), worker(3, "default"))))

    response = await call(app, "/readyz")

    assert (response.status, response.text) == (200, "ready\n")


async def test_readyz_without_workers() -> None:
    response = await call(make_app(fixed(routes(generation=4))), "/readyz")

    assert (response.status, response.text) == (503, "no workers in routing table generation 4\n")


async def test_readyz_without_a_routing_table() -> None:
    response = await call(make_app(unavailable), "/readyz")

    assert response.status == 503
    assert response.text.startswith("no valid routing table yet")
    assert response.text.count("\n") == 1


async def test_readyz_reads_a_shared_memory_table() -> None:
    buffer = bytearray(64 * 1024)
    writer = RoutingTableWriter(buffer)
    app = make_app(RoutingTableReader(buffer))
    assert (await call(app, "/readyz")).status == 503  # nothing published yet

    writer.publish(routes(worker(1, "shop", serving=False), generation=1))
    assert (await call(app, "/readyz")).text == "0 of 1 workers serving\n"

    writer.publish(routes(worker(1, "shop"), worker(2, "default"), generation=2))
    assert (await call(app, "/readyz")).status == 200


# -- /v1/namespaces ---------------------------------------------------------------------------------


async def test_namespaces_lists_backends_and_owners_sorted_by_name() -> None:
    table = routes(worker(3, "shop", serving=False), worker(1, "shop"), worker(2, "default"))

    response = await call(make_app(fixed(table)), "/v1/namespaces")

    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body) == {
        "generation": 7,
        "namespaces": [
            {
                "name": "events",
                "tenant": "default",
                "abstraction": "keyvalue",
                "backend": "sqlite",
                "cache": {"tier": "redis", "url": "redis://:***@cache:6379/0"},
                "owners": [{"id": 2, "pid": 4002, "serving": True}],
            },
            {
                "name": "orders",
                "tenant": "shop",
                "abstraction": "keyvalue",
                "backend": "postgres",
                "cache": {"enabled": True, "ttl_s": 30.0},
                "owners": [{"id": 1, "pid": 4001, "serving": True}, {"id": 3, "pid": 4003, "serving": False}],
            },
        ],
    }


async def test_namespaces_show_a_redis_cache_url_without_its_password() -> None:
    # (The routing table holds no backend options at all: prism.workers.tenant_table.)
    response = await call(make_app(fixed(routes(worker(1, "shop")))), "/v1/namespaces")

    assert b"r3dispw" not in response.body  # a Redis cache tier's URL may hold a password
    assert b'"url":"redis://:***@cache:6379/0"' in response.body  # shown, masked


async def test_namespaces_without_a_routing_table_is_503() -> None:
    response = await call(make_app(unavailable), "/v1/namespaces")

    assert response.status == 503


# -- methods and paths -------------------------------------------------------------------------------


async def test_unknown_path_is_404() -> None:
    response = await call(make_app(unavailable), "/v1/secrets")

    assert (response.status, response.text) == (404, "not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(method: str) -> None:
    response = await call(make_app(fixed(routes(worker(1, "shop")))), "/v1/namespaces", method)

    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


async def test_head_has_the_headers_of_get_and_no_body() -> None:
    app = make_app(fixed(routes(worker(1, "shop"))))

    get = await call(app, "/v1/namespaces")
    head = await call(app, "/v1/namespaces", "HEAD")

    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == str(len(get.body)) == get.headers["content-length"]


async def test_lifespan_is_acknowledged() -> None:
    app = make_app(unavailable)
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# -- the admin token ----------------------------------------------------------------------------------

TOKEN = b"s3cret-admin.token~42=="


def bearer(token: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"authorization", b"Bearer " + token),)


def guarded() -> ASGIApp:
    return make_app(fixed(routes(worker(1, "shop"))), token=TOKEN)


@pytest.mark.parametrize(
    "headers",
    [
        (),
        bearer(b"wrong"),
        bearer(TOKEN[:-1]),
        bearer(TOKEN + b"x"),
        ((b"authorization", b"Basic " + TOKEN),),
        ((b"authorization", TOKEN),),
        ((b"authorization", b"Bearer"),),
    ],
)
async def test_v1_without_the_token_is_401(headers: tuple[tuple[bytes, bytes], ...]) -> None:
    response = await call(guarded(), "/v1/namespaces", headers=headers)

    assert response.status == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "orders" not in response.text and "shop" not in response.text


async def test_v1_with_the_token_answers() -> None:
    response = await call(guarded(), "/v1/namespaces", headers=bearer(TOKEN))

    assert response.status == 200
    assert [ns["name"] for ns in json.loads(response.body)["namespaces"]] == ["events", "orders"]
    lower = await call(guarded(), "/v1/namespaces", headers=((b"authorization", b"bearer " + TOKEN),))
    assert lower.status == 200  # the scheme is case-insensitive (RFC 9110)


async def test_unknown_v1_paths_and_other_methods_need_the_token_too() -> None:
    """A 404 or 405 before the token check would tell a stranger which routes exist."""
    assert (await call(guarded(), "/v1/secrets")).status == 401
    assert (await call(guarded(), "/v1/namespaces", method="POST")).status == 401
    assert (await call(guarded(), "/v1/secrets", headers=bearer(TOKEN))).status == 404
    head = await call(guarded(), "/v1/namespaces", method="HEAD")
    assert (head.status, head.body) == (401, b"")


async def test_probes_and_metrics_stay_open_with_a_token(tmp_path: Path) -> None:
    app = make_app(
        fixed(routes(worker(1, "shop"), worker(2, "default"))), multiproc_dir=tmp_path, token=TOKEN
    )

    assert (await call(app, "/healthz")).status == 200
    assert (await call(app, "/readyz")).status == 200
    assert (await call(app, "/metrics")).status == 200
