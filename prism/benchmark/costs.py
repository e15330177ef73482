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
``put`` run gives ``(backend, "put+cache")``. A run of gets and puts on the
cache (the puts invalidating: ``prism plan``'s calibration of a hit, as an
application's read-mostly mix has them) gives ``(backend,
"get+cache-mixed")`` too, with the puts' share of its calls (its
``write_share``: costfile takes their cost out as well) when its hit ratio
is at least ``MIXED_RATIO``. A run of an abstraction's reads and writes
together with no cache (``MIXES``) gives ``(backend, "get+put")`` or
``(backend, "read_events+write_events")``, with its writes' share: what
mixing them adds to a call (``prism.plan.model``'s x(w)).
"""

from __future__ import annotations

from typing import Any

import msgspec

from prism.benchmark.results import Results, per_worker

OPERATIONS = ("get", "put", "read_events", "write_events", "publish")
MIXES = (("get", "put"), ("read_events", "write_events"))  # (read, write) of an abstraction
HIT_RATIO = 0.95
MIXED_RATIO = 0.5


Ladder = tuple[tuple[float, float], ...]
Figure = tuple[float, float, Ladder, float | None, float]


def plan_costs(data: dict[str, Any]) -> dict[tuple[str, str], Figure]:
    """``{(backend, op): (cpu_us, sat_rps, ladder, hit ratio, write share)}`` from a
    results.json document ({} if it gives none); the hit ratio is the step's with
    the cache, else None; the write share is the puts' share of the calls of a
    run of gets and puts on the cache, else 0.

    Raises msgspec.ValidationError if the document is not a results.json of this schema.
    """
    run = msgspec.convert(data, Results, strict=False)
    scenario: dict[str, Any] = dict(run.scenario)
    workload: dict[str, Any] = dict(scenario.get("workload") or {})
    mix = {op: float(weight) for op, weight in dict(workload.get("mix") or {}).items() if weight}
    best = per_worker(run.steps)
    namespaces: list[dict[str, Any]] = list(scenario.get("namespaces") or [])
    wanted = workload.get("namespace") or (namespaces[0]["name"] if namespaces else "")
    namespace = next((ns for ns in namespaces if ns.get("name") == wanted), None)
    if best is None or namespace is None:
        return {}
    cached = bool(dict(namespace.get("cache") or {}).get("enabled"))
    step = next(s for s in run.steps if s.index == best.step)
    backend = str(namespace.get("backend", "sqlite"))
    if cached and set(mix) == {"get", "put"}:  # hits among misses and invalidating writes
        ratio = step.backend.cache_hit_ratio if step.backend is not None else None
        if ratio is None or ratio < MIXED_RATIO:
            return {}
        share = mix["put"] / (mix["get"] + mix["put"])
        return {(backend, "get+cache-mixed"): (*_figures(run, best.calls_per_cpu_s), ratio, round(share, 4))}
    ops = list(mix)
    pair = next((p for p in MIXES if set(p) == set(ops)), None)
    if not cached and pair is not None:  # reads and writes together: what mixing adds (prism.plan.model)
        share = mix[pair[1]] / (mix[pair[0]] + mix[pair[1]])
        return {(backend, "+".join(pair)): (*_figures(run, best.calls_per_cpu_s), None, round(share, 4))}
    if len(ops) != 1 or ops[0] not in OPERATIONS:
        return {}
    key = (backend, ops[0])
    ratio = None
    if cached and ops[0] in ("get", "put"):
        key = (backend, f"{ops[0]}+cache")
        ratio = step.backend.cache_hit_ratio if step.backend is not None else None
        if ops[0] == "get":
            if ratio is not None and ratio >= HIT_RATIO:
                key = ("cache", "get")
            elif ratio is not None and ratio >= MIXED_RATIO:
                key = (backend, "get+cache-mixed")
            elif ratio is None or ratio > 1 - HIT_RATIO:
                return {}
    return {key: (*_figures(run, best.calls_per_cpu_s), ratio if cached else None, 0.0)}


def _figures(run: Results, calls_per_cpu_s: float) -> tuple[float, float, Ladder]:
    """(cpu_us, sat_rps, ladder) of a run whose best figure is ``calls_per_cpu_s``."""
    ladder = tuple(
        (round(sum(busy) / len(busy) / 100, 4), s.latency.p99_us)
        for s in run.steps
        if s.latency.p99_us is not None and s.cpu_pct
        and (busy := [pct for role, pct in s.cpu_pct.items() if role.startswith("worker")])
    )  # fmt: skip
    return round(1e6 / calls_per_cpu_s, 1), calls_per_cpu_s, ladder
