"""The admin HTTP app: a plain ASGI callable, so hypercorn serves it and tests call it directly.

Four read-only routes and one that writes, no framework: a router table of
five entries does not earn one. Everything a route needs comes from the routing table the supervisor
publishes and from the metric files the workers write, so the admin process
holds no state of its own and can be restarted at any time.

Routes:

- ``GET /metrics``: every worker's samples merged (prometheus-client multiprocess mode).
- ``GET /healthz``: liveness, 200 while this process answers at all.
- ``GET /readyz``: readiness, 200 once every namespace has a serving worker
  (``prism.router.readiness``: the same moment as ``Health.Check("")``).
- ``GET /v1/namespaces``: the namespaces, their backends and owner workers, as JSON.
- ``POST /v1/config``: check a new config, show what it changes, or write it and
  reload (``prism.admin.config_api``; ``prism apply`` calls it).
- ``/v1/migrations...``: live backend migrations (``prism.admin.migrations_api``;
  ``prism migrate`` calls it).

``HEAD`` is accepted wherever ``GET`` is; other methods get 405, unknown paths 404.

With a token (``admin_token_file``), every path under ``/v1/`` (unknown ones
too: the answer does not tell which routes exist) needs ``Authorization:
Bearer <token>``, else 401 with ``WWW-Authenticate: Bearer``. The probes and
``/metrics`` stay open: load balancers and Prometheus call them without
credentials, and they show no namespace or setting.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from prism.admin.config_api import ConfigTarget, config_endpoint
from prism.admin.migrations_api import (
    PREFIX as MIGRATIONS,
)
from prism.admin.migrations_api import (
    MigrationTarget,
    migration_metrics,
    migrations_endpoint,
)
from prism.redact import redact
from prism.router.readiness import not_ready_reason
from prism.router.table import Routes, RoutingTableReader, RoutingTableUnavailable

__all__ = [
    "ASGIApp",
    "Receive",
    "Scope",
    "Send",
    "bearer_token_matches",
    "make_app",
    "namespaces_page",
    "readiness",
    "render_metrics",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TEXT: Final = b"text/plain; charset=utf-8"
_JSON: Final = b"application/json"
_METHODS: Final = frozenset({"GET", "HEAD"})
_GUARDED_PREFIX: Final = "/v1/"

# Only ever the keys below: this API is for operators' tools, not for
# secrets. The routing table carries no backend options (DSNs with passwords
# stay in each tenant's own table), and declaring the output shape (rather
# than dropping keys from the entry) means a field added to NamespaceEntry
# later stays private too. The cache's settings are shown, its Redis URL
# with the password masked (masked in the table already; again here).


class _Owner(msgspec.Struct, frozen=True):
    id: int
    pid: int
    serving: bool


class _Namespace(msgspec.Struct, frozen=True):
    name: str
    tenant: str
    abstraction: str
    backend: str
    cache: dict[str, Any]
    owners: list[_Owner]


class _NamespacesPage(msgspec.Struct, frozen=True):
    generation: int
    namespaces: list[_Namespace]


_json = msgspec.json.Encoder()


class _Response(msgspec.Struct, frozen=True):
    status: int
    body: bytes
    content_type: bytes = _TEXT
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()


def _text(status: int, text: str) -> _Response:
    return _Response(status, (text + "\n").encode())


_UNAUTHORIZED: Final = _Response(
    401,
    b"unauthorized: send Authorization: Bearer <the admin token>\n",
    extra_headers=((b"www-authenticate", b"Bearer"),),
)


def namespaces_page(routes: Routes) -> bytes:
    """The ``/v1/namespaces`` body: namespaces sorted by name, owners by worker id, never options."""
    page = _NamespacesPage(
        generation=routes.generation,
        namespaces=[
            _Namespace(
                name=entry.name,
                tenant=entry.tenant,
                abstraction=entry.abstraction,
                backend=entry.backend,
                cache={k: redact(v) if k == "url" else v for k, v in entry.cache.items()},
                owners=[_Owner(w.id, w.pid, w.serving) for w in routes.owners(name)],
            )
            for name, entry in sorted(routes.namespaces.items())
        ],
    )
    return _json.encode(page)


def readiness(routes: Routes) -> str | None:
    """Why the gateway is not ready (one line), or None: ``prism.router.readiness``
    (every namespace has a serving worker), the definition ``Health.Check("")``
    and systemd's READY=1 use too."""
    return not_ready_reason(routes)


