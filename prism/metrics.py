"""Prometheus metrics, in prometheus-client's multiprocess mode.

Every worker writes its samples to files under ``PROMETHEUS_MULTIPROC_DIR``
(set by the supervisor before any worker starts); the admin process merges
them into one page. Label children are cached per label tuple, so recording a
call costs two dict lookups plus the mmap writes: small beside the rest of a
call.

In that mode the files are written by ``prism.metrics_files``, in
prometheus-client's layout, without importing prometheus-client (whose HTTP
exposition alone is ~2.7 MB of every process's memory); without it (code
that runs an App in-process: tests), by prometheus-client, whose registry
then holds the values.
"""

from __future__ import annotations

import os
from typing import Any

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    from prism.metrics_files import Counter, Histogram
else:
    from prometheus_client import Counter, Histogram  # type: ignore[assignment]

REQUESTS = Counter("prism_requests_total", "gRPC calls answered", ["namespace", "operation", "status"])
DURATION = Histogram(
    "prism_request_duration_seconds",
    "Time from a call's last request byte to its answer",
    ["namespace", "operation", "backend"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
CACHE_HITS = Counter(
    "prism_cache_hits_total", "GetItems answered from the cache (shared memory or Redis)", ["namespace"]
)
CACHE_MISSES = Counter(
    "prism_cache_misses_total", "GetItems the cache could not answer (Redis bypassed included)", ["namespace"]
)
FORWARDED = Counter(
    "prism_forwarded_calls_total", "Calls forwarded to another tenant's worker", ["namespace", "operation"]
)
WORKER_RESTARTS = Counter("prism_worker_restarts_total", "Workers replaced by the supervisor", ["tenant"])
HANDOFFS = Counter(
    "prism_connection_handoffs_total", "Connections handed to another tenant's worker", ["tenant"]
)
# The shared-memory cache table's own events (prism/cache/shared.py); both
# are rare, so they are counted where they happen.
SHARED_CACHE_EVICTIONS = Counter(
    "prism_shared_cache_evictions_total", "Live entries of the shared-memory cache replaced by new ones"
)
SHARED_CACHE_CORRUPT = Counter(
    "prism_shared_cache_corrupt_slots_total",
    "Shared-memory cache slots rejected as torn or corrupt (answered as misses)",
)

# What one peer may take (Issue 11): refusals and the connections the
# server closed on a timer. Rare beside calls, but a flood makes them many:
# their children are cached like the rest.
CALLS_REFUSED = Counter(
    "prism_calls_refused_total", "Calls refused before their handler ran (reason: max_inflight)", ["reason"]
)
CALLS_LIMITED = Counter(
    "prism_calls_limited_total",
    "Calls refused by a quota or by overload shedding (reason: rps, concurrency, tenant_rps, "
    "tenant_concurrency, overload)",
    ["namespace", "reason"],
)
CONNECTIONS_REFUSED = Counter(
    "prism_connections_refused_total",
    "Connections closed as soon as accepted (reason: max_connections)",
    ["reason"],
)
CONNECTIONS_CLOSED = Counter(
    "prism_connections_closed_total",
    "Connections the server closed on a timer (reason: handshake_timeout, idle, keepalive_timeout, "
    "max_age: GOAWAY at its age, max_age_drain: its calls outlived the drain timeout)",
    ["reason"],
)

_children: dict[tuple[Any, ...], Any] = {}


def record_call(namespace: str, operation: str, status: str, backend: str, seconds: float) -> None:
    """Count one answered call and its duration."""
    key = (namespace, operation, status, backend)
    pair = _children.get(key)
    if pair is None:
        pair = _children[key] = (
            REQUESTS.labels(namespace, operation, status),
            DURATION.labels(namespace, operation, backend),
        )
    pair[0].inc()
    pair[1].observe(seconds)


def cache_hit(namespace: str) -> None:
    child = _children.get(("hit", namespace))
    if child is None:
        child = _children[("hit", namespace)] = CACHE_HITS.labels(namespace)
    child.inc()


def cache_miss(namespace: str) -> None:
    child = _children.get(("miss", namespace))
    if child is None:
        child = _children[("miss", namespace)] = CACHE_MISSES.labels(namespace)
    child.inc()


def forwarded(namespace: str, operation: str) -> None:
    child = _children.get(("fwd", namespace, operation))
    if child is None:
        child = _children[("fwd", namespace, operation)] = FORWARDED.labels(namespace, operation)
    child.inc()


def call_refused(reason: str) -> None:
    _count(CALLS_REFUSED, "refused call", reason)


def call_limited(namespace: str, reason: str) -> None:
    key = ("limited", namespace, reason)
    child = _children.get(key)
    if child is None:
        child = _children[key] = CALLS_LIMITED.labels(namespace, reason)
    child.inc()


def calls_refused_by_quota(namespace: str, operation: str, reason: str, n: int) -> None:
    """Count ``n`` calls a quota refused as their frames were read
    (``prism.rpc.calls``), answered RESOURCE_EXHAUSTED (no duration observed)."""
    key = ("quota", namespace, operation, reason)
    pair = _children.get(key)
    if pair is None:
        pair = _children[key] = (
            CALLS_LIMITED.labels(namespace, reason),
            REQUESTS.labels(namespace, operation, "RESOURCE_EXHAUSTED"),
        )
    pair[0].inc(n)
    pair[1].inc(n)


def call_shed(operation: str, n: int = 1) -> None:
    """Count ``n`` calls the overload shedder refused as their headers were
    read (``prism.rpc.calls``): their namespace is not known yet, so it is ""."""
    key = ("shed", operation)
    pair = _children.get(key)
    if pair is None:
        pair = _children[key] = (
            CALLS_LIMITED.labels("", "overload"),
            REQUESTS.labels("", operation, "RESOURCE_EXHAUSTED"),
        )
    pair[0].inc(n)
    pair[1].inc(n)


def connection_refused(reason: str) -> None:
    _count(CONNECTIONS_REFUSED, "refused connection", reason)


def connection_closed(reason: str) -> None:
    _count(CONNECTIONS_CLOSED, "closed connection", reason)


def _count(counter: Any, kind: str, reason: str) -> None:
    child = _children.get((kind, reason))
    if child is None:
        child = _children[(kind, reason)] = counter.labels(reason)
    child.inc()
