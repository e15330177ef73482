"""``results.json``: the schema (version 1), and the figures derived from raw measurements.

The structs below are the schema: ``results.json`` is one ``Results``
encoded as JSON, and decoding it back into ``Results`` (strict, unknown
fields refused: :func:`read`) is how a reader checks a file. Every field, its
unit and how it is measured is in docs/bench-results.md. A change that
removes or renames a field, or changes its meaning or unit, bumps
``SCHEMA_VERSION``; adding an optional field does not.

Units are in the names: ``_us`` microseconds, ``_s`` seconds, ``_per_s``
per second, ``_pct`` percent of one CPU (100 = one CPU fully busy).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import msgspec

SCHEMA_VERSION = 1
KIND = "prism-bench-results"


class Latency(msgspec.Struct, forbid_unknown_fields=True):
    """Latency of the calls answered OK, microseconds (null when there was none)."""

    p50_us: float | None
    p90_us: float | None
    p99_us: float | None
    p999_us: float | None
    mean_us: float | None
    max_us: float | None


class Operation(msgspec.Struct, forbid_unknown_fields=True):
    """One operation's share of a step."""

    calls: int  # answered OK (and checked) in the window
    calls_per_s: float
    errors: dict[str, int]  # status -> calls
    latency: Latency


class Backend(msgspec.Struct, forbid_unknown_fields=True):
    """What the server's /metrics said over the step (differences across the window)."""

    cache_hits: int
    cache_misses: int
    cache_hit_ratio: float | None
    calls_limited: dict[str, int]  # reason -> calls refused by quotas or shedding
    calls_refused: int  # refused at max_inflight
    server_calls_by_status: dict[str, int]  # as the server counted its answers


class Step(msgspec.Struct, forbid_unknown_fields=True):
    """One rung of the ladder."""

    index: int
    mode: str  # "closed" or "open"
    concurrency: int | None  # closed loop: calls in flight
    offered_calls_per_s: float | None  # open loop: the schedule's rate
    connections: int
    streams_per_connection: int | None  # closed loop
    load_generator: str  # "builtin" or "h2load"
    warmup_s: float
    duration_s: float  # the measured window
    calls: int  # answered OK (and checked) in the window
    calls_per_s: float
    errors: dict[str, int]  # status -> calls (gRPC status names, or client-side: WRONG_ANSWER...)
    error_calls_per_s: float
    latency: Latency
    operations: dict[str, Operation]
    cpu_us_per_call: dict[str, float] | None  # process role -> CPU us per OK call; "total": the server's
    cpu_pct: dict[str, float] | None  # process role -> % of one CPU over the window
    loadgen_cpu_us_per_call: float | None
    other_on_server_cpus_pct: float | None  # busy time on the server's CPUs not the server's
    backend: Backend | None
    open_loop_backlog_max: int | None
    complete: bool  # False: cut short by Ctrl-C


class At80(msgspec.Struct, forbid_unknown_fields=True):
    calls_per_s: float
    p99_us: float | None
    method: str  # "interpolated" between two steps, or "nearest" step


class PerWorker(msgspec.Struct, forbid_unknown_fields=True):
    """The calls/s one worker serves at 100% of its CPU: 1e6 / the workers' CPU per
    call, at the step (of those whose workers were at least half busy, if any was)
    where that is lowest. What ``prism plan`` predicts; steadier than calls/s on a shared
    machine, where other processes take some of the worker's CPU."""

    step: int
    calls_per_cpu_s: float
    worker_busy_pct: float  # the workers' mean % of one CPU at that step
    calls_per_s: float  # what that step served (per worker)


class Saturation(msgspec.Struct, forbid_unknown_fields=True):
    """The most calls/s any step reached, and the p99 at 80% of it."""

    step: int
    calls_per_s: float
    p99_us: float | None
    at_80pct: At80
    per_worker: PerWorker | None = None  # (optional: files before it have none)


class Machine(msgspec.Struct, forbid_unknown_fields=True):
    cpu_model: str | None
    cpus: int | None
    kernel: str
    python: str
    prism_version: str | None
    protobuf_backend: str
    versions: dict[str, str | None]  # Python packages
    h2load: str | None
    backend_versions: dict[str, str | None]  # backend name -> server version


class ServerSetup(msgspec.Struct, forbid_unknown_fields=True):
    started_by_bench: bool
    target: str  # HOST:PORT loaded
    workers: int | None
    cpus: list[int] | None  # the server's CPUs (pinned), null if not pinned or not ours
    load_cpus: list[int] | None
    load_processes: int


