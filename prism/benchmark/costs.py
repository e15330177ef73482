"""What ``prism plan --bench results.json`` takes from a ``prism bench`` run.

``prism plan``'s cost model (``prism.plan.model``) wants, per backend and
operation (``get``, ``put``, ``read_events``, ``write_events``,
``publish``), one worker's CPU per call and the calls/s one worker served at
saturation, and the ladder's latency for the plan's p99 column. A run gives
them when its scenario sends one operation (a mix's CPU per call is no
single operation's), the bench started the server (so its CPU was metered),
and a step answered calls:

    cpu_us   the workers' CPU per call (``cpu_us_per_call["worker..."]``
             summed) at the step where it is lowest, of those where the
             workers were at least half busy: ``saturation.per_worker``
             (computed from the steps for a file written before it)
    sat_rps  1e6 / cpu_us: the calls/s one worker serves at 100% of its CPU
    ladder   each step's (worker utilisation 0-1, p99): the workers' mean
             ``cpu_pct`` / 100, ``latency.p99_us``

On a namespace with the cache: a ``get`` run whose step's hit ratio is at
least ``HIT_RATIO`` gives ``("cache", "get")``, a hit's cost; at most
``1 - HIT_RATIO`` (a tiny ``ttl_s``), ``(backend, "get+cache")``, a miss's;
from ``MIXED_RATIO`` up to ``HIT_RATIO`` (a short ``ttl_s``),
``(backend, "get+cache-mixed")`` with its hit ratio, from which
``prism.plan.costfile`` takes a hit's cost among misses; below, nothing. A
``put`` run gives ``(backend, "put+cache")``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from prism.benchmark.results import Results, per_worker

OPERATIONS = ("get", "put", "read_events", "write_events", "publish")
HIT_RATIO = 0.95
MIXED_RATIO = 0.5


Ladder = tuple[tuple[float, float], ...]


def plan_costs(data: dict[str, Any]) -> dict[tuple[str, str], tuple[float, float, Ladder, float | None]]:
    """``{(backend, op): (cpu_us, sat_rps, ladder, hit ratio)}`` from a results.json
    document ({} if it gives none); the hit ratio is the step's with the cache, else None.

    Raises msgspec.ValidationError if the document is not a results.json of this schema.
    """
    run = msgspec.convert(data, Results, strict=False)
    scenario: dict[str, Any] = dict(run.scenario)
    workload: dict[str, Any] = dict(scenario.get("workload") or {})
    ops = [op for op, weight in dict(workload.get("mix") or {}).items() if weight]
    best = per_worker(run.steps)
    if len(ops) != 1 or ops[0] not in OPERATIONS or best is None:
        return {}
    namespaces: list[dict[str, Any]] = list(scenario.get("namespaces") or [])
    wanted = workload.get("namespace") or (namespaces[0]["name"] if namespaces else "")
    namespace = next((ns for ns in namespaces if ns.get("name") == wanted), None)
    step = next(s for s in run.steps if s.index == best.step)
    if namespace is None:
        return {}
    backend = str(namespace.get("backend", "sqlite"))
    key = (backend, ops[0])
    ratio: float | None = None
    if dict(namespace.get("cache") or {}).get("enabled") and ops[0] in ("get", "put"):
        key = (backend, f"{ops[0]}+cache")
        ratio = step.backend.cache_hit_ratio if step.backend is not None else None
        if ops[0] == "get":
            if ratio is not None and ratio >= HIT_RATIO:
                key = ("cache", "get")
            elif ratio is not None and ratio >= MIXED_RATIO:
                key = (backend, "get+cache-mixed")
            elif ratio is None or ratio > 1 - HIT_RATIO:
                return {}
    ladder = tuple(
        (round(sum(busy) / len(busy) / 100, 4), s.latency.p99_us)
        for s in run.steps
        if s.latency.p99_us is not None and s.cpu_pct
        and (busy := [pct for role, pct in s.cpu_pct.items() if role.startswith("worker")])
    )  # fmt: skip
    hit = ratio if dict(namespace.get("cache") or {}).get("enabled") else None
    return {key: (round(1e6 / best.calls_per_cpu_s, 1), best.calls_per_cpu_s, ladder, hit)}
