"""``prism plan``'s choices: from declared needs and a cost table
(``prism.plan.model``) to tenants, workers, backends and caches.

Per need, in order:

1. **Backend**: the need's ``backend`` if it names one; else among those
   the abstraction has (KeyValue: memory, sqlite, postgres, redis;
   TimeSeries: memory, sqlite, postgres; PubSub: memory, nats), those
   ``durability`` allows ("durable" excludes memory) and the
   machine has (SQLite and memory always; PostgreSQL, Redis and NATS when
   their address is given), the one with the least worker CPU for the
   need's mix. NATS has no figures in the cost table: a PubSub need costs as
   memory's writes and reads, the worker's share of the work. A backend the
   cost table has no figures for is not a candidate; a need with no
   candidate left is named with what is missing (``Plan.missing``).
   A memory namespace lives in one process, so its tenant has one worker:
   in a tenant that needs more, it takes its next cheapest backend.
2. **Cache**: a KeyValue need on a durable backend whose reads are at least
   ``CACHE_READ_SHARE`` of its calls, and whose values fit the cache
   (``CACHE_MAX_ITEM_BYTES``), gets the shared cache (``ttl_s``
   ``CACHE_TTL_S``) when that costs its workers less CPU than no cache (the
   model's hit rate: uniform keys over many records hit too rarely to pay
   for the misses' extra work). The shared table (``[cache]``, one for all namespaces)
   is sized for ``CACHE_RECORDS`` records of each cached namespace (fewer
   when it declares fewer), twice over: a record lives in one 4-slot bucket
   of the table, and at half full about 2% of records find theirs full.
3. **Tenant**: the need's ``tenant``, else ``default``; a tenant's workers
   are ``workers_for`` the sum of its namespaces' demand.

The machine needs the tenants' workers, one CPU each, plus one for the
supervisor and the admin process when there are more than two workers. A
plan that does not fit ``cpus`` names the need (or the total) and the
smallest machine that would hold it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prism.plan.model import (
    CACHE_RECORDS,
    CACHE_TTL_S,
    TARGET_UTILISATION,
    CostTable,
    Demand,
    demand,
    workers_for,
)
from prism.plan.needs import BACKENDS, Need

CACHE_READ_SHARE: Final = 0.8
CACHE_MAX_ITEM_BYTES: Final = 16 * 1024 - 64  # a namespace cache's max_value_bytes (16 KiB), less framing
_SLOT_OVERHEAD: Final = 48 + 160 + 32  # slot header, the key (the request's bytes), the answer's framing
DEFAULT_TABLE: Final = (64 << 20, 4096)  # prism.toml's [cache] total_bytes, slot_bytes
LOCAL: Final = ("memory", "sqlite")
COSTED_AS: Final = {"nats": "memory"}
DEFAULT_TENANT: Final = "default"


@dataclass(frozen=True)
class Choice:
    """What the plan gives one need."""

    need: Need
    backend: str
    cached: bool
    tenant: str
    demand: Demand

    @property
    def calls_per_s(self) -> float:
        return self.need.read_rps + self.need.write_rps


@dataclass(frozen=True)
class TenantPlan:
    name: str
    workers: int
    choices: tuple[Choice, ...]

    @property
    def cpu_us_per_s(self) -> float:
        return sum(c.demand.cpu_us_per_s for c in self.choices)

    @property
    def utilisation(self) -> float:
        """Each worker's share of its CPU at the declared peak."""
        return self.cpu_us_per_s / 1e6 / self.workers

    @property
    def saturation_rps(self) -> float:
        """The calls/s of the tenant's mix one worker serves at 100% of its CPU."""
        calls = sum(c.calls_per_s for c in self.choices)
        return 1e6 * calls / self.cpu_us_per_s if self.cpu_us_per_s > 0 else 0.0


