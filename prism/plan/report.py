"""What ``prism plan`` shows: the table a planner reads, and the same as JSON.

Per namespace: backend, cache (and the hit rate the model assumes), declared
calls/s, worker CPU per call, the saturation throughput per worker (the
calls/s of its mix one worker serves at 100% of its CPU), and the p99 the
bench measured at the tenant's predicted utilisation. Per tenant: workers,
load per worker, headroom, the tenant mix's saturation per worker, the p99.

The p99: when the costs came from a ``prism bench`` results.json with a
ladder, the p99 of the ladder of the namespace's dominant operation (its
reads, or cache hits when most reads hit, or its writes when they are more)
at the tenant's predicted utilisation (the workers' CPU share), interpolated
linearly between the two steps that bracket it, else the nearest step's. A
tenant's is the largest of its namespaces'. Without a ladder: "-", and a
footnote says why.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from prism.plan.model import DEFAULT_COSTS, HIT, OPS, TARGET_UTILISATION, CostTable, p99_at
from prism.plan.planner import COSTED_AS, Choice, Plan, TenantPlan, cache_table

PLAN_KIND = "prism-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class P99:
    us: float | None
    method: str | None  # "interpolated", "nearest"; None with no ladder
    source: str  # "postgres get (results.json)", or why there is none


def p99_of(choice: Choice, utilisation: float, table: CostTable) -> P99:
    """The p99 the bench measured for ``choice`` at ``utilisation`` (see the module docstring)."""
    read, write = OPS[choice.need.abstraction]
    backend = COSTED_AS.get(choice.backend, choice.backend)
    if choice.need.write_rps > choice.need.read_rps:
        key = (backend, write)
    elif choice.demand.hit_rate >= 0.5:
        key = HIT
    else:
        key = (backend, read)
    cost = table.cost(*key)
    what = " ".join(key)
    if cost is None or not cost.ladder:
        why = "the built-in costs have none" if table.source == DEFAULT_COSTS.source else "not in the costs"
        return P99(None, None, f"no latency ladder for {what}: {why} (--bench-quick or --bench measure one)")
    got = p99_at(cost.ladder, utilisation)
    assert got is not None
    return P99(round(got[0], 1), got[1], f"{what} ({table.files.get(key, table.source)})")


def tenant_p99(tenant: TenantPlan, table: CostTable) -> P99:
    rows = [p99_of(c, tenant.utilisation, table) for c in tenant.choices]
    known = [r for r in rows if r.us is not None]
    if not known:
        return rows[0]
    return max(known, key=lambda r: r.us or 0.0)


def _ms(p: P99) -> str:
    return "-" if p.us is None else f"{p.us / 1000:.1f}{'*' if p.method == 'nearest' else ''}"


def print_table(plan: Plan, table: CostTable, cpus: int, out: TextIO = sys.stdout) -> None:
    print(f"costs: {table.source}; each worker one CPU, sized for {TARGET_UTILISATION:.0%} of it at the peak",
          file=out)  # fmt: skip
    print(f"{'namespace':<20} {'abstraction':<11} {'backend':<9} {'cache':<9} {'calls/s':>9} "
          f"{'us/call':>8} {'sat/worker':>10} {'p99 ms':>7} {'tenant':<12}", file=out)  # fmt: skip
    notes: dict[str, None] = {}
    for tenant in plan.tenants:
        for c in tenant.choices:
            p = p99_of(c, tenant.utilisation, table)
            if p.us is None:
                notes[p.source] = None
            cache = f"yes {c.demand.hit_rate:.0%}" if c.cached else "no"
            print(
                f"{c.need.namespace:<20} {c.need.abstraction:<11} {c.backend:<9} {cache:<9} "
                f"{c.calls_per_s:>9,.0f} {c.demand.cpu_us_per_s / c.calls_per_s:>8.1f} "
                f"{c.demand.saturation_rps:>10,.0f} {_ms(p):>7} {tenant.name:<12}",
                file=out,
            )
    print(f"\n{'tenant':<12} {'workers':>7} {'load per worker':>16} {'headroom':>9} {'sat/worker':>10} "
          f"{'p99 ms':>7}", file=out)  # fmt: skip
    nearest = False
    for tenant in plan.tenants:
        load = tenant.utilisation
        p = tenant_p99(tenant, table)
        nearest = nearest or p.method == "nearest"
        print(f"{tenant.name:<12} {tenant.workers:>7} {load:>16.0%} {1 - load:>9.0%} "
              f"{tenant.saturation_rps:>10,.0f} {_ms(p):>7}", file=out)  # fmt: skip
    print(
        "\nsat/worker: calls/s of that mix one worker serves at 100% of its CPU. p99: what the bench "
        "measured at the tenant's load per worker, interpolated between the two ladder steps around it"
        + ("; *: the nearest step (the load is outside the ladder)" if nearest else ""),
        file=out,
    )
    for note in notes:
        print(f"p99 -: {note}", file=out)
    if plan.unpriced:
        print(f"not considered (no figures in the costs): {', '.join(plan.unpriced)}", file=out)
    print(f"\nCPUs needed: {plan.cpus_needed} (this machine: {cpus})", file=out)


def as_json(plan: Plan, table: CostTable, cpus: int) -> dict[str, Any]:
    """The plan as plain data (``prism plan --json``): docs/plan.md lists the fields."""
    namespaces = []
    for tenant in plan.tenants:
        for c in tenant.choices:
            p = p99_of(c, tenant.utilisation, table)
            namespaces.append({
                "namespace": c.need.namespace,
                "abstraction": c.need.abstraction,
                "tenant": tenant.name,
                "backend": c.backend,
                "cached": c.cached,
                "hit_rate": round(c.demand.hit_rate, 4),
                "read_rps": c.need.read_rps,
                "write_rps": c.need.write_rps,
                "item_bytes": c.need.item_bytes,
                "records": c.need.records,
                "cpu_us_per_call": round(c.demand.cpu_us_per_s / c.calls_per_s, 2),
                "read_us": round(c.demand.read_us, 2),
                "write_us": round(c.demand.write_us, 2),
                "saturation_rps_per_worker": round(c.demand.saturation_rps, 1),
                "p99_us": p.us,
                "p99_method": p.method,
                "p99_source": p.source,
            })  # fmt: skip
    tenants = []
    for tenant in plan.tenants:
        p = tenant_p99(tenant, table)
        tenants.append({
            "name": tenant.name,
            "workers": tenant.workers,
            "utilisation": round(tenant.utilisation, 4),
            "headroom": round(1 - tenant.utilisation, 4),
            "cpu_us_per_s": round(tenant.cpu_us_per_s, 1),
            "saturation_rps_per_worker": round(tenant.saturation_rps, 1),
            "p99_us": p.us,
            "p99_method": p.method,
            "p99_source": p.source,
        })  # fmt: skip
    table_bytes = cache_table(plan)
    return {
        "kind": PLAN_KIND,
        "version": PLAN_VERSION,
        "fits": plan.fits,
        "cpus": cpus,
        "cpus_needed": plan.cpus_needed,
        "problems": list(plan.problems),
        "target_utilisation": TARGET_UTILISATION,
        "costs": {
            "source": table.source,
            "machine": {k: table.machine.get(k) for k in ("cpu_model", "cpus")} if table.machine else None,
        },
        "cache_table": {"total_bytes": table_bytes[0], "slot_bytes": table_bytes[1]} if table_bytes else None,
        "namespaces": namespaces,
        "tenants": tenants,
        "not_considered": list(plan.unpriced),
    }


__all__ = ["PLAN_KIND", "PLAN_VERSION", "as_json", "p99_of", "print_table", "tenant_p99"]
