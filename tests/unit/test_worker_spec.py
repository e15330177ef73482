"""A worker's spec: what it holds of the config, and its trip through a memfd."""

from __future__ import annotations

import os

import msgspec
import pytest

from prism.config import NamespaceConfig, ServerConfig, TenantConfig
from prism.workers.spec import SPEC_FD_ENV, AdminSpec, WorkerSpec, config_for_tenant, read_spec, spec_fd

PG = NamespaceConfig(name="pg", backend="postgres", options={"dsn": "postgresql://u:hunter2@db/x"})
CONFIG = ServerConfig(
    namespaces=(NamespaceConfig(name="top"),),
    tenants=(
        TenantConfig("a", namespaces=(NamespaceConfig(name="a1"), PG)),
        TenantConfig("b", namespaces=(NamespaceConfig(name="b1"),)),
    ),
)


def spec(config: ServerConfig) -> WorkerSpec:
    return WorkerSpec(
        1, "b", None, 3, 4, 4096, 5, 4096, -1, 0, "ipc://c", "ipc://e", "ipc://f", "/h", config, 1
    )


def test_a_tenants_worker_gets_only_its_own_namespaces() -> None:
    mine = config_for_tenant(CONFIG, "b")

    assert [ns.name for ns in mine.all_namespaces()] == ["b1"]
    assert b"hunter2" not in msgspec.json.encode(spec(mine))  # another tenant's DSN
    assert [ns.name for ns in config_for_tenant(CONFIG, "a").all_namespaces()] == ["a1", "pg"]
    assert [ns.name for ns in config_for_tenant(CONFIG, "default").all_namespaces()] == ["top"]
    assert config_for_tenant(CONFIG, "b").max_concurrent_streams == CONFIG.max_concurrent_streams


def test_a_spec_goes_through_its_memfd_and_the_descriptor_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = spec(config_for_tenant(CONFIG, "a"))
    fd = spec_fd(sent)
    monkeypatch.setenv(SPEC_FD_ENV, str(fd))

    assert read_spec(WorkerSpec) == sent
    assert SPEC_FD_ENV not in os.environ  # not handed on to anything the worker starts
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_spec_that_is_not_one_or_no_descriptor_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fd = os.memfd_create("not-a-spec")
    os.write(fd, b'{"listen_fd": "three"}')
    monkeypatch.setenv(SPEC_FD_ENV, str(fd))
    with pytest.raises(msgspec.ValidationError):
        read_spec(AdminSpec)
    monkeypatch.delenv(SPEC_FD_ENV, raising=False)
    with pytest.raises(KeyError):
        read_spec(AdminSpec)
