"""Each tenant's own namespace table: what its workers open, options included."""

from __future__ import annotations

import mmap

import pytest

from prism.config import NamespaceConfig, ServerConfig, TenantConfig
from prism.errors import ConfigError
from prism.workers.routes_size import namespace_entries
from prism.workers.tenant_table import MIN_BYTES, TenantNamespaces, TenantTables, open_tenant_table

PG = NamespaceConfig(name="pg", backend="postgres", options={"dsn": "postgresql://u:hunter2@db/x"})


def config(*a_namespaces: NamespaceConfig) -> ServerConfig:
    return ServerConfig(
        tenants=(
            TenantConfig("a", namespaces=a_namespaces),
            TenantConfig("b", namespaces=(NamespaceConfig(name="b1", backend="memory"),)),
        )
    )


def reader(tables: TenantTables, tenant: str):  # type: ignore[no-untyped-def]
    return open_tenant_table(*tables.fd_of(tenant))


def test_each_tenant_reads_its_own_namespaces_with_their_options() -> None:
    tables = TenantTables()
    try:
        tables.publish(1, config(PG), cpus=2)
        a, b = reader(tables, "a"), reader(tables, "b")

        assert a.current() == TenantNamespaces(1, (PG,))
        assert [ns.name for ns in b.current().namespaces] == ["b1"]
        assert tables.fd_of("a")[1] == MIN_BYTES
    finally:
        tables.close()


def test_the_routing_table_entries_carry_no_backend_option() -> None:
    entries = namespace_entries(config(PG), cpus=2)

    assert (entries["pg"].tenant, entries["pg"].backend) == ("a", "postgres")
    assert not hasattr(entries["pg"], "options")
    assert "hunter2" not in repr(entries)


def test_a_reload_publishes_the_changed_tenants_only_and_drops_the_gone() -> None:
    tables = TenantTables()
    try:
        tables.publish(1, config(PG), cpus=2)
        a, b = reader(tables, "a"), reader(tables, "b")
        moved = NamespaceConfig(name="pg", backend="postgres", options={"dsn": "postgresql://u:new@db2/x"})

        tables.publish(5, config(moved, NamespaceConfig(name="a2")), cpus=2)

        assert a.current() == TenantNamespaces(5, (moved, NamespaceConfig(name="a2")))
        assert b.current().generation == 1  # unchanged: not written again
        tables.publish(6, ServerConfig(tenants=(TenantConfig("b", namespaces=(NamespaceConfig("b1"),)),)), 2)
        with pytest.raises(KeyError):
            tables.fd_of("a")
        assert a.current().generation == 5  # a's retiring workers keep their mapping
    finally:
        tables.close()


def test_a_reload_outgrowing_a_running_tenants_table_is_refused() -> None:
    tables = TenantTables()
    try:
        tables.publish(1, config(PG), cpus=2)
        big = tuple(NamespaceConfig(name=f"{i:0120d}") for i in range(3000))  # over a 1 MiB buffer

        with pytest.raises(ConfigError, match=r"tenant 'a'.*restart to grow it"):
            tables.check_fit(config(*big), cpus=2)
        tables.check_fit(config(*big[:300]), cpus=2)  # fits: no error
    finally:
        tables.close()


def test_a_torn_table_is_never_read() -> None:
    tables = TenantTables()
    try:
        tables.publish(1, config(PG), cpus=2)
        fd, size = tables.fd_of("a")
        with mmap.mmap(fd, size) as raw:
            raw[64 + 40] ^= 0xFF  # a payload byte of slot 0, behind the digest's back
        with pytest.raises(Exception, match="no valid namespace table yet"):
            reader(tables, "a").current()
    finally:
        tables.close()
