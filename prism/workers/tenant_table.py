"""Each tenant's own namespaces, backend options included, readable by its workers only.

The routing table (``prism.router.table``) is mapped by every worker of every
tenant, so it carries no backend options: a DSN's password there would be
readable by any tenant's worker. The supervisor publishes each tenant's
namespaces (the whole ``NamespaceConfig``: options, cache, limits) in a memfd
of that tenant's own, passed down only to that tenant's workers (``pass_fds``
per child), in the routing table's layout (seqlock, two slots, digest).

A worker reads it when the routing table's generation moves. The supervisor
writes a tenant's table before the routing table of the same generation, so
the worker finds its namespaces at least as new as the routing table it
acts on: after a reload that changed a DSN or added a namespace too.

Each table is sized when its tenant first appears, with room to grow
(``HEADROOM``); a reload whose namespaces no longer fit a running tenant's
table is rejected (a restart sizes it again), as for the routing table.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Final

import msgspec

from prism.config import NamespaceConfig, ServerConfig
from prism.errors import ConfigError
from prism.migrate.state import MigrationState
from prism.router.table import SharedTableReader, SharedTableWriter, slot_capacity
from prism.workers.routes_size import HEADROOM, buffer_bytes_for

__all__ = ["TenantNamespaces", "TenantTables", "open_tenant_table"]

WHAT: Final = "namespace table"
# Pages of a memfd cost nothing until written: a small tenant's table is
# mostly never touched, and reloads may add many namespaces to it.
MIN_BYTES: Final = 1024 * 1024
MAX_BYTES: Final = 256 * 1024 * 1024
_ENCODER: Final = msgspec.msgpack.Encoder()


class TenantNamespaces(msgspec.Struct, frozen=True):
    """One generation of a tenant's namespaces, as its workers open them."""

    generation: int
    namespaces: tuple[NamespaceConfig, ...]
    # Live migrations of these namespaces (prism.migrate): the target's options may hold a password.
    migrations: tuple[MigrationState, ...] = ()


def table_bytes_for(namespaces: tuple[NamespaceConfig, ...]) -> int:
    """The buffer a tenant with ``namespaces`` gets: room for ``HEADROOM`` times their table."""
    payload = len(_ENCODER.encode(TenantNamespaces(2**63 - 1, namespaces)))
    return min(MAX_BYTES, max(MIN_BYTES, buffer_bytes_for(HEADROOM * payload)))


@dataclass
class _Table:
    fd: int
    size: int
    writer: SharedTableWriter
    published: tuple[NamespaceConfig, ...] | None = None
    migrations: tuple[MigrationState, ...] = ()


class TenantTables:
    """The supervisor's side: one table per tenant, created as tenants appear."""

    def __init__(self) -> None:
        self._tables: dict[str, _Table] = {}

    def fd_of(self, tenant: str) -> tuple[int, int]:
        """The descriptor of ``tenant``'s table and its size, for its workers."""
        table = self._tables[tenant]
        return table.fd, table.size

    def check_fit(self, config: ServerConfig, cpus: int) -> None:
        """Raise ConfigError if a running tenant's namespaces in ``config`` outgrow its table."""
        for tenant in config.effective_tenants(cpus):
            table = self._tables.get(tenant.name)
            if table is None:
                continue  # a new tenant gets a table sized for it
            payload = len(_ENCODER.encode(TenantNamespaces(2**63 - 1, tenant.namespaces)))
            if payload > slot_capacity(table.size):
                raise ConfigError(
                    f"tenants: the namespaces of tenant {tenant.name!r} make a table of {payload} "
                    f"bytes; its running table holds {slot_capacity(table.size)} (restart to grow it)"
                )

    def publish(
        self,
        generation: int,
        config: ServerConfig,
        cpus: int,
        migrations: dict[str, tuple[MigrationState, ...]] | None = None,
    ) -> None:
        """Publish, as ``generation``, the tables of the tenants whose namespaces
        or migrations changed; create those of new tenants; drop those of
        tenants gone (their workers keep their own mapping until they exit)."""
        tenants = config.effective_tenants(cpus)
        for tenant in tenants:
            table = self._tables.get(tenant.name)
            if table is None:
                table = self._tables[tenant.name] = _create(table_bytes_for(tenant.namespaces))
            moving = (migrations or {}).get(tenant.name, ())
            if table.published != tenant.namespaces or table.migrations != moving:
                table.writer.publish(TenantNamespaces(generation, tenant.namespaces, moving))
                table.published, table.migrations = tenant.namespaces, moving
        names = {t.name for t in tenants}
        for name in [n for n in self._tables if n not in names]:
            _close(self._tables.pop(name))

    def close(self) -> None:
        for table in self._tables.values():
            _close(table)
        self._tables.clear()


def _create(size: int) -> _Table:
    # Close-on-exec: a child gets it only through its own pass_fds.
    fd = os.memfd_create("prism-tenant", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        writer = SharedTableWriter(mmap.mmap(fd, size), WHAT)
    except BaseException:
        os.close(fd)
        raise
    return _Table(fd, size, writer)


def _close(table: _Table) -> None:
    table.writer.close()
    os.close(table.fd)


def open_tenant_table(fd: int, size: int) -> SharedTableReader[TenantNamespaces]:
    """A worker's reader of its tenant's table (the descriptor its spec names)."""
    return SharedTableReader(mmap.mmap(fd, size), TenantNamespaces, WHAT)
