"""The routing table's contents: which worker serves which namespace, with
which backend, each tenant's limits and the reload's note. The supervisor
publishes ``Routes`` through a shared table (``prism.router.shared_table``:
the layout, the writer and the readers), and each worker keeps the decoded
``Routes`` until the generation in the header moves.
"""

from __future__ import annotations

import mmap
from typing import Any, Final

import msgspec

from prism.router.shared_table import (
    DEFAULT_SIZE_BYTES,
    RoutingTableTooLarge,
    RoutingTableUnavailable,
    RoutingTableWriter,
    SharedTableReader,
    SharedTableWriter,
    slot_capacity,
)
from prism.security.section import SecuritySection

__all__ = [
    "DEFAULT_SIZE_BYTES",
    "MigrationEntry",
    "NamespaceEntry",
    "ReloadNote",
    "Routes",
    "RoutingTableReader",
    "RoutingTableTooLarge",
    "RoutingTableUnavailable",
    "RoutingTableWriter",
    "SharedTableReader",
    "SharedTableWriter",
    "TenantEntry",
    "WorkerEntry",
    "slot_capacity",
]


class WorkerEntry(msgspec.Struct, frozen=True):
    """A worker process and the addresses other workers reach it on."""

    id: int
    tenant: str
    pid: int
    forward_address: str  # nng address for forwarded calls
    handoff_address: str  # unix socket for connection hand-off (SCM_RIGHTS)
    serving: bool  # False while booting or draining: do not forward to it


class NamespaceEntry(msgspec.Struct, frozen=True):
    """Where a namespace lives: its tenant, abstraction and backend; no secret.

    No backend options: they may hold passwords, and every worker of every
    tenant reads this table. ``cache`` is for operators' eyes (the admin
    process), its Redis URL without a password.
    """

    name: str
    tenant: str
    abstraction: str
    backend: str
    cache: dict[str, Any] = {}
    limits: dict[str, Any] = {}  # prism.config.quotas.LimitsConfig as a table; {}: unlimited


class TenantEntry(msgspec.Struct, frozen=True):
    """A tenant's workers as configured (the tenant ``default``'s count resolved)."""

    workers: int
    cpus: tuple[int, ...] = ()


# ReloadNote.state: no reload yet; the new config was refused (the running one
# serves); accepted, its new workers are starting; in effect; accepted, but a
# tenant's new workers could not boot (that tenant's previous workers serve).
RELOAD_NONE: Final = "none"
RELOAD_REJECTED: Final = "rejected"
RELOAD_PENDING: Final = "pending"
RELOAD_IN_EFFECT: Final = "in_effect"
RELOAD_FAILED: Final = "failed"


class ReloadNote(msgspec.Struct, frozen=True):
    """What became of the latest reload (SIGHUP): how ``POST /v1/config`` learns
    whether the file it wrote was adopted.

    ``file`` identifies the config file the reload read (``prism.config.store.file_identity``,
    taken before reading it), ``serial`` counts reloads since start, ``reason``
    says why one was rejected or failed (passwords masked).
    """

    serial: int = 0
    file: str = ""
    state: str = RELOAD_NONE
    reason: str = ""


class MigrationEntry(msgspec.Struct, frozen=True):
    """A live migration of a namespace (``prism.migrate``), as every process may see it: no options.

    The target's options (a DSN with its password) travel in the owning
    tenant's own table only. ``generation`` is the routing generation that
    first carried ``serial``; ``lagging`` the tenant's workers that have not
    reported (heartbeat) that generation yet: a command is in effect once
    none lags. ``final``: the migration is over (``finished`` or
    ``aborted``) and the namespace is on one backend again.
    """

    namespace: str
    tenant: str
    phase: str
    serial: int
    source_backend: str
    target_backend: str
    rate: int
    shadow_fraction: float
    started_ms: int
    changed_ms: int
    generation: int
    lagging: tuple[int, ...] = ()
    final: bool = False


class Routes(msgspec.Struct, frozen=True):
    """One generation of the routing table, as published by the supervisor.

    ``tenants``, ``settings`` (the config's fields other than namespaces,
    tenants and the security section, as plain data) and ``reload`` serve the
    admin process (``POST /v1/config`` compares a new config with them); the
    workers route with the rest.
    """

    generation: int
    namespaces: dict[str, NamespaceEntry]
    workers: dict[int, WorkerEntry]
    security: SecuritySection = SecuritySection()
    tenant_limits: dict[str, dict[str, Any]] = {}  # tenant -> its limits table (prism.config.quotas)
    # An earlier generation was ready (prism.router.readiness): the gateway
    # booted, and a tenant's workers restarting later do not make it unready.
    ready_once: bool = False
    tenants: dict[str, TenantEntry] = {}
    settings: dict[str, Any] = {}
    reload: ReloadNote = ReloadNote()
    # namespace -> a keyed digest of its backend options (prism.workers.routes_size.option_digests):
    # tells the admin process an option changed without the options, or anything to guess them from.
    option_digests: dict[str, bytes] = {}
    # namespace -> its live (or last finished) migration; request id -> (serial
    # to wait for, HTTP status, "" or the one-line reason it was refused), the
    # latest few: how POST /v1/migrations learns what became of its request.
    migrations: dict[str, MigrationEntry] = {}
    migration_answers: dict[str, tuple[int, int, str]] = {}

    def owners(self, namespace: str) -> list[WorkerEntry]:
        """Workers of the tenant that owns ``namespace`` (by id), or [] if it is unknown.

        Draining and booting workers are included: the caller picks among
        those with ``serving`` set, so it can tell "nobody serving right now"
        from "no such namespace".
        """
        entry = self.namespaces.get(namespace)
        if entry is None:
            return []
        return self.tenant_workers(entry.tenant)

    def tenant_workers(self, tenant: str) -> list[WorkerEntry]:
        """Workers of ``tenant``, ordered by id so every worker picks the same one first."""
        return sorted((w for w in self.workers.values() if w.tenant == tenant), key=lambda w: w.id)


class RoutingTableReader(SharedTableReader[Routes]):
    """A worker's view of the routing table (see ``SharedTableReader``)."""

    def __init__(self, buffer: mmap.mmap | bytearray) -> None:
        super().__init__(buffer, Routes)
