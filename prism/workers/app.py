"""The services one serving process runs, over the namespaces it holds.

``App`` owns the process's table of namespaces (``NamespaceTable``: name ->
its config, backend and cache tier) and the method table (KeyValue,
TimeSeries, PubSub over the table's views, Health, reflection). ``apply``
brings the held namespaces in line with a new list: it opens what is new,
and retires what was removed or changed. A retired backend stays open for
``graceful_timeout_s`` so calls already using it finish, then
``close_retired`` closes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import trio

from prism import metrics
from prism.api import health, keyvalue, pubsub, reflection, timeseries
from prism.api.namespaces import Cached, CacheTier, Held, NamespaceTable, Remote
from prism.api.pagetoken import PageTokens, load_or_create_key
from prism.backends import registry
from prism.backends.registry import AnyBackend
from prism.cache.redis import RedisTier
from prism.cache.shared import SharedCache
from prism.config import NamespaceConfig, ServerConfig
from prism.errors import StatusCode
from prism.rpc.call import CallContext
from prism.rpc.methods import Method, MethodTable
from prism.rpc.server import ServerSettings

log = logging.getLogger("prism.app")

# A backend health probe that takes longer than this counts as down.
HEALTH_TIMEOUT_S = 1.0
# Room for the response's own framing around a page of items.
_PAGE_OVERHEAD_BYTES = 64 * 1024
# Metrics label per status: ``StatusCode.name`` is a property of the enum
# machinery, several times the cost of this lookup, and _observe runs per call.
_STATUS_NAMES = {status: status.name for status in StatusCode}


class App:
    """This process's services and the one table of namespaces they serve."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        shared_cache: SharedCache | None = None,
        remote: Remote | None = None,
        locator: pubsub.Locator | None = None,
    ) -> None:
        self.config = config
        self.namespaces = NamespaceTable()
        self._failed: dict[str, NamespaceConfig] = {}  # could not open: retried
        self._retired: list[tuple[float, Held[AnyBackend]]] = []
        self._shared_cache = shared_cache
        self.health = health.HealthState()
        self.methods = MethodTable()
        self.settings = ServerSettings(
            self.methods,
            max_message_bytes=config.max_message_bytes,
            max_concurrent_streams=config.streams_per_connection,
            max_header_list_bytes=config.http2.max_header_list_bytes,
            http2=config.http2,
            max_inflight=config.max_inflight,
            drain_timeout_s=config.graceful_timeout_s,
        )
        self.settings.observer = self._observe
        if remote is not None:
            self.settings.forward_now = remote.forward_now
        self._data_dir = Path(config.data_dir)
        tokens = PageTokens(load_or_create_key(self._data_dir))
        max_page = max(1024, config.max_message_bytes - _PAGE_OVERHEAD_BYTES)
        table = self.namespaces
        self.kv = keyvalue.KeyValue(
            table.keyvalue, tokens, max_limit_bytes=max_page, remote=remote, shared_cache=shared_cache
        )
        self.methods.add_service(keyvalue.SERVICE, self.kv)
        self.ts = timeseries.TimeSeries(table.timeseries, tokens, max_limit_bytes=max_page, remote=remote)
        self.methods.add_service(timeseries.SERVICE, self.ts)
        self.pubsub = pubsub.PubSub(table.pubsub, remote=remote, locator=locator)
        self.methods.add_service(pubsub.SERVICE, self.pubsub)
        self.settings.on_drain.append(self.pubsub.end_streams)
        self.settings.on_drain.append(self.health.enter_drain)
        self.methods.add_service(health.SERVICE, health.Health(self.health))
        names = [*self.methods.service_names, reflection.SERVICE.full_name]
        self.methods.add_service(reflection.SERVICE, reflection.Reflection(names))

    def _observe(self, call: CallContext, method: Method, status: StatusCode, seconds: float) -> None:
        held = self.namespaces.by_name.get(call.namespace)
        backend = held.config.backend if held is not None else "forwarded"
        metrics.record_call(call.namespace, method.operation, _STATUS_NAMES[status], backend, seconds)

    async def apply(self, namespaces: Iterable[NamespaceConfig], *, strict: bool = False) -> list[str]:
        """Hold exactly ``namespaces``; return the names that failed to open.

        With ``strict`` (at boot) the first failure raises instead: a worker
        that cannot open its backends must not pretend to serve them.
        """
        wanted = {ns.name: ns for ns in namespaces}
        for held in self.namespaces.held():
            if held.config.name not in wanted:
                self._retire(held.config.name)
        for name in list(self._failed):
            if name not in wanted:
                del self._failed[name]
                self.health.forget(name)
        failed = []
        for name, ns in wanted.items():
            current = self.namespaces.by_name.get(name)
            if current is not None and current.config == ns:
                continue
            # Open the new backend before the old one (if the namespace's
            # settings changed) steps aside: calls never find neither.
            try:
                backend = registry.create_any(
                    ns.abstraction, ns.backend, ns.options, data_dir=self._data_dir, namespace=name
                )
                await backend.open()
            except Exception as exc:
                if strict:
                    raise
                log.error("namespace %s: cannot open backend %s: %s", name, ns.backend, exc)
                if not self.holds(name):
                    self.health.set(name, health.NOT_SERVING)
                self._failed[name] = ns  # check_health tries again
                failed.append(name)
                continue
            self._failed.pop(name, None)
            replaced = self.namespaces.hold(Held(ns, backend, self._cache_tier(ns)))
            if replaced is not None:
                self._close_later(replaced)
            self.health.set(name, health.SERVING)
        return failed

    def _cache_tier(self, ns: NamespaceConfig) -> CacheTier | None:
        if not ns.cache.enabled:
            return None
        if ns.cache.tier == "redis":
            return RedisTier.from_config(ns.name, ns.cache)  # connects on first use
        if self._shared_cache is None:
            return None
        return Cached(
            self._shared_cache,
            int(ns.cache.ttl_s * 1000),
            min(ns.cache.max_value_bytes, self._shared_cache.max_item_bytes),
        )

    async def check_health(self) -> None:
        """Probe each backend that can be probed; a namespace is SERVING only
        while its backend answers, and one that failed to open is retried, so
        health (and service) come back by themselves when the backend does."""
        for held in self.namespaces.held():
            ping = getattr(held.backend, "ping", None)
            if ping is None:
                continue
            ok = False
            with trio.move_on_after(HEALTH_TIMEOUT_S):
                try:
                    await ping()
                    ok = True
                except Exception:
                    ok = False
            self.health.set(held.config.name, health.SERVING if ok else health.NOT_SERVING)
        if self._failed:
            retry, self._failed = list(self._failed.values()), {}
            await self.apply([*(held.config for held in self.namespaces.held()), *retry])

    def holds(self, name: str) -> bool:
        """Whether this process has ``name`` open (any abstraction)."""
        return name in self.namespaces.by_name

    def _retire(self, name: str) -> None:
        held = self.namespaces.release(name)
        if held is not None:
            self.health.forget(name)
            self._close_later(held)

    def _close_later(self, held: Held[AnyBackend]) -> None:
        """Let go of a namespace no longer held (removed, or replaced by one
        with new settings): unary calls already using its backend finish
        within the grace period; its Subscribe streams end now (their clients
        subscribe again, on the new backend if there is one)."""
        self.pubsub.end_streams(held.config.name)
        if isinstance(held.cache, RedisTier):
            held.cache.close()
        self._retired.append((time.monotonic() + self.config.graceful_timeout_s, held))

    async def close_retired(self, *, everything: bool = False) -> None:
        """Close retired backends whose grace period is over (or all of them)."""
        now = time.monotonic()
        keep = []
        for due, held in self._retired:
            if everything or due <= now:
                try:
                    await held.backend.aclose()
                except Exception as exc:
                    log.warning("namespace %s: error closing backend: %s", held.config.name, exc)
            else:
                keep.append((due, held))
        self._retired = keep

    async def aclose(self) -> None:
        for held in self.namespaces.held():
            self._retire(held.config.name)
        await self.close_retired(everything=True)
