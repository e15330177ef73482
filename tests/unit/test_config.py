"""Config loading: layer precedence, and one clear line for every kind of mistake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prism.config import NamespaceConfig, ServerConfig, load_config, parse_host_port
from prism.errors import ConfigError


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ./prism.toml is picked up implicitly: never let the repository's or a
    # developer's own file leak into these tests.
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_error(toml: str | None = None, env: dict[str, str] | None = None, **overrides: Any) -> str:
    path = write(Path("prism.toml"), toml) if toml is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {}, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- defaults and layers


def test_defaults_without_any_source() -> None:
    cfg = load_config(None, {}, {})
    assert cfg == ServerConfig()
    assert cfg.listen_host_port() == ("127.0.0.1", 8980)
    assert cfg.max_message_bytes == 4 * 1024 * 1024
    assert (cfg.compression_min_bytes, cfg.compress_answers) == (1024, "compressed_calls")
    assert cfg.namespaces == (NamespaceConfig(name="default"),)
    assert cfg.namespaces[0].abstraction == "keyvalue"
    assert cfg.namespaces[0].backend == "sqlite"


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml", 'listen = "127.0.0.1:1001"\ndata_dir = "from-file"\nlog_level = "error"\n'
    )
    env = {"PRISM_LISTEN": "127.0.0.1:1002", "PRISM_DATA_DIR": "from-env"}
    flags = {"listen": "127.0.0.1:1003", "data_dir": None, "log_level": None}

    cfg = load_config(path, env, flags)

    assert cfg.listen == "127.0.0.1:1003"  # flag over env and file
    assert cfg.data_dir == "from-env"  # env over file; a None flag is "not given"
    assert cfg.log_level == "error"  # file over default
    assert cfg.max_concurrent_streams == 100  # default
    assert load_config(path, env, {}).listen == "127.0.0.1:1002"
    assert load_config(path, {}, {}).listen == "127.0.0.1:1001"


def test_implicit_prism_toml_in_cwd() -> None:
    write(Path("prism.toml"), "max_concurrent_streams = 7\n")
    assert load_config(None, {}, {}).max_concurrent_streams == 7


def test_prism_config_env_names_the_file_and_an_explicit_path_wins(tmp_path: Path) -> None:
    from_env = write(tmp_path / "env.toml", "max_concurrent_streams = 8\n")
    explicit = write(tmp_path / "flag.toml", "max_concurrent_streams = 9\n")
    write(Path("prism.toml"), "max_concurrent_streams = 7\n")
    assert load_config(None, {"PRISM_CONFIG": from_env}, {}).max_concurrent_streams == 8
    assert load_config(explicit, {"PRISM_CONFIG": from_env}, {}).max_concurrent_streams == 9


def test_every_env_var_is_parsed_to_its_type() -> None:
    env = {
        "PRISM_LISTEN": "[::1]:9000",
        "PRISM_DATA_DIR": "/var/lib/prism",
        "PRISM_MAX_MESSAGE_BYTES": "8388608",
        "PRISM_MAX_CONCURRENT_STREAMS": "250",
        "PRISM_LOG_LEVEL": "debug",
        "PRISM_GRACEFUL_TIMEOUT_S": "2.5",
    }
    cfg = load_config(None, env, {})
    assert cfg.listen_host_port() == ("::1", 9000)
    assert cfg.data_dir == "/var/lib/prism"
    assert cfg.max_message_bytes == 8388608
    assert cfg.max_concurrent_streams == 250
    assert cfg.log_level == "debug"
    assert cfg.graceful_timeout_s == 2.5


def test_empty_env_vars_count_as_unset() -> None:
    cfg = load_config(None, {"PRISM_LISTEN": "", "PRISM_MAX_MESSAGE_BYTES": ""}, {})
    assert cfg == ServerConfig()


def test_namespaces_from_toml() -> None:
    write(
        Path("prism.toml"),
        """