@dataclass(frozen=True)
class Plan:
    tenants: tuple[TenantPlan, ...]
    cpus_needed: int
    cpus: int
    problems: tuple[str, ...]  # why it does not fit (one line each); () when it does
    missing: tuple[str, ...] = ()  # figures the cost table lacks that a need had no other choice than
    unpriced: tuple[str, ...] = ()  # backends left out of the choice for want of figures ("postgres put")

    @property
    def fits(self) -> bool:
        return not self.problems


def make_plan(needs: Sequence[Need], table: CostTable, cpus: int, addresses: Mapping[str, str]) -> Plan:
    """The plan for ``needs`` on a machine of ``cpus``; ``addresses`` has a DSN
    or URL for each remote backend the machine has (postgres, redis, nats)."""
    choices: list[Choice] = []
    problems: list[str] = []
    missing: list[str] = []
    unpriced: set[str] = set()
    for need in needs:
        choice = _choose(need, table, addresses, unpriced=unpriced)
        if isinstance(choice, _Missing):
            missing.append(f"need {need.namespace!r}: {choice.what}")
            continue
        if isinstance(choice, str):
            problems.append(f"need {need.namespace!r}: {choice}")
            continue
        choices.append(choice)
    tenants = _tenants(choices)
    # A memory namespace lives in one process: its tenant has one worker. In
    # a tenant that needs more, it takes its next cheapest backend instead.
    crowded = {t.name for t in tenants if t.workers > 1}
    if any(c.backend == "memory" and c.tenant in crowded for c in choices):
        again: list[Choice] = []
        for c in choices:
            if c.backend == "memory" and c.tenant in crowded:
                other = _choose(c.need, table, addresses, exclude=("memory",), unpriced=unpriced)
                if isinstance(other, _Missing):
                    missing.append(f"need {c.need.namespace!r}: in a tenant of several workers, {other.what}")
                    continue
                if isinstance(other, str):
                    problems.append(f"need {c.need.namespace!r}: in a tenant of several workers, {other}")
                    continue
                c = other
            again.append(c)
        choices, tenants = again, _tenants(again)
    workers = sum(t.workers for t in tenants)
    needed = workers + (1 if workers > 2 else 0)
    for tenant in tenants:
        if tenant.workers > cpus:
            names = ", ".join(repr(c.need.namespace) for c in tenant.choices)
            problems.append(
                f"tenant {tenant.name!r} ({names}) needs {tenant.workers} workers of one CPU each "
                f"at {TARGET_UTILISATION:.0%} load; this machine has {cpus} CPUs"
            )
    if needed > cpus and not problems:
        problems.append(f"the plan needs {needed} CPUs ({workers} workers); this machine has {cpus}")
    chosen = {c.backend for c in choices}
    left_out = tuple(sorted(u for u in unpriced if u.split()[0] not in chosen))
    return Plan(tuple(tenants), needed, cpus, tuple(problems), tuple(missing), left_out)


@dataclass(frozen=True)
class _Missing:
    what: str  # "no figures for sqlite put"


def _tenants(choices: Sequence[Choice]) -> list[TenantPlan]:
    out = []
    for name in sorted({c.tenant for c in choices}):
        mine = tuple(c for c in choices if c.tenant == name)
        out.append(TenantPlan(name, workers_for(sum(c.demand.cpu_us_per_s for c in mine)), mine))
    return out


def candidates_for(need: Need, addresses: Mapping[str, str]) -> list[str]:
    """The backends a need may take: its abstraction's, that its durability
    allows and that the machine has."""
    return [
        b
        for b in BACKENDS[need.abstraction]
        if (b in LOCAL or b in addresses)
        and not (b == "memory" and need.durability == "durable")
        and need.backend in (None, b)
    ]


def would_cache(need: Need, backend: str) -> bool:
    """Whether the plan gives ``need`` the shared cache on ``backend`` (step 2 above)."""
    read_share = need.read_rps / (need.read_rps + need.write_rps)
    return (
        need.abstraction == "keyvalue"
        and backend != "memory"
        and read_share >= CACHE_READ_SHARE
        and need.item_bytes <= CACHE_MAX_ITEM_BYTES
    )


