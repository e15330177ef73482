"""The security sections of the config: TLS, caller authentication, access rules, the admin port.

Only the shape of each value is checked here (types, ranges, globs); whether
the files exist and hold what they should is checked when they are loaded
(``prism.workers.preflight`` at start-up and on every reload, so a bad file
stops start-up with one line, or keeps the previous files on a reload).

Security is on (every data call needs a principal that a rule allows) when
``[auth]``, ``tls.client_ca_file`` or any ``[[access]]`` rule is configured;
with none of them Prism is open, as it was before these sections existed.
"""

from __future__ import annotations

import ipaddress
import math

import msgspec

from prism.config.fields import FieldError

TLS_VERSIONS: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
ACTIONS: tuple[str, ...] = ("read", "write")
MAX_HANDSHAKE_TIMEOUT_S = 300.0
MAX_LEEWAY_S = 600.0
MAX_RULES = 10_000
MAX_PATTERNS = 1_000  # principals or namespaces in one rule
MAX_PATTERN_CHARS = 1_024


class TlsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """TLS on the gRPC port. ``cert_file``: PEM, the certificate then its chain;
    ``client_ca_file``: when set, every client must present a certificate
    signed by it (mTLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""
    min_version: str = "TLSv1.2"
    handshake_timeout_s: float = 10.0


class JwtConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Bearer tokens (``authorization: Bearer <JWT>``) verified with the keys
    of ``jwks_file``; ``exp``, ``nbf``, ``iss`` and ``aud`` checked with ``leeway_s``."""

    jwks_file: str
    issuer: str
    audience: str
    leeway_s: float = 30.0


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    jwt: JwtConfig


class AccessRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Allows ``allow`` (read, write) on ``namespaces`` to ``principals``.
    A pattern is exact, or ends in one ``*`` that matches any rest."""

    principals: tuple[str, ...]
    namespaces: tuple[str, ...]
    allow: tuple[str, ...]


class AdminTlsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cert_file: str
    key_file: str


class AdminConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The admin HTTP port's own TLS (``[admin.tls]``)."""

    tls: AdminTlsConfig | None = None


def security_on(auth: AuthConfig | None, tls: TlsConfig | None, access: tuple[AccessRule, ...]) -> bool:
    """Whether every data call needs an allowed principal (see the module docstring)."""
    return auth is not None or bool(tls and tls.client_ca_file) or bool(access)


def is_loopback(host: str) -> bool:
    """Whether a listen host only ever accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def validate_tls(tls: TlsConfig | None, where: str) -> None:
    if tls is None:
        return
    for name in ("cert_file", "key_file"):
        if not getattr(tls, name):
            raise FieldError(f"{where}.{name}", "must not be empty")
    if tls.min_version not in TLS_VERSIONS:
        raise FieldError(
            f"{where}.min_version", f"{tls.min_version!r} is not one of {', '.join(TLS_VERSIONS)}"
        )
    if not (
        math.isfinite(tls.handshake_timeout_s) and 0 < tls.handshake_timeout_s <= MAX_HANDSHAKE_TIMEOUT_S
    ):
        raise FieldError(
            f"{where}.handshake_timeout_s",
            f"{tls.handshake_timeout_s} out of range (> 0, at most {MAX_HANDSHAKE_TIMEOUT_S:g} seconds)",
        )


def validate_auth(auth: AuthConfig | None) -> None:
    if auth is None:
        return
    jwt = auth.jwt
    for name in ("jwks_file", "issuer", "audience"):
        if not getattr(jwt, name):
            raise FieldError(f"auth.jwt.{name}", "must not be empty")
    if not (math.isfinite(jwt.leeway_s) and 0 <= jwt.leeway_s <= MAX_LEEWAY_S):
        raise FieldError("auth.jwt.leeway_s", f"{jwt.leeway_s} out of range (0-{MAX_LEEWAY_S:g} seconds)")


def validate_access(access: tuple[AccessRule, ...], auth: AuthConfig | None, tls: TlsConfig | None) -> None:
    if len(access) > MAX_RULES:
        raise FieldError("access", f"{len(access)} rules; at most {MAX_RULES}")
    for index, rule in enumerate(access):
        where = f"access[{index}]"
        for name in ("principals", "namespaces"):
            patterns: tuple[str, ...] = getattr(rule, name)
            if not patterns:
                raise FieldError(f"{where}.{name}", "must name at least one (a trailing * matches any rest)")
            if len(patterns) > MAX_PATTERNS:
                raise FieldError(f"{where}.{name}", f"{len(patterns)} patterns; at most {MAX_PATTERNS}")
            for n, pattern in enumerate(patterns):
                _check_pattern(pattern, f"{where}.{name}[{n}]")
        if not rule.allow:
            raise FieldError(f"{where}.allow", "must name at least one action (read, write)")
        for n, action in enumerate(rule.allow):
            if action not in ACTIONS:
                raise FieldError(f"{where}.allow[{n}]", f"{action!r} is not one of {', '.join(ACTIONS)}")
    if access and auth is None and not (tls and tls.client_ca_file):
        raise FieldError(
            "access",
            "rules need callers with an identity: configure [auth] jwt or tls.client_ca_file",
        )


def _check_pattern(pattern: str, where: str) -> None:
    if not pattern:
        raise FieldError(where, "must not be empty")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise FieldError(where, f"longer than {MAX_PATTERN_CHARS} characters")
    if "*" in pattern[:-1]:
        raise FieldError(where, f"{pattern!r}: only a trailing * is supported")


def validate_admin(admin: AdminConfig, admin_listen_host: str, admin_token_file: str) -> None:
    validate_tls_files(admin.tls, "admin.tls")
    if not admin_token_file and not is_loopback(admin_listen_host):
        raise FieldError(
            "admin_listen",
            f"{admin_listen_host} is not a loopback address: set admin_token_file too "
            "(else the /v1 routes would be open to the network)",
        )


def validate_tls_files(tls: AdminTlsConfig | None, where: str) -> None:
    if tls is None:
        return
    for name in ("cert_file", "key_file"):
        if not getattr(tls, name):
            raise FieldError(f"{where}.{name}", "must not be empty")
