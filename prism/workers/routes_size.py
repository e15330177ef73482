"""How large the shared routing table is made, and the config too large for it.

The supervisor sizes the routing table's memfd from the config it starts
with: four times the table that config encodes to (at least
``ROUTES_MIN_BYTES``), so that reloads can add namespaces and workers
without a restart, and at most ``ROUTES_MAX_BYTES``. A config whose table
cannot fit in that bound is refused when it is loaded (one line, exit 2);
a reload whose table does not fit the running server's buffer is rejected
and the running config kept (a restart sizes the buffer again).
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from prism.config import CacheConfig, ServerConfig
from prism.errors import ConfigError
from prism.redact import redact
from prism.router.table import NamespaceEntry, ReloadNote, Routes, TenantEntry, WorkerEntry, slot_capacity
from prism.security.section import section_of

__all__ = [
    "ROUTES_MAX_BYTES",
    "ROUTES_MIN_BYTES",
    "buffer_bytes_for",
    "check_routes_fit",
    "namespace_entries",
    "option_digests",
    "routes_bytes_for",
    "settings_of",
    "tenant_entries",
]

ROUTES_MIN_BYTES: Final = 4 * 1024 * 1024
ROUTES_MAX_BYTES: Final = 256 * 1024 * 1024
# Room for reloads: the buffer holds a table this many times the starting one.
HEADROOM: Final = 4
_PAGE: Final = 4096
# A worker entry with the longest addresses a runtime dir is likely to give.
_PLACEHOLDER_WORKER: Final = WorkerEntry(
    2**31, "t" * 64, 2**31, "ipc://" + "r" * 200 + "/fwd-000000.ipc", "r" * 200 + "/handoff-000000.sock", True
)
_ENCODER: Final = msgspec.msgpack.Encoder()


def namespace_entries(config: ServerConfig, cpus: int) -> dict[str, NamespaceEntry]:
    """The routing table's namespace entries for ``config``: nothing secret
    (no backend options, the cache's Redis URL without its password), since
    every worker of every tenant reads them (``prism.workers.tenant_table``
    carries the rest to the owning tenant's workers only)."""
    return {
        ns.name: NamespaceEntry(
            ns.name,
            tenant.name,
            ns.abstraction,
            ns.backend,
            _public_cache(ns.cache),
            msgspec.to_builtins(ns.limits) if ns.limits is not None else {},
        )
        for tenant in config.effective_tenants(cpus)
        for ns in tenant.namespaces
    }


def _public_cache(cache: CacheConfig) -> dict[str, Any]:
    table: dict[str, Any] = msgspec.to_builtins(cache)
    if table.get("url"):
        table["url"] = redact(table["url"])
    return table


OPTION_DIGEST_BYTES: Final = 8


def option_digests(config: ServerConfig, cpus: int, key: bytes) -> dict[str, bytes]:
    """Each namespace's backend options, digested with ``key`` (``Routes.option_digests``).

    The routing table carries no options (every tenant's workers read it), but
    the admin process must tell whether a new config changes them. A digest
    keyed with a secret of this run (the supervisor's, handed only to the admin
    process) says so, and cannot be checked against guessed passwords by a
    worker that reads the table.
    """
    return {
        ns.name: hashlib.blake2b(
            msgspec.msgpack.encode(ns.options, order="deterministic"),
            key=key,
            digest_size=OPTION_DIGEST_BYTES,
        ).digest()
        for tenant in config.effective_tenants(cpus)
        for ns in tenant.namespaces
    }


def tenant_entries(config: ServerConfig, cpus: int) -> dict[str, TenantEntry]:
    """The routing table's tenant entries for ``config``: each tenant's workers and CPUs."""
    return {t.name: TenantEntry(t.workers, t.cpus) for t in config.effective_tenants(cpus)}


# In the table elsewhere (namespace and tenant entries, the security section).
_NOT_SETTINGS: Final = frozenset({"namespaces", "tenants", "tls", "auth", "access", "audit_writes"})


def settings_of(config: ServerConfig) -> dict[str, Any]:
    """``config``'s other fields as plain data (``Routes.settings``): none holds a secret
    (the token, keys and certificates are files, named by their paths)."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    return {k: v for k, v in data.items() if k not in _NOT_SETTINGS}


def table_payload_bytes(config: ServerConfig, cpus: int) -> int:
    """What ``config``'s routing table encodes to, with every worker listed (an upper bound)."""
    workers = sum(t.workers for t in config.effective_tenants(cpus))
    routes = Routes(
        2**63 - 1,
        namespace_entries(config, cpus),
        dict.fromkeys(range(workers), _PLACEHOLDER_WORKER),
        section_of(config, 2**31),
        tenants=tenant_entries(config, cpus),
        settings=settings_of(config),
        option_digests=option_digests(config, cpus, b"k" * 32),
        # A rejected reload's reason: one line, at most a few hundred bytes.
        reload=ReloadNote(2**31, "f" * 64, "rejected", "r" * 1024),
    )
    return len(_ENCODER.encode(routes))


def routes_bytes_for(config: ServerConfig, cpus: int) -> int:
    """The routing table buffer to create for a server started with ``config``."""
    wanted = max(ROUTES_MIN_BYTES, _buffer_for(HEADROOM * table_payload_bytes(config, cpus)))
    return min(ROUTES_MAX_BYTES, -(-wanted // _PAGE) * _PAGE)


def check_routes_fit(config: ServerConfig, cpus: int, buffer_bytes: int | None = None) -> None:
    """Raise ConfigError if ``config``'s routing table does not fit a buffer of
    ``buffer_bytes`` (default: the largest one a server makes)."""
    payload = table_payload_bytes(config, cpus)
    capacity = slot_capacity(ROUTES_MAX_BYTES if buffer_bytes is None else buffer_bytes)
    if payload > capacity:
        namespaces = sum(len(t.namespaces) for t in config.tenants)
        raise ConfigError(
            f"tenants: {namespaces} namespaces make a routing table of {payload} bytes; "
            f"at most {capacity} fit (fewer namespaces, or shorter names)"
        )


def _buffer_for(payload_bytes: int) -> int:
    # The table's layout: a 64-byte header and two slots, each a 32-byte
    # header and a payload, rounded up to 64 bytes (prism.router.table).
    return 64 + 2 * (-(-(32 + payload_bytes) // 64) * 64)


def buffer_bytes_for(payload_bytes: int) -> int:
    """The smallest whole-page buffer whose slots hold ``payload_bytes``."""
    return -(-_buffer_for(payload_bytes) // _PAGE) * _PAGE