graceful_timeout_s = 3
[[namespaces]]
name = "users"
backend = "postgres"
options = { pool_size = 4 }
[[namespaces]]
name = "sessions.v2"
""",
    )
    cfg = load_config(None, {}, {})
    assert cfg.graceful_timeout_s == 3.0
    assert cfg.namespaces == (
        NamespaceConfig(name="users", backend="postgres", options={"pool_size": 4}),
        NamespaceConfig(name="sessions.v2"),
    )


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"^max_concurrent_streams: 0 out of range"):
        ServerConfig(max_concurrent_streams=0)


# ---------------------------------------------------------------- listen


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8980", ("127.0.0.1", 8980)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[::]:8980", ("::", 8980)),
        ("[fe80::1]:443", ("fe80::1", 443)),
    ],
)
def test_parse_host_port(address: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(address) == expected


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("127.0.0.1:99999", "listen: port 99999 out of range (1-65535)"),
        ("127.0.0.1:0", "listen: port 0 out of range (1-65535)"),
        ("127.0.0.1:http", "listen: port 'http' is not a number"),
        ("8980", "listen: expected HOST:PORT or [IPV6]:PORT, got '8980'"),
        (":8980", "listen: expected HOST:PORT or [IPV6]:PORT"),
        ("::1:8980", "listen: IPv6 hosts need brackets"),
        ("[]:8980", "listen: empty IPv6 address"),
    ],
)
def test_bad_listen(listen: str, reason: str) -> None:
    assert load_error(listen=listen).startswith(reason)


# ---------------------------------------------------------------- value checks


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("max_message_bytes = 1023", "max_message_bytes: 1023 out of range (1024-2147483647)"),
        ("max_message_bytes = 2147483648", "max_message_bytes: 2147483648 out of range"),
        ("max_concurrent_streams = 0", "max_concurrent_streams: 0 out of range"),
        ("compression_min_bytes = -1", "compression_min_bytes: -1 out of range (0-2147483647)"),
        (
            "compress_answers = 'always'",
            "compress_answers: 'always' is not one of compressed_calls, accepting_clients",
        ),
        ("compression_min_bytes = 2147483648", "compression_min_bytes: 2147483648 out of range"),
        ("log_level = 'verbose'", "log_level: 'verbose' is not one of debug, info, warning, error"),
        ("graceful_timeout_s = -1", "graceful_timeout_s: -1.0 must be a finite number of seconds >= 0"),
        ("graceful_timeout_s = inf", "graceful_timeout_s: inf must be a finite"),
        ('data_dir = ""', "data_dir: must not be empty"),
        ("namespaces = []", "namespaces: at least one namespace is required"),
    ],
)
def test_out_of_range_values(toml: str, expected: str) -> None:
    message = load_error(toml)
    assert message.startswith(expected)
    assert message.endswith("(from prism.toml)")


def test_limits_themselves_are_accepted() -> None:
    cfg = load_config(
        None, {}, {"max_message_bytes": 1024, "graceful_timeout_s": 0.0, "compression_min_bytes": 0}
    )
    assert (cfg.max_message_bytes, cfg.compression_min_bytes) == (1024, 0)
    buffers = {"max_connection_buffer_bytes": 2**32, "max_worker_buffer_bytes": 2**32}  # one message must fit
    big = load_config(None, {}, {"max_message_bytes": 2**31 - 1, "http2": buffers})
    assert big.max_message_bytes == 2**31 - 1


NS = "[[namespaces]]\nname = {!r}\n"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (NS.format("x") + NS.format("y") + NS.format("x"), 'namespaces[2].name: duplicate namespace "x"'),
        (NS.format("a b"), "namespaces[0].name: 'a b' must be 1-128 characters of A-Z a-z 0-9 _ . -"),
        (NS.format(""), "namespaces[0].name: '' must be 1-128"),
        (NS.format("n" * 129), "namespaces[0].name: 'nnn"),
        (
            NS.format("ok") + "abstraction = 'graph'\n",
            "namespaces[0].abstraction: unknown abstraction 'graph'",
        ),
        (NS.format("ok") + "backend = ''\n", "namespaces[0].backend: must not be empty"),
    ],
)
def test_bad_namespaces(toml: str, expected: str) -> None:
    assert load_error(toml).startswith(expected)


def test_longest_namespace_name_is_accepted() -> None:
    write(Path("prism.toml"), NS.format("n" * 128))
    assert load_config(None, {}, {}).namespaces[0].name == "n" * 128


def test_redis_cache_tier_implies_enabled_and_has_defaults() -> None:
    write(Path("prism.toml"), NS.format("p") + 'cache = { tier = "redis", url = "redis://127.0.0.1:6379" }\n')
    cache = load_config(None, {}, {}).namespaces[0].cache
    assert (cache.enabled, cache.tier, cache.key_prefix) == (True, "redis", "prism:cache:")
    assert NamespaceConfig(name="x").cache.tier == "shared"


def test_redis_cache_tier_over_tls_takes_a_ca_file() -> None:
    cache = '{ tier = "redis", url = "rediss://:pw@cache:6380/0", ca_file = "/etc/prism/redis-ca.pem" }'
    write(Path("prism.toml"), NS.format("p") + f"cache = {cache}\n")
    loaded = load_config(None, {}, {}).namespaces[0].cache
    assert (loaded.url, loaded.ca_file) == ("rediss://:pw@cache:6380/0", "/etc/prism/redis-ca.pem")


@pytest.mark.parametrize(
    ("cache", "expected"),
    [
        (
            '{ tier = "memcached" }',
            "namespaces[0].cache.tier: unknown cache tier 'memcached' (known: shared, redis)",
        ),
        ('{ tier = "redis" }', 'namespaces[0].cache.url: required with tier = "redis"'),
        (
            '{ tier = "redis", url = "http://h" }',
            "namespaces[0].cache.url: expected a redis:// or rediss:// URL",
        ),
        ('{ tier = "redis", url = "redis://h:70000" }', "namespaces[0].cache.url: the port is not a number"),
        ('{ tier = "redis", url = "redis://h/zero" }', "namespaces[0].cache.url: the database 'zero'"),
        ('{ tier = "redis", url = "redis://:pw@/0" }', "namespaces[0].cache.url: the URL names no host"),
        (
            '{ tier = "redis", url = "redis://h", key_prefix = "" }',
            "namespaces[0].cache.key_prefix: must not",
        ),
        (
            '{ enabled = true, url = "redis://h" }',
            'namespaces[0].cache.url: is only used with tier = "redis"',
        ),
        (
            '{ enabled = true, ca_file = "/etc/ca.pem" }',
            'namespaces[0].cache.ca_file: is only used with tier = "redis"',
        ),
        (
            '{ tier = "redis", url = "redis://:pw@h", ca_file = "/etc/ca.pem" }',
            "namespaces[0].cache.ca_file: is only used with a rediss:// url",
        ),
    ],
)
def test_bad_cache_tiers(cache: str, expected: str) -> None:
    message = load_error(NS.format("p") + f"cache = {cache}\n")
    assert message.startswith(expected)
    assert "pw" not in message


# ---------------------------------------------------------------- decoding errors


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('listn = "127.0.0.1:1"', "listn: unknown field"),
        (NS.format("a") + "bakend = 'redis'\n", "namespaces[0].bakend: unknown field"),
        ("[[namespaces]]\nbackend = 'redis'\n", "namespaces[0].name: required field missing"),
        ('max_message_bytes = "big"', "max_message_bytes: expected int, got str"),
        ("max_message_bytes = true", "max_message_bytes: expected int, got bool"),
        ("max_concurrent_streams = 1.5", "max_concurrent_streams: expected int, got float"),
        (NS.format("a") + "backend = 3\n", "namespaces[0].backend: expected str, got int"),
        ("[namespaces]\nname = 'a'\n", "namespaces: expected array, got object"),
    ],
)
def test_msgspec_errors_are_rephrased_with_the_field_path(toml: str, expected: str) -> None:
    message = load_error(toml)
    assert message.startswith(expected)
    assert "$" not in message and "`" not in message


def test_invalid_toml_names_the_file() -> None:
    message = load_error("listen = \n")
    assert message.startswith("prism.toml: invalid TOML: ")


def test_missing_explicit_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config(missing, {}, {})


def test_missing_file_named_by_prism_config() -> None:
    with pytest.raises(ConfigError, match=r"^gone\.toml: cannot read"):
        load_config(None, {"PRISM_CONFIG": "gone.toml"}, {})


# ---------------------------------------------------------------- env and flag errors


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PRISM_MAX_MESSAGE_BYTES": "abc"}, 'PRISM_MAX_MESSAGE_BYTES: expected an integer, got "abc"'),
        (
            {"PRISM_MAX_CONCURRENT_STREAMS": "1e3"},
            'PRISM_MAX_CONCURRENT_STREAMS: expected an integer, got "1e3"',
        ),
        ({"PRISM_GRACEFUL_TIMEOUT_S": "soon"}, 'PRISM_GRACEFUL_TIMEOUT_S: expected a number, got "soon"'),
    ],
)
def test_unparsable_env_vars_name_the_variable(env: dict[str, str], expected: str) -> None:
    assert load_error(env=env) == expected


def test_invalid_env_value_names_field_and_variable() -> None:
    message = load_error(env={"PRISM_MAX_MESSAGE_BYTES": "10"})
    assert message == "max_message_bytes: 10 out of range (1024-2147483647) (from PRISM_MAX_MESSAGE_BYTES)"
    message = load_error(env={"PRISM_GRACEFUL_TIMEOUT_S": "nan"})
    assert message.startswith("graceful_timeout_s: nan must be a finite")


def test_invalid_flag_value_names_field_and_flag() -> None:
    assert load_error(log_level="loud").endswith("(from --log-level)")


def test_unknown_override_is_reported() -> None:
    assert load_error(lissen="x") == "lissen: unknown setting"


def test_a_connection_buffer_must_hold_one_message_and_a_stream_window() -> None:
    fits = load_config(None, {}, {"max_message_bytes": 1024, "http2": {"max_connection_buffer_bytes": 66560}})
    assert fits.http2.max_connection_buffer_bytes == 1024 + 65536
    with pytest.raises(ConfigError, match=r"66559 is less than max_message_bytes \(1024\) \+ 65536"):
        load_config(
            None, {}, {"max_message_bytes": 1024, "http2": {"max_connection_buffer_bytes": 1024 + 65535}}
        )