class Results(msgspec.Struct, forbid_unknown_fields=True):
    schema_version: int
    kind: str
    outcome: str  # "ok", "interrupted" or "failed"
    failure: str | None
    started_at: str  # ISO 8601, UTC
    finished_at: str
    scenario_file: str
    scenario: dict[str, object]  # the scenario as decoded (defaults filled in)
    quick: bool
    server: ServerSetup
    machine: Machine
    steps: list[Step]
    saturation: Saturation | None
    warnings: list[str]


def write(path: Path, results: Results) -> None:
    """Write ``results`` as indented JSON (atomically: a reader never sees half a file)."""
    data = msgspec.json.format(msgspec.json.encode(results), indent=2)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(data + b"\n")
    tmp.replace(path)


def read(path: Path) -> Results:
    """Read and check a ``results.json`` against the schema; msgspec.ValidationError if it is not one."""
    results = msgspec.json.decode(path.read_bytes(), type=Results, strict=True)
    if results.schema_version != SCHEMA_VERSION or results.kind != KIND:
        raise msgspec.ValidationError(f"not a {KIND} file of schema version {SCHEMA_VERSION}")
    return results


# ---------------------------------------------------------------- figures


def percentile(sorted_values: list[int], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None if empty)."""
    if not sorted_values:
        return None
    rank = max(
        1, math.ceil(round(pct / 100 * len(sorted_values), 9))
    )  # 99.9% of 1000 is 999, not 999.0000001
    return float(sorted_values[rank - 1])


def latency(sorted_us: list[int]) -> Latency:
    return Latency(
        p50_us=percentile(sorted_us, 50),
        p90_us=percentile(sorted_us, 90),
        p99_us=percentile(sorted_us, 99),
        p999_us=percentile(sorted_us, 99.9),
        mean_us=round(sum(sorted_us) / len(sorted_us), 1) if sorted_us else None,
        max_us=float(sorted_us[-1]) if sorted_us else None,
    )


def saturation(steps: list[Step]) -> Saturation | None:
    """The step with the most calls/s; the p99 at 80% of that rate.

    At 80%: interpolated linearly between the two steps whose calls/s
    bracket it (among the steps up to the saturating one, in ladder order),
    else the p99 of the step nearest to it.
    """
    measured = [s for s in steps if s.calls > 0]
    if not measured:
        return None
    top = max(measured, key=lambda s: s.calls_per_s)
    target = 0.8 * top.calls_per_s
    rising = [s for s in measured if s.index <= top.index]
    for low, high in itertools.pairwise(rising):
        if low.calls_per_s <= target <= high.calls_per_s and high.calls_per_s > low.calls_per_s:
            lp, hp = low.latency.p99_us, high.latency.p99_us
            if lp is not None and hp is not None:
                share = (target - low.calls_per_s) / (high.calls_per_s - low.calls_per_s)
                at = At80(round(target, 1), round(lp + share * (hp - lp), 1), "interpolated")
                break
    else:
        nearest = min(rising, key=lambda s: abs(s.calls_per_s - target))
        at = At80(round(target, 1), nearest.latency.p99_us, "nearest")
    return Saturation(top.index, round(top.calls_per_s, 1), top.latency.p99_us, at, per_worker(measured))


MIN_BUSY_PCT = 50.0


def worker_figures(step: Step) -> tuple[float, float, int] | None:
    """(the workers' CPU us per call summed, their mean busy %, how many) of a step; None if not metered."""
    cpu = {k: v for k, v in (step.cpu_us_per_call or {}).items() if k.startswith("worker")}
    busy = [v for k, v in (step.cpu_pct or {}).items() if k.startswith("worker")]
    if not cpu or not busy or sum(cpu.values()) <= 0:
        return None
    return sum(cpu.values()), sum(busy) / len(busy), len(cpu)


def per_worker(steps: list[Step]) -> PerWorker | None:
    """``Saturation.per_worker``: of the steps whose workers were at least half
    busy (all the metered steps if none was), the one of the lowest worker CPU
    per call; None when no step metered the workers."""
    metered = [(s, f) for s in steps if (f := worker_figures(s)) is not None]
    busy_enough = [(s, f) for s, f in metered if f[1] >= MIN_BUSY_PCT]
    best: PerWorker | None = None
    for s, (cpu_us, busy, workers) in busy_enough or metered:
        got = PerWorker(s.index, round(1e6 / cpu_us, 1), round(busy, 1), round(s.calls_per_s / workers, 1))
        if best is None or got.calls_per_cpu_s > best.calls_per_cpu_s:
            best = got
    return best
