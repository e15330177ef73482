"""Checks before serving (or reloading) what config validation cannot see
from the file alone: backends that exist with valid options, and CPUs that
this machine lets us use. The supervisor runs them at start-up and on every
reload; a failure is one line naming the field (exit code 2, or a rejected
reload)."""

from __future__ import annotations

import os
from pathlib import Path

from prism.config import ServerConfig
from prism.errors import ConfigError


def check_deployable(config: ServerConfig) -> None:
    """Raise ConfigError for the first namespace or CPU that cannot be served here."""
    check_namespaces(config)
    allowed = os.sched_getaffinity(0)
    for t, tenant in enumerate(config.tenants):
        for cpu in tenant.cpus:
            if cpu not in allowed:
                cpus = ",".join(str(c) for c in sorted(allowed))
                raise ConfigError(f"tenants[{t}].cpus: CPU {cpu} is not available here (allowed: {cpus})")


def check_namespaces(config: ServerConfig) -> None:
    """Build (not open) every namespace's backend, so that an unknown backend
    or a bad option stops start-up (or a reload) with one line naming it."""
    from prism.backends import registry

    places = [(f"namespaces[{i}]", ns) for i, ns in enumerate(config.namespaces)]
    for t, tenant in enumerate(config.tenants):
        places += [(f"tenants[{t}].namespaces[{i}]", ns) for i, ns in enumerate(tenant.namespaces)]
    for where, ns in places:
        try:
            registry.create_any(
                ns.abstraction, ns.backend, ns.options, data_dir=Path(config.data_dir), namespace=ns.name
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