def render_metrics(multiproc_dir: str) -> bytes:
    """Merge every process's metric files into one exposition page (blocking file reads).

    A fresh registry per scrape is prometheus-client's documented multiprocess
    pattern: the collector reads the directory as it is now, including files
    of workers that have died since (their counters must not go backwards).
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)
    return generate_latest(registry)


def bearer_token_matches(headers: list[tuple[bytes, bytes]], token: bytes) -> bool:
    """Whether ``headers`` (ASGI's: lower-case names) carry ``Authorization: Bearer <token>``.

    The comparison takes the same time wherever the first differing byte is,
    so response times do not give the token away a byte at a time.
    """
    for name, value in headers:
        if name == b"authorization":
            scheme, _, given = value.strip().partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
    return False


def make_app(
    routes: RoutingTableReader | Callable[[], Routes],
    multiproc_dir: str | os.PathLike[str] | None = None,
    *,
    token: bytes | None = None,
    config_target: ConfigTarget | None = None,
    migration_target: MigrationTarget | None = None,
) -> ASGIApp:
    """Build the admin ASGI app.

    ``routes`` is the supervisor's routing table (or, in tests, any callable
    returning ``Routes``; it may raise ``RoutingTableUnavailable``).
    ``multiproc_dir`` is where workers write their metric files; it defaults
    to ``PROMETHEUS_MULTIPROC_DIR`` as the supervisor sets it for every child.
    ``token``: the bearer token every ``/v1/`` route requires (None: open).
    ``config_target``: how ``POST /v1/config`` checks, writes and reloads the
    server's config (None: it answers 409).
    """
    current = routes.current if isinstance(routes, RoutingTableReader) else routes
    if multiproc_dir is None:
        multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    metrics_dir = os.fspath(multiproc_dir) if multiproc_dir is not None else None
    # One scrape at a time reads the files: a burst of scrapes then queues on
    # the loop instead of occupying every thread trio would lend it.
    scrape_limiter = trio.CapacityLimiter(1)

    async def metrics() -> _Response:
        if metrics_dir is None:
            return _text(503, "metrics unavailable: PROMETHEUS_MULTIPROC_DIR is not set")
        try:
            body = await trio.to_thread.run_sync(render_metrics, metrics_dir, limiter=scrape_limiter)
            if (
                migration_target is not None
                and (routes := _routes_or_none()) is not None
                and routes.migrations
            ):
                body += await trio.to_thread.run_sync(migration_metrics, routes, migration_target.data_dir)
        except (OSError, ValueError) as exc:  # ValueError: the directory is missing
            return _text(503, f"metrics unavailable: {exc}")
        return _Response(200, body, CONTENT_TYPE_LATEST.encode())

    def _routes_or_none() -> Routes | None:
        try:
            return current()
        except RoutingTableUnavailable:
            return None

    async def healthz() -> _Response:
        return _text(200, "ok")

    async def readyz() -> _Response:
        try:
            reason = readiness(current())
        except RoutingTableUnavailable as exc:
            return _text(503, str(exc).replace("\n", " "))
        return _text(503, reason) if reason is not None else _text(200, "ready")

    async def namespaces() -> _Response:
        try:
            body = namespaces_page(current())
        except RoutingTableUnavailable as exc:
            return _text(503, str(exc).replace("\n", " "))
        return _Response(200, body, _JSON)

    handlers: dict[str, Callable[[], Awaitable[_Response]]] = {
        "/metrics": metrics,
        "/healthz": healthz,
        "/readyz": readyz,
        "/v1/namespaces": namespaces,
    }

    post_config = config_endpoint(config_target, current, token_required=token is not None)
    migrations = migrations_endpoint(migration_target, current, token_required=token is not None)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            await send({"type": "websocket.close", "code": 1000})  # refused: answered 403
            return
        path: str = scope["path"]
        handler = handlers.get(path)
        method = scope["method"]
        if (
            token is not None
            and path.startswith(_GUARDED_PREFIX)
            and not bearer_token_matches(scope["headers"], token)
        ):
            response = _UNAUTHORIZED
        elif path == "/v1/config":
            if method != "POST":
                response = _Response(405, b"method not allowed\n", extra_headers=((b"allow", b"POST"),))
            else:
                status, answer = await post_config(scope, receive)
                response = _Response(status, _json.encode(answer) + b"\n", _JSON)
        elif path == MIGRATIONS or path.startswith(MIGRATIONS + "/"):
            status, answer = await migrations(method, path, scope, receive)
            response = _Response(status, _json.encode(answer) + b"\n", _JSON)
        elif handler is None:
            response = _text(404, "not found")
        elif method not in _METHODS:
            response = _Response(405, b"method not allowed\n", extra_headers=((b"allow", b"GET, HEAD"),))
        else:
            response = await handler()
        await _send(send, response, head=method == "HEAD")

    return app


async def _send(send: Send, response: _Response, *, head: bool) -> None:
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
        (b"cache-control", b"no-store"),
        *response.extra_headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    # HEAD: the same headers (content-length included), no body, as HTTP requires.
    await send({"type": "http.response.body", "body": b"" if head else response.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown: there is nothing to open or close."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
