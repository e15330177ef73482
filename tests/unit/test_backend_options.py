"""Backend options are checked when the config loads: one line naming the field.

For every engine, an unknown option, a wrong type and an out-of-range value
stop ``prism serve`` with exit code 2 and one line naming
``namespaces[N].options.FIELD`` (or ``tenants[T].namespaces[N]...``), before
the server module is imported. No service is contacted: checking a DSN or a
URL is parsing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prism import cli
from prism.backends import catalog, registry
from prism.backends.memory.options import MemoryKeyValueOptions
from prism.backends.nats.options import NatsPubSubOptions
from prism.backends.postgres.options import PostgresKeyValueOptions
from prism.backends.sqlite.options import SqliteTimeSeriesOptions
from prism.config import ServerConfig, load_config
from prism.errors import ConfigError


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./prism.toml but the test's own
    monkeypatch.delenv("PRISM_CONFIG", raising=False)


def namespace_toml(abstraction: str, backend: str, options: str) -> str:
    return (
        f'[[namespaces]]\nname = "n"\nabstraction = "{abstraction}"\nbackend = "{backend}"\n'
        f"options = {{ {options} }}\n"
    )


def load_error(toml: str) -> str:
    Path("prism.toml").write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {})
    message = str(info.value)
    assert "\n" not in message
    return message


# (abstraction, backend, options, the line's start). For each engine: an
# unknown option, a wrong type, an out-of-range value, then what types cannot say.
BAD = [
    ("keyvalue", "memory", "size = 1", "namespaces[0].options.size: unknown field"),
    ("timeseries", "memory", "retention = 1", "namespaces[0].options.retention: unknown field"),
    (
        "timeseries",
        "memory",
        'retention_days = "7"',
        "namespaces[0].options.retention_days: expected float, got str",
    ),
    (
        "timeseries",
        "memory",
        "retention_days = -1",
        "namespaces[0].options.retention_days: expected float >= 0.0",
    ),
    ("pubsub", "memory", "max_message = 5", "namespaces[0].options.max_message: unknown field"),
    ("pubsub", "memory", "ack_wait_ms = 1.5", "namespaces[0].options.ack_wait_ms: expected int, got float"),
    ("pubsub", "memory", "max_messages = 0", "namespaces[0].options.max_messages: expected int >= 1"),
    (
        "pubsub",
        "memory",
        "dedup_window_s = -0.5",
        "namespaces[0].options.dedup_window_s: expected float >= 0.0",
    ),
    ("keyvalue", "sqlite", 'pth = "x"', "namespaces[0].options.pth: unknown field"),
    ("keyvalue", "sqlite", "path = 3", "namespaces[0].options.path: expected str, got int"),
    ("keyvalue", "sqlite", 'path = ""', "namespaces[0].options.path: expected str of length >= 1"),
    (
        "keyvalue",
        "sqlite",
        'synchronous = "OFF"',
        "namespaces[0].options.synchronous: 'OFF' is not 'FULL' or 'NORMAL'",
    ),
    ("timeseries", "sqlite", "coalesce_reads = true", "namespaces[0].options.coalesce_reads: unknown field"),
    (
        "timeseries",
        "sqlite",
        "retention_days = true",
        "namespaces[0].options.retention_days: expected float, got bool",
    ),
    ("keyvalue", "postgres", "pool = 3", "namespaces[0].options.pool: unknown field"),
    (
        "keyvalue",
        "redis",
        'require_persistence = "yes"',
        "namespaces[0].options.require_persistence: expected bool, got str",
    ),
    (
        "keyvalue",
        "redis",
        "require_persistence = 1",
        "namespaces[0].options.require_persistence: expected bool",
    ),
    (
        "keyvalue",
        "sqlite",
        "require_persistence = true",
        "namespaces[0].options.require_persistence: unknown",
    ),
    (
        "keyvalue",
        "postgres",
        'coalesce_reads = "yes"',
        "namespaces[0].options.coalesce_reads: expected bool, got str",
    ),
    ("keyvalue", "postgres", "pool_size = 0", "namespaces[0].options.pool_size: expected int >= 1"),
    (
        "keyvalue",
        "postgres",
        "pool_timeout_s = 0",
        "namespaces[0].options.pool_timeout_s: expected float > 0.0",
    ),
    ("keyvalue", "postgres", 'dsn = "host=x port"', "namespaces[0].options.dsn: is invalid: "),
    ("keyvalue", "postgres", 'dsn = ""', "namespaces[0].options.dsn: expected str of length >= 1"),
    (
        "timeseries",
        "postgres",
        "coalesce_writes = false",
        "namespaces[0].options.coalesce_writes: unknown field",
    ),
    (
        "timeseries",
        "postgres",
        "connect_timeout_s = -1",
        "namespaces[0].options.connect_timeout_s: expected float > 0.0",
    ),
    ("keyvalue", "redis", 'prefix = "p:"', "namespaces[0].options.prefix: unknown field"),
    ("keyvalue", "redis", "key_prefix = 1", "namespaces[0].options.key_prefix: expected str, got int"),
    ("keyvalue", "redis", "pool_size = -2", "namespaces[0].options.pool_size: expected int >= 1"),
    (
        "keyvalue",
        "redis",
        'url = "http://h:1"',
        "namespaces[0].options.url: expected a redis:// or rediss:// URL, got scheme 'http'",
    ),
    (
        "keyvalue",
        "redis",
        'url = "redis://h:99999/0"',
        "namespaces[0].options.url: the port is not a number in 1-65535",
    ),
    (
        "keyvalue",
        "redis",
        'url = "redis://h/zero"',
        "namespaces[0].options.url: the database 'zero' is not a number",
    ),
    (
        "keyvalue",
        "redis",
        'url = "redis://h/0", ca_file = "/etc/prism/ca.pem"',
        "namespaces[0].options.ca_file: is only used with a rediss:// URL",
    ),
    ("pubsub", "nats", "bogus = 1", "namespaces[0].options.bogus: unknown field"),
    ("pubsub", "nats", "stream = 5", "namespaces[0].options.stream: expected str, got int"),
    ("pubsub", "nats", 'stream = "a.b"', "namespaces[0].options.stream: expected str matching regex"),
    ("pubsub", "nats", "ack_wait_ms = 0", "namespaces[0].options.ack_wait_ms: expected int >= 1"),
    (
        "pubsub",
        "nats",
        'url = "redis://h:4222"',
        "namespaces[0].options.url: expected a nats:// or tls:// URL, got scheme 'redis'",
    ),
    (
        "pubsub",
        "nats",
        'url = "nats://h:port"',
        "namespaces[0].options.url: the port is not a number in 1-65535",
    ),
    # Upper bounds: a few zeros too many, or TOML's inf, is refused at load.
    ("keyvalue", "postgres", "pool_size = 100000", "namespaces[0].options.pool_size: expected int <= 1024"),
    (
        "keyvalue",
        "redis",
        "connect_timeout_s = inf",
        "namespaces[0].options.connect_timeout_s: expected float <= 3600",
    ),
    (
        "timeseries",
        "sqlite",
        "retention_days = 1e9",
        "namespaces[0].options.retention_days: expected float <= 36500",
    ),
    (
        "pubsub",
        "memory",
        "max_messages = 1000000000",
        "namespaces[0].options.max_messages: expected int <= 100000000",
    ),
    ("pubsub", "nats", "dedup_window_s = nan", "namespaces[0].options.dedup_window_s: expected float"),
    # Every KeyValue backend keeps a delete's tombstones for tombstone_ttl_s: more than 0, at most a year.
    (
        "keyvalue",
        "memory",
        "tombstone_ttl_s = 0",
        "namespaces[0].options.tombstone_ttl_s: expected float > 0.0",
    ),
    (
        "keyvalue",
        "sqlite",
        "tombstone_ttl_s = -1",
        "namespaces[0].options.tombstone_ttl_s: expected float > 0.0",
    ),
    (
        "keyvalue",
        "postgres",
        'tombstone_ttl_s = "1d"',
        "namespaces[0].options.tombstone_ttl_s: expected float, got str",
    ),
    (
        "keyvalue",
        "redis",
        "tombstone_ttl_s = inf",
        "namespaces[0].options.tombstone_ttl_s: expected float <= 31536000",
    ),
    ("keyvalue", "redis", "tombstone_ttl_s = nan", "namespaces[0].options.tombstone_ttl_s: expected float"),
    ("timeseries", "sqlite", "tombstone_ttl_s = 60", "namespaces[0].options.tombstone_ttl_s: unknown field"),
]


@pytest.mark.parametrize(("abstraction", "backend", "options", "expected"), BAD)
def test_bad_option_is_one_line_naming_the_field(
    abstraction: str, backend: str, options: str, expected: str
) -> None:
    message = load_error(namespace_toml(abstraction, backend, options))
    assert message.startswith(expected)
    assert message.endswith("(from prism.toml)")


@pytest.mark.parametrize(("abstraction", "backend", "options", "expected"), BAD)
def test_prism_serve_exits_2_with_one_line_before_importing_the_server(
    abstraction: str,
    backend: str,
    options: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    Path("bad.toml").write_text(namespace_toml(abstraction, backend, options), encoding="utf-8")
    monkeypatch.setitem(sys.modules, "prism.server", None)  # importing it would fail loudly

    assert cli.main(["serve", "--config", "bad.toml"]) == 2

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"prism: config error: {expected}")
    assert lines[0].endswith("(from bad.toml)")


def test_a_tenants_namespace_is_named_by_its_tenant() -> None:
    toml = """
