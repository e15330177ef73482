"""The services one serving process runs, over the namespaces it holds.

``App`` owns the process's backends and the method table (KeyValue, Health,
reflection). ``apply`` brings the held namespaces in line with a new list:
it opens what is new, and retires what was removed or changed. A retired
backend stays open for ``graceful_timeout_s`` so calls already using it
finish, then ``close_retired`` closes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio

from prism import metrics
from prism.api import health, keyvalue, pubsub, reflection, timeseries
from prism.api.pagetoken import PageTokens, load_or_create_key
from prism.backends import registry
from prism.backends.keyvalue import KeyValueBackend
from prism.backends.pubsub import PubSubBackend
from prism.backends.registry import AnyBackend
from prism.backends.timeseries import TimeSeriesBackend
from prism.cache.redis import RedisTier
from prism.cache.shared import SharedCache
from prism.config import NamespaceConfig, ServerConfig
from prism.errors import StatusCode
from prism.rpc.methods import Method, MethodTable
from prism.rpc.server import ServerSettings

log = logging.getLogger("prism.app")

# A backend health probe that takes longer than this counts as down.
HEALTH_TIMEOUT_S = 1.0
# Room for the response's own framing around a page of items.
_PAGE_OVERHEAD_BYTES = 64 * 1024


class App:
    def __init__(
        self,
        config: ServerConfig,
        *,
        shared_cache: SharedCache | None = None,
        remote: keyvalue.Remote | None = None,
        locator: pubsub.Locator | None = None,
    ) -> None:
        self.config = config
        self.backends: dict[str, KeyValueBackend] = {}
        self.ts_backends: dict[str, TimeSeriesBackend] = {}
        self.ps_backends: dict[str, PubSubBackend] = {}
        self.caches: dict[str, keyvalue.CacheTier] = {}
        self._specs: dict[str, NamespaceConfig] = {}
        self._failed: dict[str, NamespaceConfig] = {}  # could not open: retried
        self._retired: list[tuple[float, str, AnyBackend]] = []
        self._shared_cache = shared_cache
        self.health = health.HealthState()
        self.methods = MethodTable()
        self.settings = ServerSettings(
            self.methods,
            max_message_bytes=config.max_message_bytes,
            max_concurrent_streams=config.max_concurrent_streams,
        )
        self.settings.observer = self._observe
        self._data_dir = Path(config.data_dir)
        tokens = PageTokens(load_or_create_key(self._data_dir))
        max_page = max(1024, config.max_message_bytes - _PAGE_OVERHEAD_BYTES)
        self.kv = keyvalue.KeyValue(
            self.backends,
            tokens,
            max_limit_bytes=max_page,
            remote=remote,
            caches=self.caches,
            shared_cache=shared_cache,
        )
        self.methods.add_service(keyvalue.SERVICE, self.kv)
        self.ts = timeseries.TimeSeries(self.ts_backends, tokens, max_limit_bytes=max_page, remote=remote)
        self.methods.add_service(timeseries.SERVICE, self.ts)
        self.pubsub = pubsub.PubSub(self.ps_backends, remote=remote, locator=locator)
        self.methods.add_service(pubsub.SERVICE, self.pubsub)
        self.settings.on_drain.append(self.pubsub.end_streams)
        self.settings.on_drain.append(self.health.enter_drain)
        self.methods.add_service(health.SERVICE, health.Health(self.health))
        names = [*self.methods.service_names, reflection.SERVICE.full_name]
        self.methods.add_service(reflection.SERVICE, reflection.Reflection(names))

    def _observe(self, call: Any, method: Method, status: StatusCode, seconds: float) -> None:
        spec = self._specs.get(call.namespace)
        backend = spec.backend if spec is not None else "forwarded"
        operation = method.name.rpartition("/")[2]
        metrics.record_call(call.namespace, operation, status.name, backend, seconds)

    async def apply(self, namespaces: Iterable[NamespaceConfig], *, strict: bool = False) -> list[str]:
        """Hold exactly ``namespaces``; return the names that failed to open.

        With ``strict`` (at boot) the first failure raises instead: a worker
        that cannot open its backends must not pretend to serve them.
        """
        wanted = {ns.name: ns for ns in namespaces}
        for name in [*self.backends, *self.ts_backends, *self.ps_backends]:
            if name not in wanted:
                self._retire(name)
        for name in list(self._failed):
            if name not in wanted:
                del self._failed[name]
                self.health.forget(name)
        failed = []
        for name, ns in wanted.items():
            if self._specs.get(name) == ns:
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
            if self.holds(name):
                self._retire(name)
            if ns.abstraction == "keyvalue":
                self.backends[name] = backend  # type: ignore[assignment]
            elif ns.abstraction == "pubsub":
                self.ps_backends[name] = backend  # type: ignore[assignment]
            else:
                self.ts_backends[name] = backend  # type: ignore[assignment]
            self._specs[name] = ns
            self.health.set(name, health.SERVING)
            if ns.cache.enabled and ns.cache.tier == "redis":
                self.caches[name] = RedisTier.from_config(name, ns.cache)  # connects on first use
            elif ns.cache.enabled and self._shared_cache is not None:
                self.caches[name] = keyvalue.Cached(
                    self._shared_cache,
                    int(ns.cache.ttl_s * 1000),
                    min(ns.cache.max_value_bytes, self._shared_cache.max_item_bytes),
                )
        return failed

    async def check_health(self) -> None:
        """Probe each backend that can be probed; a namespace is SERVING only
        while its backend answers, and one that failed to open is retried, so
        health (and service) come back by themselves when the backend does."""
        held: list[tuple[str, AnyBackend]] = [
            *self.backends.items(),
            *self.ts_backends.items(),
            *self.ps_backends.items(),
        ]
        for name, backend in held:
            ping = getattr(backend, "ping", None)
            if ping is None:
                continue
            ok = False
            with trio.move_on_after(HEALTH_TIMEOUT_S):
                try:
                    await ping()
                    ok = True
                except Exception:
                    ok = False
            self.health.set(name, health.SERVING if ok else health.NOT_SERVING)
        if self._failed:
            retry, self._failed = list(self._failed.values()), {}
            await self.apply([*self._specs.values(), *retry])

    def holds(self, name: str) -> bool:
        """Whether this process has ``name`` open (any abstraction)."""
        return name in self.backends or name in self.ts_backends or name in self.ps_backends

    def _retire(self, name: str) -> None:
        backend: AnyBackend
        if name in self.backends:
            backend = self.backends.pop(name)
        elif name in self.ps_backends:
            backend = self.ps_backends.pop(name)
            self.pubsub.end_streams(name)
        else:
            backend = self.ts_backends.pop(name)
        self._specs.pop(name, None)
        cache = self.caches.pop(name, None)
        if isinstance(cache, RedisTier):
            cache.close()
        self.health.forget(name)
        self._retired.append((time.monotonic() + self.config.graceful_timeout_s, name, backend))

    async def close_retired(self, *, everything: bool = False) -> None:
        """Close retired backends whose grace period is over (or all of them)."""
        now = time.monotonic()
        keep = []
        for due, name, backend in self._retired:
            if everything or due <= now:
                try:
                    await backend.aclose()
                except Exception as exc:
                    log.warning("namespace %s: error closing backend: %s", name, exc)
            else:
                keep.append((due, name, backend))
        self._retired = keep

    async def aclose(self) -> None:
        for name in [*self.backends, *self.ts_backends, *self.ps_backends]:
            self._retire(name)
        await self.close_retired(everything=True)
