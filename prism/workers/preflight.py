"""Checks before serving (or reloading) what config validation cannot see
from the file alone: CPUs that this machine lets us use, and certificate,
key, CA, JWKS and token files that load, and a routing table that fits
(``prism.workers.routes_size``). The supervisor runs them at
start-up and on every reload; a failure is one line naming the field (exit
code 2, or a rejected reload that keeps the running config and its files).

Namespaces are not checked here: loading the config already checked that
each names a backend that exists and options it takes
(``prism.backends.catalog``), without building a backend, because this
process (the supervisor) must not import trio or a driver.
"""

from __future__ import annotations

import os
import re
import ssl

from prism.config import ServerConfig
from prism.config.security import is_loopback
from prism.errors import ConfigError
from prism.security.identity import JwksError, load_jwks
from prism.security.tls import server_context
from prism.workers.routes_size import check_routes_fit

MAX_ADMIN_TOKEN_BYTES = 4096
# RFC 6750's b64token: what fits in ``Authorization: Bearer <token>`` as is.
_BEARER_TOKEN = re.compile(rb"[A-Za-z0-9._~+/-]+=*")


def check_deployable(config: ServerConfig, routes_bytes: int | None = None) -> ServerConfig:
    """``config``, or ConfigError for the first CPU that cannot be used here, file that does
    not load, or a routing table too large for ``routes_bytes`` (a running server's buffer;
    None: the largest one a server makes)."""
    allowed = os.sched_getaffinity(0)
    for t, tenant in enumerate(config.tenants):
        for cpu in tenant.cpus:
            if cpu not in allowed:
                cpus = ",".join(str(c) for c in sorted(allowed))
                raise ConfigError(f"tenants[{t}].cpus: CPU {cpu} is not available here (allowed: {cpus})")
    if config.tls is not None:
        try:
            server_context(config.tls)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls: cannot load the certificate, key or client CA: {_one_line(exc)}"
            ) from None
    if config.auth is not None:
        try:
            load_jwks(config.auth.jwt.jwks_file)
        except JwksError as exc:
            raise ConfigError(f"auth.jwt.jwks_file: {exc}") from None
    check_admin(config)
    check_routes_fit(config, len(allowed), routes_bytes)
    return config


def open_to_network(config: ServerConfig) -> str | None:
    """The warning to log when anyone who reaches the gRPC port may call it."""
    if config.secured or is_loopback(config.listen_host_port()[0]):
        return None
    return (
        f"gRPC on {config.listen} is open to any caller that reaches it: no [auth], "
        "tls.client_ca_file or [[access]] rule is configured"
    )


def check_admin(config: ServerConfig) -> None:
    """Raise ConfigError if the admin token file or the admin port's certificate and key do not load."""
    if config.admin_token_file:
        read_admin_token(config.admin_token_file)
    if config.admin.tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(config.admin.tls.cert_file, config.admin.tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"admin.tls: cannot load the certificate or key: {_one_line(exc)}") from None


def read_admin_token(path: str) -> bytes:
    """The bearer token in ``path`` (surrounding blanks and the final newline
    dropped); ConfigError naming ``admin_token_file`` if it cannot be read or
    is not a token. The admin process reads it with this too, at its start."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_ADMIN_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"admin_token_file: cannot read {path}: {exc.strerror or exc}") from None
    token = raw.strip()
    if len(raw) > MAX_ADMIN_TOKEN_BYTES:
        raise ConfigError(f"admin_token_file: {path} is over {MAX_ADMIN_TOKEN_BYTES} bytes")
    if not token:
        raise ConfigError(f"admin_token_file: {path} is empty")
    if not _BEARER_TOKEN.fullmatch(token):
        # Not echoed: it is a secret, however malformed.
        raise ConfigError(
            f"admin_token_file: {path} does not hold one bearer token "
            "(letters, digits and - . _ ~ + / then = padding, on one line)"
        )
    return token


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