def _choose(
    need: Need,
    table: CostTable,
    addresses: Mapping[str, str],
    exclude: Sequence[str] = (),
    unpriced: set[str] | None = None,
) -> Choice | _Missing | str:
    candidates = [b for b in candidates_for(need, addresses) if b not in exclude]
    if not candidates:
        if need.backend is not None and need.backend not in exclude:
            return f"it requires {need.backend}: give its address (--{need.backend})"
        if need.backend is not None:
            return f"it requires {need.backend}, which holds its data in one worker"
        return f"no backend for a durable {need.abstraction} namespace: give a NATS address (--nats)"
    best: Choice | None = None
    lacking: list[str] = []
    for backend in candidates:
        for cached in (False, True) if would_cache(need, backend) else (False,):
            got = demand(
                table,
                COSTED_AS.get(backend, backend),
                need.abstraction,
                need.read_rps,
                need.write_rps,
                need.item_bytes,
                need.records,
                cached,
            )
            if isinstance(got, str):
                lacking.append(got)
                continue
            choice = Choice(need, backend, cached, need.tenant or DEFAULT_TENANT, got)
            if best is None or got.cpu_us_per_s < best.demand.cpu_us_per_s:
                best = choice
    if best is None:
        return _Missing(f"no figures for {', '.join(dict.fromkeys(lacking))}")
    if unpriced is not None:
        unpriced.update(lacking)
    return best


def cache_table(plan: Plan) -> tuple[int, int] | None:
    """The ``[cache]`` table's (total_bytes, slot_bytes) the plan's cached
    namespaces need, or None when none is cached or the default holds them."""
    cached = [c.need for t in plan.tenants for c in t.choices if c.cached]
    if not cached:
        return None
    slot = 512
    while slot < _SLOT_OVERHEAD + max(n.item_bytes for n in cached):
        slot *= 2
    records = sum(min(n.records or CACHE_RECORDS, CACHE_RECORDS) for n in cached)
    slots = -(-2 * records // 4) * 4
    total, default_slot = DEFAULT_TABLE
    if slot <= default_slot and slots <= total // default_slot:
        return None
    return max(slots * slot, 1 << 20), slot


def config_toml(plan: Plan, addresses: Mapping[str, str]) -> str:
    """A ``prism.toml`` serving the plan (``prism serve --check`` accepts it)."""
    lines = ["# Written by `prism plan`: one [[tenants]] table per isolation group.", ""]
    table = cache_table(plan)
    if table is not None:
        lines += ["[cache]", f"total_bytes = {table[0]}", f"slot_bytes = {table[1]}", ""]
    for tenant in plan.tenants:
        lines += ["[[tenants]]", f"name = {_q(tenant.name)}", f"workers = {tenant.workers}", "namespaces = ["]
        for c in tenant.choices:
            parts = [f"name = {_q(c.need.namespace)}"]
            if c.need.abstraction != "keyvalue":
                parts.append(f"abstraction = {_q(c.need.abstraction)}")
            parts.append(f"backend = {_q(c.backend)}")
            options = _options(c.backend, addresses)
            if options:
                parts.append("options = { " + ", ".join(f"{k} = {_q(v)}" for k, v in options.items()) + " }")
            if c.cached:
                parts.append(f"cache = {{ enabled = true, ttl_s = {CACHE_TTL_S:g} }}")
            lines.append("  { " + ", ".join(parts) + " },")
        lines += ["]", ""]
    return "\n".join(lines)


def _options(backend: str, addresses: Mapping[str, str]) -> dict[str, Any]:
    if backend == "postgres":
        return {"dsn": addresses["postgres"]}
    if backend == "redis":
        return {"url": addresses["redis"]}
    if backend == "nats":
        return {"url": addresses["nats"]}
    return {}


def _q(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


__all__ = [
    "BACKENDS",
    "CACHE_READ_SHARE",
    "Choice",
    "Plan",
    "TenantPlan",
    "cache_table",
    "candidates_for",
    "config_toml",
    "make_plan",
    "would_cache",
]
