"""What a new config changes, against the running one as the routing table publishes it."""

from __future__ import annotations

import msgspec

from prism.admin.diff import config_changes, running_digest, worker_counts
from prism.config import load_config_text
from prism.config.server import ServerConfig
from prism.router.table import Routes
from prism.security.section import section_of
from prism.workers.routes_size import namespace_entries, option_digests, settings_of, tenant_entries

CPUS = 4
KEY = b"the key of this run's option digests"[:32]


def config(text: str) -> ServerConfig:
    return load_config_text(text.encode(), "prism.toml", {}, {})


def running(cfg: ServerConfig, generation: int = 5) -> Routes:
    """The routing table the supervisor publishes for ``cfg`` (as Resources.routes_for builds it)."""
    return Routes(
        generation,
        namespace_entries(cfg, CPUS),
        {},
        section_of(cfg, generation),
        tenant_limits={
            t.name: msgspec.to_builtins(t.limits) for t in cfg.effective_tenants(CPUS) if t.limits is not None
        },
        tenants=tenant_entries(cfg, CPUS),
        settings=settings_of(cfg),
        option_digests=option_digests(cfg, CPUS, KEY),
    )


def lines(old: str, new: str) -> list[str]:
    return [c.text for c in config_changes(running(config(old)), config(new), CPUS, KEY)]


BASE = """
[[tenants]]
name = "web"
workers = 2
namespaces = [
  { name = "profiles", backend = "sqlite" },
  { name = "orders", backend = "postgres", options = { dsn = "postgresql://app:hunter2@db/orders" } },
]
[[tenants]]
name = "batch"
namespaces = [{ name = "jobs", backend = "sqlite" }]
"""


def test_the_same_config_changes_nothing() -> None:
    assert lines(BASE, BASE) == []


def test_namespaces_added_removed_and_moved_and_worker_counts() -> None:
    new = """
[[tenants]]
name = "web"
workers = 3
namespaces = [
  { name = "orders", backend = "postgres", options = { dsn = "postgresql://app:hunter2@db/orders" } },
  { name = "jobs", backend = "sqlite" },
]
[[tenants]]
name = "api"
cpus = [0, 1]
namespaces = [{ name = "sessions", abstraction = "keyvalue", backend = "memory" }]
"""
    assert lines(BASE, new) == [
        "~ namespace jobs: moves from tenant batch to tenant web",
        "- namespace profiles: keyvalue on sqlite, tenant web",
        "+ namespace sessions: keyvalue on memory, tenant api",
        "+ tenant api: 1 worker on CPUs 0,1",
        "- tenant batch: 1 worker",
        "~ tenant web: workers 2 -> 3",
    ]


def test_backend_and_option_changes_never_show_a_password() -> None:
    new = BASE.replace("hunter2@db/orders", "s3cret@db2/orders").replace(
        '{ name = "jobs", backend = "sqlite" }',
        '{ name = "jobs", backend = "memory", cache = { enabled = true, ttl_s = 5.0 } }',
    )
    out = lines(BASE, new)
    assert out == [
        '~ namespace jobs: backend "sqlite" -> "memory"',
        "~ namespace jobs: cache.enabled false -> true",
        "~ namespace jobs: cache.ttl_s 30.0 -> 5.0",
        '~ namespace orders: options changed (now {"dsn": "postgresql://app:***@db2/orders"})',
    ]
    assert not any("hunter2" in line or "s3cret" in line for line in out)


def test_a_change_only_in_a_password_is_seen_not_shown() -> None:
    """The table has no options, only digests keyed with the run's secret: a password
    change shows as a change, and neither password is printed."""
    out = lines(BASE, BASE.replace("hunter2", "s3cret"))
    assert out == ['~ namespace orders: options changed (now {"dsn": "postgresql://app:***@db/orders"})']
    table = running(config(BASE))
    assert "hunter2" not in msgspec.json.encode(table).decode()
    assert table.option_digests != running_with_key(config(BASE), b"another key").option_digests


def running_with_key(cfg: ServerConfig, key: bytes) -> Routes:
    return msgspec.structs.replace(running(cfg), option_digests=option_digests(cfg, CPUS, key))


def test_settings_limits_and_restart_only_fields() -> None:
    old = 'log_level = "info"\n' + BASE
    new = 'log_level = "debug"\nlisten = "0.0.0.0:9000"\nmax_inflight = 100\n' + BASE.replace(
        'name = "batch"', 'name = "batch"\nlimits = { rps = 50 }'
    )
    assert lines(old, new) == [
        "~ tenant batch: limits.rps = 50.0 (added)",
        '! listen "127.0.0.1:8980" -> "0.0.0.0:9000": changes only at restart '
        "(a reload keeps the running value)",
        '~ log_level "info" -> "debug"',
        "~ max_inflight 4096 -> 100",
    ]


def test_the_default_tenant_counts_its_resolved_workers() -> None:
    old = '[[namespaces]]\nname = "a"\n'
    new = 'workers = 2\n[[namespaces]]\nname = "a"\n'
    assert lines(old, new) == ["~ tenant default: workers 4 -> 2", "~ workers 0 -> 2"]
    assert worker_counts(tenant_entries(config(new), CPUS)) == {"default": 2}


def test_the_digest_moves_with_the_config_not_with_the_generation() -> None:
    cfg = config(BASE)
    assert running_digest(running(cfg, 5)) == running_digest(running(cfg, 9))
    assert running_digest(running(cfg)) != running_digest(running(config(BASE.replace("workers = 2", ""))))
