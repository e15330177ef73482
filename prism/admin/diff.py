"""What adopting a new config would change, compared with the running one as the routing table shows it.

The supervisor publishes what it runs in the routing table: every
namespace (tenant, abstraction, backend, cache with its URL masked, limits),
every tenant's worker count and CPUs, the other settings, and the security
section. A new config is turned into the same entries with the same
functions (``prism.workers.routes_size``) and compared with them, so the
difference is exactly what a reload would act on. Backend options are not
in the table (every tenant's workers read it, and they hold passwords): a
digest of each namespace's, keyed with a secret of this run that only the
supervisor and this process hold, says whether they change, and the line
shows the new ones, masked. Restart-only fields
(``prism.workers.plan.RESTART_ONLY_FIELDS``) are listed apart: a reload
keeps their running values.

Each change is one line for people, never with a secret in it: values go
through ``prism.redact``, and a value whose change is only in a masked part
says so instead of showing it. The diff is worked out here, in the server,
so that no copy of the running config, redacted or not, leaves it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from prism.config import ServerConfig
from prism.redact import redact
from prism.router.table import NamespaceEntry, Routes, TenantEntry
from prism.security.section import section_of
from prism.workers.plan import RESTART_ONLY_FIELDS
from prism.workers.routes_size import namespace_entries, option_digests, settings_of, tenant_entries

__all__ = ["Change", "config_changes", "running_digest", "worker_counts"]

_SECURITY: Final = ("tls", "auth", "access", "audit_writes")


class Change(msgspec.Struct, frozen=True):
    """One difference. ``kind``: namespace, tenant, setting or restart_only;
    ``op``: added, removed, moved or changed; ``text``: the line to show."""

    kind: str
    op: str
    name: str
    text: str


def config_changes(routes: Routes, new: ServerConfig, cpus: int, options_key: bytes) -> list[Change]:
    """The changes from the running config (``routes``) to ``new``: namespaces,
    tenants, then settings, each sorted by name. ``options_key`` keys the
    table's option digests (``prism.workers.routes_size.option_digests``)."""
    new_options = {ns.name: ns.options for ns in new.all_namespaces()}
    changed_options = {
        name: new_options[name]
        for name, digest in option_digests(new, cpus, options_key).items()
        if name in routes.option_digests and routes.option_digests[name] != digest
    }
    changes = _namespaces(routes.namespaces, namespace_entries(new, cpus), changed_options)
    changes += _tenants(routes, tenant_entries(new, cpus), _tenant_limits(new, cpus))
    changes += _settings(_running_settings(routes), _settings_of(new))
    return changes


def worker_counts(tenants: Mapping[str, TenantEntry]) -> dict[str, int]:
    """Workers per tenant (``Routes.tenants``, or ``tenant_entries`` of a new config), by name."""
    return {name: tenants[name].workers for name in sorted(tenants)}


def running_digest(routes: Routes) -> str:
    """A digest of the running config as published (not of the generation, worker
    pids or states): it moves only when a reload changed what runs."""
    state = (
        routes.namespaces,
        routes.tenants,
        routes.tenant_limits,
        routes.settings,
        _running_settings(routes),
    )
    return hashlib.blake2b(msgspec.msgpack.encode(state, order="deterministic"), digest_size=16).hexdigest()


# -- namespaces ------------------------------------------------------------------------------------


def _namespaces(
    old: Mapping[str, NamespaceEntry], new: Mapping[str, NamespaceEntry], options: Mapping[str, Any]
) -> list[Change]:
    changes = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None:
            assert after is not None
            text = f"+ namespace {name}: {after.abstraction} on {after.backend}, tenant {after.tenant}"
            changes.append(Change("namespace", "added", name, text))
        elif after is None:
            text = f"- namespace {name}: {before.abstraction} on {before.backend}, tenant {before.tenant}"
            changes.append(Change("namespace", "removed", name, text))
        else:
            if before.tenant != after.tenant:
                text = f"~ namespace {name}: moves from tenant {before.tenant} to tenant {after.tenant}"
                changes.append(Change("namespace", "moved", name, text))
            lines = _values(
                {"abstraction": before.abstraction, "backend": before.backend},
                {"abstraction": after.abstraction, "backend": after.backend},
            )
            if name in options:  # the old options are not known here: only that they differ
                lines.append(f"options changed (now {_shown(options[name])})")
            lines += _values(before.cache, after.cache, "cache.")
            lines += _values(before.limits, after.limits, "limits.")
            changes += [Change("namespace", "changed", name, f"~ namespace {name}: {line}") for line in lines]
    return changes


