"""The security sections of the config: each mistake is one line naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism.config import ServerConfig, load_config
from prism.config.security import AccessRule, is_loopback
from prism.errors import ConfigError

TLS = '[tls]\ncert_file = "s.pem"\nkey_file = "s.key"\n'
MTLS = TLS + 'client_ca_file = "ca.pem"\n'
JWT = '[auth]\njwt = { jwks_file = "k.json", issuer = "https://idp", audience = "prism" }\n'
RULE = '[[access]]\nprincipals = ["alice"]\nnamespaces = ["ledger"]\nallow = ["read"]\n'


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def load(toml: str) -> ServerConfig:
    Path("prism.toml").write_text(toml)
    return load_config("prism.toml", {}, {})


def load_error(toml: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(toml)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_without_security_sections_prism_is_open_as_before() -> None:
    cfg = load("")
    assert cfg.tls is None and cfg.auth is None and cfg.access == ()
    assert not cfg.secured


@pytest.mark.parametrize(
    ("toml", "secured"),
    [(TLS, False), (MTLS, True), (JWT, True), (JWT + RULE, True), (MTLS + RULE, True)],
    ids=["tls only", "mtls", "jwt", "jwt+rules", "mtls+rules"],
)
def test_security_is_on_with_auth_client_ca_or_rules(toml: str, secured: bool) -> None:
    assert load(toml).secured is secured


def test_full_example_loads() -> None:
    cfg = load(
        "audit_writes = true\n"  # a top-level key: before the first table
        + MTLS
        + 'min_version = "TLSv1.3"\nhandshake_timeout_s = 5\n'
        + '[auth]\njwt = { jwks_file = "k.json", issuer = "https://idp", audience = "prism", leeway_s = 0 }\n'
        + '[[access]]\nprincipals = ["spiffe://corp/svc/payments", "alice", "team-*"]\n'
        + 'namespaces = ["ledger", "orders-*"]\nallow = ["read", "write"]\n'
    )
    assert cfg.tls.min_version == "TLSv1.3"
    assert cfg.audit_writes
    assert cfg.access == (
        AccessRule(
            ("spiffe://corp/svc/payments", "alice", "team-*"), ("ledger", "orders-*"), ("read", "write")
        ),
    )


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[tls]\ncert_file = "s.pem"\n', "tls.key_file: required field missing"),
        ('[tls]\ncert_file = ""\nkey_file = "k"\n', "tls.cert_file: must not be empty"),
        (TLS + 'min_version = "TLSv1.1"\n', "tls.min_version: 'TLSv1.1' is not one of TLSv1.2, TLSv1.3"),
        (TLS + "handshake_timeout_s = 0\n", "tls.handshake_timeout_s: 0.0 out of range"),
        (TLS + "handshake_timeout_s = inf\n", "tls.handshake_timeout_s: inf out of range"),
        (TLS + "bogus = 1\n", "tls.bogus: unknown field"),
        ("[auth]\n", "auth.jwt: required field missing"),
        (JWT.replace('issuer = "https://idp"', 'issuer = ""'), "auth.jwt.issuer: must not be empty"),
        (JWT.replace("}", ", leeway_s = -1 }"), "auth.jwt.leeway_s: -1.0 out of range"),
        (JWT.replace("}", ", leeway_s = 1e9 }"), "auth.jwt.leeway_s: 1000000000.0 out of range"),
        (RULE, "access: rules need callers with an identity"),
        (JWT + RULE.replace('["alice"]', "[]"), "access[0].principals: must name at least one"),
        (JWT + RULE.replace('["ledger"]', '["a*b"]'), "access[0].namespaces[0]: 'a*b': only a trailing *"),
        (JWT + RULE.replace('["ledger"]', '[""]'), "access[0].namespaces[0]: must not be empty"),
        (
            JWT + RULE.replace('["read"]', '["admin"]'),
            "access[0].allow[0]: 'admin' is not one of read, write",
        ),
        (JWT + RULE.replace('["read"]', "[]"), "access[0].allow: must name at least one action"),
        (JWT + RULE + "who = 1\n", "access[0].who: unknown field"),
        (
            'admin_listen = "0.0.0.0:8981"\n',
            "admin_listen: 0.0.0.0 is not a loopback address: set admin_token_file",
        ),
        ('[admin.tls]\ncert_file = "a.pem"\n', "admin.tls.key_file: required field missing"),
    ],
)
def test_bad_security_config_is_one_line_naming_the_field(toml: str, expected: str) -> None:
    message = load_error(toml)
    assert message.startswith(expected), message
    assert message.endswith("(from prism.toml)")


def test_non_loopback_admin_with_a_token_file_loads() -> None:
    cfg = load('admin_listen = "0.0.0.0:8981"\nadmin_token_file = "admin.token"\n')
    assert cfg.admin_token_file == "admin.token"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("prism.internal", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# ---------------------------------------------------------------- [http2] and max_inflight


def test_http2_defaults_and_the_top_level_streams_key() -> None:
    cfg = load("")
    assert (cfg.max_inflight, cfg.http2.max_connections, cfg.http2.idle_timeout_s) == (4096, 10_000, 300.0)
    assert cfg.streams_per_connection == 100
    assert load("max_concurrent_streams = 7\n").streams_per_connection == 7
    assert load("[http2]\nmax_concurrent_streams = 9\n").streams_per_connection == 9
    assert (
        load("max_concurrent_streams = 9\n[http2]\nmax_concurrent_streams = 9\n").streams_per_connection == 9
    )


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "max_concurrent_streams = 7\n[http2]\nmax_concurrent_streams = 9\n",
            "http2.max_concurrent_streams: 9 disagrees",
        ),
        ("[http2]\nmax_header_list_bytes = 10\n", "http2.max_header_list_bytes: 10 out of range"),
        (
            "[http2]\nmax_connection_buffer_bytes = 1048576\n",
            "http2.max_connection_buffer_bytes: 1048576 is less than",
        ),
        (
            "[http2]\nmax_worker_buffer_bytes = 1048576\n",
            "http2.max_worker_buffer_bytes: 1048576 out of range",
        ),
        ("[http2]\nhandshake_timeout_s = 0\n", "http2.handshake_timeout_s: 0.0 out of range"),
        ("[http2]\nidle_timeout_s = inf\n", "http2.idle_timeout_s: inf out of range"),
        ("[http2]\nkeepalive_time_s = -1\n", "http2.keepalive_time_s: -1.0 out of range (0 (off), or"),
        (
            "[http2]\nmax_connection_age_s = 1e12\n",
            "http2.max_connection_age_s: 1000000000000.0 out of range",
        ),
        ("[http2]\nmax_connections = 0\n", "http2.max_connections: 0 out of range"),
        ("[http2]\nmax_streams = 5\n", "http2.max_streams: unknown field"),
        ("max_inflight = 0\n", "max_inflight: 0 out of range"),
    ],
)
def test_bad_limits_are_one_line_naming_the_field(toml: str, expected: str) -> None:
    message = load_error(toml)
    assert message.startswith(expected), message
