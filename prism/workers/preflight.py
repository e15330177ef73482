"""Checks before serving (or reloading) what config validation cannot see
from the file alone: CPUs that this machine lets us use, and certificate,
key, CA and JWKS files that load. The supervisor runs them at start-up and on
every reload; a failure is one line naming the field (exit code 2, or a
rejected reload that keeps the running config and its files).

Namespaces are not checked here: loading the config already checked that
each names a backend that exists and options it takes
(``prism.backends.catalog``), without building a backend, because this
process (the supervisor) must not import trio or a driver.
"""

from __future__ import annotations

import os
import ssl

from prism.config import ServerConfig
from prism.errors import ConfigError
from prism.security.identity import JwksError, load_jwks
from prism.security.tls import server_context


def check_deployable(config: ServerConfig) -> None:
    """Raise ConfigError for the first CPU that cannot be used here or file that does not load."""
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