# -- tenants ---------------------------------------------------------------------------------------


def _tenant_limits(config: ServerConfig, cpus: int) -> dict[str, dict[str, Any]]:
    return {
        t.name: msgspec.to_builtins(t.limits) for t in config.effective_tenants(cpus) if t.limits is not None
    }


def _workers(entry: TenantEntry) -> str:
    count = f"{entry.workers} worker{'s' if entry.workers != 1 else ''}"
    return count + (f" on CPUs {','.join(map(str, entry.cpus))}" if entry.cpus else "")


def _tenants(
    routes: Routes, new: Mapping[str, TenantEntry], new_limits: Mapping[str, dict[str, Any]]
) -> list[Change]:
    old = routes.tenants
    changes = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before is None:
            assert after is not None
            changes.append(Change("tenant", "added", name, f"+ tenant {name}: {_workers(after)}"))
        elif after is None:
            changes.append(Change("tenant", "removed", name, f"- tenant {name}: {_workers(before)}"))
        else:
            lines = _values(
                {"workers": before.workers, "cpus": list(before.cpus)},
                {"workers": after.workers, "cpus": list(after.cpus)},
            )
            limits = _values(routes.tenant_limits.get(name, {}), new_limits.get(name, {}), "limits.")
            changes += [
                Change("tenant", "changed", name, f"~ tenant {name}: {line}") for line in lines + limits
            ]
    return changes


# -- settings --------------------------------------------------------------------------------------


def _settings_of(config: ServerConfig) -> dict[str, Any]:
    security = msgspec.to_builtins(section_of(config, 0))
    return {**settings_of(config), **{name: security[name] for name in _SECURITY}}


def _running_settings(routes: Routes) -> dict[str, Any]:
    security = msgspec.to_builtins(routes.security)
    return {**routes.settings, **{name: security[name] for name in _SECURITY}}


def _settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    changes = []
    for name in sorted(old.keys() | new.keys()):
        if name == "access":
            before, after = old.get(name, []), new.get(name, [])
            if before != after:
                text = f"~ access: {len(before)} rules -> {len(after)} rules (the rules changed)"
                changes.append(Change("setting", "changed", name, text))
            continue
        for line in _values({name: old.get(name)}, {name: new.get(name)}):
            if name in RESTART_ONLY_FIELDS:
                text = f"! {line}: changes only at restart (a reload keeps the running value)"
                changes.append(Change("restart_only", "changed", name, text))
            else:
                changes.append(Change("setting", "changed", name, f"~ {line}"))
    return changes


# -- values ----------------------------------------------------------------------------------------


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables flattened to dotted keys; a None value (an optional field unset) left out."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _shown(value: Any) -> str:
    return redact(json.dumps(value, sort_keys=True, default=str))


def _values(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One line per key (nested tables by dotted path) whose value differs; secrets masked."""
    before, after = _flat(old, prefix), _flat(new, prefix)
    lines = []
    for key in sorted(before.keys() | after.keys()):
        if key not in before:
            lines.append(f"{key} = {_shown(after[key])} (added)")
        elif key not in after:
            lines.append(f"{key} removed (was {_shown(before[key])})")
        elif before[key] != after[key]:
            was, now = _shown(before[key]), _shown(after[key])
            if was == now:
                lines.append(f"{key} changed in a part not shown (a password or token)")
            else:
                lines.append(f"{key} {was} -> {now}")
    return lines
