"""What ``prism plan --bench results.json`` takes from a ``prism bench`` run.

``prism plan``'s cost model (``prism.plan.model``) wants, per backend and
kind of call (``read``: GetItems, ReadEvents; ``write``: PutItems,
WriteEvents, Publish), one worker's CPU per call and the calls/s one worker
served at saturation. A run gives them when its scenario sends one
operation (a mix's CPU per call is no single operation's), the bench
started the server (so its CPU was metered), and a step answered calls:

    cpu_us   the saturation step's CPU per call summed over the worker
             processes (``cpu_us_per_call["worker..."]``)
    sat_rps  the saturation step's calls/s / the number of workers
"""

from __future__ import annotations

from typing import Any

import msgspec

from prism.benchmark.results import Results

KINDS = {"get": "read", "read_events": "read", "put": "write", "write_events": "write", "publish": "write"}


def plan_costs(data: dict[str, Any]) -> dict[tuple[str, str], tuple[float, float]]:
    """``{(backend, kind): (cpu_us, sat_rps)}`` from a results.json document ({} if it gives none).

    Raises msgspec.ValidationError if the document is not a results.json of this schema.
    """
    run = msgspec.convert(data, Results, strict=False)
    scenario: dict[str, Any] = dict(run.scenario)
    workload: dict[str, Any] = dict(scenario.get("workload") or {})
    ops = [op for op, weight in dict(workload.get("mix") or {}).items() if weight]
    if len(ops) != 1 or ops[0] not in KINDS or run.saturation is None:
        return {}
    namespaces: list[dict[str, Any]] = list(scenario.get("namespaces") or [])
    wanted = workload.get("namespace") or (namespaces[0]["name"] if namespaces else "")
    backend = next((str(ns.get("backend", "sqlite")) for ns in namespaces if ns.get("name") == wanted), None)
    step = next(s for s in run.steps if s.index == run.saturation.step)
    workers = {role: us for role, us in (step.cpu_us_per_call or {}).items() if role.startswith("worker")}
    if backend is None or not workers:
        return {}
    return {(backend, KINDS[ops[0]]): (sum(workers.values()), step.calls_per_s / len(workers))}
