"""The services one serving process runs, over the namespaces it holds.

``App`` owns the process's table of namespaces (``NamespaceTable``: name ->
its config, backend and cache tier) and the method table (KeyValue,
TimeSeries, PubSub over the table's views, Health, reflection). ``apply``
brings the held namespaces in line with a new list: it opens what is new,
and retires what was removed or changed. A retired backend stays open for
``graceful_timeout_s`` so calls already using it finish, then
``close_retired`` closes it.

A namespace whose backend does not open is NOT_SERVING and tried again on
``prism.workers.reopen``'s backoff (``keep_reopening``). At boot
(``strict``) that holds only for a remote backend that cannot be reached
(``Unavailable`` from any backend but ``sqlite`` and ``memory``): a local
fault (a file that cannot be created, a bad option) raises, and the worker
halts the server with exit code 3 and the reason.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
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
from prism.config.quotas import LimitsConfig
from prism.errors import StatusCode, Unavailable
from prism.router.table import Routes
from prism.rpc.call import CallContext
from prism.rpc.methods import Method, MethodTable
from prism.rpc.server import ServerSettings
from prism.workers.reopen import ReopenSchedule

if TYPE_CHECKING:
    from prism.tracing.calls import CallTracing
    from prism.workers.migrating import WorkerMigrations

log = logging.getLogger("prism.app")

# A backend health probe that takes longer than this counts as down.
HEALTH_TIMEOUT_S = 1.0
# Room for the response's own framing around a page of items.
_PAGE_OVERHEAD_BYTES = 64 * 1024
# Metrics label per status: ``StatusCode.name`` is a property of the enum
# machinery, several times the cost of this lookup, and _observe runs per call.
_STATUS_NAMES = {status: status.name for status in StatusCode}
# Backends on this machine: failing to open one is a fault to fix, not an
# outage to wait out, so at boot it halts the server.
LOCAL_BACKENDS = frozenset({"sqlite", "memory"})


def is_unreachable(ns: NamespaceConfig, exc: Exception) -> bool:
    """Whether ``exc``, from opening ``ns``'s backend, says a remote backend
    did not answer (then the namespace waits for it; else the fault is local)."""
    return isinstance(exc, Unavailable) and ns.backend not in LOCAL_BACKENDS


class App:
    """This process's services and the one table of namespaces they serve."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        shared_cache: SharedCache | None = None,
        remote: Remote | None = None,
        locator: pubsub.Locator | None = None,
        tenant: str = "default",
        worker: str = "",
        span_exporter: Any = None,
    ) -> None:
        self.config = config
        self.namespaces = NamespaceTable()
        self._failed: dict[str, NamespaceConfig] = {}  # could not open: retried
        self._unreachable: dict[str, str] = {}  # of those, remote backends down: why
        self._reopen = ReopenSchedule()
        self._reopen_changed = trio.lowlevel.ParkingLot()
        self._retired: list[tuple[float, Held[AnyBackend]]] = []
        self._shared_cache = shared_cache
        self.migrating: WorkerMigrations | None = None  # live migrations (set by the worker)
        self.health = health.HealthState()
        self.methods = MethodTable()
        self.settings = ServerSettings(
            self.methods,
            max_message_bytes=config.max_message_bytes,
            compression_min_bytes=config.compression_min_bytes,
            compress_accepted=config.compress_answers == "accepting_clients",
            max_concurrent_streams=config.streams_per_connection,
            max_header_list_bytes=config.http2.max_header_list_bytes,
            http2=config.http2,
            max_inflight=config.max_inflight,
            drain_timeout_s=config.graceful_timeout_s,
        )
        self.settings.observer = self._observe
        self.tracing: CallTracing | None = None
        if config.tracing.enabled or span_exporter is not None:
            # Imported only here: a worker with tracing off loads none of it.
            from prism.tracing.calls import CallTracing

            self.tracing = CallTracing(config.tracing, tenant=tenant, worker=worker, exporter=span_exporter)
            self.settings.tracing = self.tracing
            self.settings.observer = self._observe_traced
        self.settings.admission.local = self.namespaces.by_name
        self.settings.admission.shedder.configure(config.overload)
        if remote is not None:
            self.settings.forward_now = remote.forward_now
            self.settings.holds = self.holds
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

    def _observe_traced(self, call: CallContext, method: Method, status: StatusCode, seconds: float) -> None:
        self._observe(call, method, status, seconds)
        assert self.tracing is not None
        self.tracing.end(call, method, status, seconds)

    async def apply(self, namespaces: Iterable[NamespaceConfig], *, strict: bool = False) -> list[str]:
        """Hold exactly ``namespaces``; return the names that failed to open.

        With ``strict`` (at boot) a local fault raises instead: a worker
        that cannot open its SQLite file must not pretend to serve it. A
        remote backend that cannot be reached is retried either way.
        """
        wanted = {ns.name: ns for ns in namespaces}
        for held in self.namespaces.held():
            if held.config.name not in wanted:
                self._retire(held.config.name)
        for name in list(self._failed):
            if name not in wanted:
                self._forget_failure(name)
                self.health.forget(name)
        failed = []
        for name, ns in wanted.items():
            current = self.namespaces.by_name.get(name)
            if current is not None and current.config == ns:
                if self.migrating is None or not self.migrating.stale(name, current.backend):
                    continue
            # Open the new backend before the old one (if the namespace's
            # settings changed) steps aside: calls never find neither.
            try:
                backend = await self._open(ns)
            except Exception as exc:
                if strict and not is_unreachable(ns, exc):
                    raise
                self._failed_to_open(ns, exc)
                failed.append(name)
                continue
            self._hold(ns, backend)
        return failed

    def apply_limits(self, tenant: str, routes: Routes) -> None:
        """Hold this worker's namespaces to the quotas of ``routes`` (at boot and on every reload)."""
        tenant_limits = routes.tenant_limits.get(tenant)
        self.settings.admission.quotas.apply(
            tenant,
            msgspec.convert(tenant_limits, LimitsConfig) if tenant_limits else None,
            [
                (e.name, msgspec.convert(e.limits, LimitsConfig) if e.limits else None)
                for e in routes.namespaces.values()
                if e.tenant == tenant
            ],
            trio.current_time(),
        )

    async def _open(self, ns: NamespaceConfig) -> AnyBackend:
        if self.migrating is not None and (moving := await self.migrating.open(ns, self._data_dir)):
            return moving
        await registry.import_off_loop(ns.abstraction, ns.backend)
        backend = registry.create_any(
            ns.abstraction, ns.backend, ns.options, data_dir=self._data_dir, namespace=ns.name
        )
        await backend.open()
        return backend

    def _hold(self, ns: NamespaceConfig, backend: AnyBackend) -> None:
        self._forget_failure(ns.name)
        replaced = self.namespaces.hold(Held(ns, backend, self._cache_tier(ns)))
        if replaced is not None:
            self._close_later(replaced)
        self.health.set(ns.name, health.SERVING)

    def _failed_to_open(self, ns: NamespaceConfig, exc: Exception) -> None:
        name = ns.name
        delay = self._reopen.failed(name, trio.current_time())
        if self._reopen.failures(name) == 1 or self._failed.get(name) != ns:
            log.error(
                "namespace %s: cannot open backend %s: %s; retrying in %.1fs", name, ns.backend, exc, delay
            )
        else:  # the same outage again: one line at debug per attempt, not an error
            log.debug(
                "namespace %s: backend %s still down: %s; retrying in %.1fs", name, ns.backend, exc, delay
            )
        if not self.holds(name):
            self.health.set(name, health.NOT_SERVING)
        self._failed[name] = ns
        if is_unreachable(ns, exc):
            self._unreachable[name] = str(exc)
        else:
            self._unreachable.pop(name, None)
        self._reopen_changed.unpark_all()

    def _forget_failure(self, name: str) -> None:
        if self._failed.pop(name, None) is not None:
            log.info("namespace %s: backend open, serving", name)
        self._unreachable.pop(name, None)
        self._reopen.forget(name)

    def unreachable(self, name: str) -> str | None:
        """Why ``name``'s remote backend could not be opened (its worker is
        retrying), or None."""
        if name in self.namespaces.by_name:
            return None
        return self._unreachable.get(name)

    async def reopen_due(self) -> None:
        """Try again to open the namespaces whose retry is due."""
        for name in self._reopen.due(trio.current_time()):
            ns = self._failed.get(name)
            if ns is None:
                self._reopen.forget(name)  # never due again: the loop must not spin
                continue
            try:
                backend = await self._open(ns)
            except Exception as exc:
                if self._failed.get(name) == ns:  # still wanted as it was
                    self._failed_to_open(ns, exc)
                continue
            if self._failed.get(name) != ns:
                # Removed, changed or opened by a reload while we tried.
                try:
                    await backend.aclose()
                except Exception as exc:
                    log.warning("namespace %s: error closing backend: %s", name, exc)
                continue
            self._hold(ns, backend)

    async def keep_reopening(self) -> None:
        """Run ``reopen_due`` whenever a retry falls due, for good."""
        while True:
            due = self._reopen.next_due()
            with trio.move_on_at(math.inf if due is None else due):
                await self._reopen_changed.park()
            await self.reopen_due()

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
        while its backend answers, so health comes back by itself when the
        backend does (one that failed to open: ``keep_reopening``)."""
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
        if self.tracing is not None:
            # Spans still queued are exported (at most export_timeout_s), off the loop.
            await trio.to_thread.run_sync(self.tracing.shutdown)