[[tenants]]
name = "a"
[[tenants]]
name = "b"
[[tenants.namespaces]]
name = "ok"
[[tenants.namespaces]]
name = "orders"
backend = "postgres"
options = { pool_size = 0 }
"""
    assert load_error(toml).startswith("tenants[1].namespaces[1].options.pool_size: expected int >= 1")


def test_a_url_with_a_password_is_never_repeated() -> None:
    message = load_error(namespace_toml("keyvalue", "redis", 'url = "https://u:s3cret@h:1/0"'))
    assert message.startswith("namespaces[0].options.url: expected a redis:// or rediss:// URL")
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("abstraction", "backend", "expected"),
    [
        (
            "keyvalue",
            "cassandra",
            "namespaces[0].backend: unknown backend 'cassandra';"
            " known backends: memory, postgres, redis, sqlite",
        ),
        (
            "timeseries",
            "redis",
            "namespaces[0].backend: unknown timeseries backend 'redis'; known: memory, postgres, sqlite",
        ),
        ("pubsub", "sqlite", "namespaces[0].backend: unknown pubsub backend 'sqlite'; known: memory, nats"),
    ],
)
def test_unknown_backend_is_named(abstraction: str, backend: str, expected: str) -> None:
    assert load_error(namespace_toml(abstraction, backend, "")) == f"{expected} (from prism.toml)"


def test_good_options_load_and_convert_to_the_engines_struct() -> None:
    Path("prism.toml").write_text(
        namespace_toml(
            "keyvalue", "postgres", 'dsn = "host=db dbname=app", pool_size = 3, pool_timeout_s = 1'
        )
        + namespace_toml(
            "timeseries", "sqlite", 'path = "ts.db", synchronous = "normal", retention_days = 7'
        ).replace('name = "n"', 'name = "t"')
        + namespace_toml("keyvalue", "memory", "tombstone_ttl_s = 3600").replace('name = "n"', 'name = "m"')
        + namespace_toml("pubsub", "nats", 'url = "nats://tok@h:4333", ack_wait_ms = 500').replace(
            'name = "n"', 'name = "p"'
        ),
        encoding="utf-8",
    )
    config = load_config(None, {}, {})
    pg, ts, mem, ps = config.namespaces
    assert pg.options == {
        "dsn": "host=db dbname=app",
        "pool_size": 3,
        "pool_timeout_s": 1,
    }  # a plain table still
    assert catalog.check(pg.abstraction, pg.backend, pg.options) == PostgresKeyValueOptions(
        dsn="host=db dbname=app", pool_size=3, pool_timeout_s=1.0
    )
    assert catalog.check(ts.abstraction, ts.backend, ts.options) == SqliteTimeSeriesOptions(
        path="ts.db", synchronous="NORMAL", retention_days=7.0
    )
    assert catalog.check(mem.abstraction, mem.backend, mem.options) == MemoryKeyValueOptions(3600.0)
    assert PostgresKeyValueOptions().tombstone_ttl_s == 86_400.0  # a day by default, like tokens
    assert catalog.check(ps.abstraction, ps.backend, ps.options) == NatsPubSubOptions(
        url="nats://tok@h:4333", ack_wait_ms=500
    )


def test_direct_construction_checks_options_too() -> None:
    from prism.config import NamespaceConfig

    with pytest.raises(ConfigError, match=r"^namespaces\[0\]\.options\.pool_size: expected int >= 1$"):
        ServerConfig(namespaces=(NamespaceConfig("n", backend="redis", options={"pool_size": 0}),))


def test_an_installed_plugin_keeps_its_options_table(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata
    from importlib.metadata import EntryPoint, EntryPoints

    def fake_entry_points(*, group: str, name: str | None = None) -> EntryPoints:
        eps = [EntryPoint("cassandra", "nowhere:factory", group)]
        return EntryPoints(ep for ep in eps if name is None or ep.name == name)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    Path("prism.toml").write_text(
        namespace_toml("keyvalue", "cassandra", 'anything = "goes"'), encoding="utf-8"
    )
    (ns,) = load_config(None, {}, {}).namespaces  # the plugin's factory checks them in the worker
    assert ns.options == {"anything": "goes"}
    assert catalog.check("keyvalue", "cassandra", ns.options) is None
    # A plugin serves KeyValue only.
    assert "unknown timeseries backend 'cassandra'" in load_error(
        namespace_toml("timeseries", "cassandra", "")
    )


def test_the_catalog_and_the_registry_name_the_same_backends() -> None:
    built = (
        {("keyvalue", n) for n in registry._factories}
        | {("timeseries", n) for n in registry._timeseries}
        | {("pubsub", n) for n in registry._pubsub}
    )
    assert built == set(catalog.OPTIONS)


def test_loading_a_config_with_every_engine_imports_no_trio_and_no_driver() -> None:
    # The supervisor process loads (and reloads) the config: it must never
    # import trio, a driver or a backend. psycopg is allowed (a DSN check).
    toml = "".join(
        namespace_toml(a, b, "").replace('name = "n"', f'name = "n{i}"')
        for i, (a, b) in enumerate(catalog.OPTIONS)
    )
    script = textwrap.dedent(
        f"""
        import sys
        from prism.config import load_config
        from prism.workers.preflight import check_deployable
        with open("prism.toml", "w") as f:
            f.write({toml!r})
        config = load_config(None, {{}}, {{}})
        check_deployable(config)
        assert len(config.namespaces) == {len(catalog.OPTIONS)}
        loaded = [m for m in sys.modules if m == "trio" or m.startswith(("prism.drivers.resp",
                  "prism.drivers.nats", "prism.drivers.pg", "prism.backends.registry", "hiredis"))]
        print(loaded)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
