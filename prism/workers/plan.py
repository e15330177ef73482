"""What the supervisor decides from configs alone: where workers run, what a reload changes.

Pure functions of the configs (and of the slots already running), so that
the decisions can be tested without starting a process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from prism.config import ServerConfig, TenantConfig
from prism.workers.slot import ACTIVE, Slot, SlotState

__all__ = [
    "RESTART_ONLY_FIELDS",
    "Handover",
    "ReloadPlan",
    "keep_restart_only_fields",
    "plan_cpus",
    "plan_reload",
]

# What the running processes were built around (bound sockets, the data dir
# every backend opened, the shared cache's size, the admin process's token and
# certificate, read when it starts; a worker's exporter and access log, made
# when it starts, so that every worker traces alike): a reload cannot change them.
RESTART_ONLY_FIELDS: Final = (
    "listen",
    "admin_listen",
    "data_dir",
    "cache",
    "max_message_bytes",
    "admin_token_file",
    "admin",
    "tracing",
)


def plan_cpus(tenants: Sequence[TenantConfig], allowed: Sequence[int]) -> list[tuple[str, int | None]]:
    """(tenant, cpu) for every worker: the tenant's CPUs, else round robin over ``allowed``.

    The round robin runs on across tenants that name no CPUs, so that their
    workers spread over the machine rather than all starting on the first
    CPU. ``None`` (no pinning) when no CPU is allowed at all.
    """
    out: list[tuple[str, int | None]] = []
    next_cpu = 0
    for tenant in tenants:
        for n in range(tenant.workers):
            if tenant.cpus:
                out.append((tenant.name, tenant.cpus[n % len(tenant.cpus)]))
            else:
                out.append((tenant.name, allowed[next_cpu % len(allowed)] if allowed else None))
                next_cpu += 1
    return out


def keep_restart_only_fields(
    running: ServerConfig, new: ServerConfig
) -> tuple[ServerConfig, list[tuple[str, Any]]]:
    """``new`` with the running values of ``RESTART_ONLY_FIELDS``, and the (field, kept value) it changed."""
    kept = [(name, getattr(running, name)) for name in RESTART_ONLY_FIELDS]
    changed = [(name, value) for name, value in kept if getattr(new, name) != value]
    if changed:
        new = msgspec.structs.replace(new, **dict(changed))
    return new, changed


@dataclass(frozen=True)
class Handover:
    """A reload's replacement of a tenant's workers: ``old`` serve until every one of ``new`` does."""

    old: frozenset[int]
    new: frozenset[int]

    @staticmethod
    def settle(handovers: Sequence[Handover], slots: Mapping[int, Slot]) -> tuple[list[Slot], list[Handover]]:
        """The superseded slots to retire now (every replacement serves) and the handovers still pending."""
        retire, pending = [], []
        for handover in handovers:
            starting = [slots[i] for i in handover.new if i in slots]
            if all(s.state is SlotState.SERVING for s in starting if s.state in ACTIVE):
                retire += [slots[i] for i in sorted(handover.old) if i in slots and slots[i].state in ACTIVE]
            else:
                pending.append(handover)
        return retire, pending


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does to the tenants' workers.

    ``start`` are the tenants that get new workers: added ones, and those
    whose worker count or CPUs changed (``replaced``). A replaced tenant's
    running slots (``superseded``) serve until its new workers do, so that
    no call fails meanwhile. A removed tenant's slots (``retire``) stop at
    once: its namespaces are gone, there is nothing to hand over. A tenant
    whose namespaces alone changed keeps its workers; they follow the new
    routing table.
    """

    added: tuple[str, ...]
    replaced: tuple[str, ...]
    removed: tuple[str, ...]
    start: tuple[TenantConfig, ...]
    superseded: dict[str, frozenset[int]]
    retire: frozenset[int]


def plan_reload(
    old: Sequence[TenantConfig], new: Sequence[TenantConfig], slots: Mapping[int, str]
) -> ReloadPlan:
    """The plan for going from tenants ``old`` to ``new``; ``slots`` maps the
    running (not retiring) slots' ids to their tenants."""
    before = {t.name: t for t in old}
    after = {t.name: t for t in new}
    added = tuple(name for name in after if name not in before)
    replaced = tuple(
        name
        for name, tenant in after.items()
        if name in before and (before[name].workers, before[name].cpus) != (tenant.workers, tenant.cpus)
    )
    removed = tuple(name for name in before if name not in after)
    starting = set(added) | set(replaced)

    def slots_of(names: set[str]) -> dict[str, frozenset[int]]:
        return {name: frozenset(i for i, t in slots.items() if t == name) for name in names}

    return ReloadPlan(
        added=added,
        replaced=replaced,
        removed=removed,
        start=tuple(t for t in new if t.name in starting),
        superseded=slots_of(starting),
        retire=frozenset(i for i, t in slots.items() if t in removed),
    )


def reload_done(slots: Iterable[Slot], handovers: Sequence[Handover], generation: int) -> bool:
    """Whether a reload (to routing ``generation``) is in effect: no worker it
    started is still on its way to serving (``handovers``), and every serving
    worker has heartbeat on that generation, so it serves the new namespaces."""
    return not handovers and all(s.generation >= generation for s in slots if s.state is SlotState.SERVING)
