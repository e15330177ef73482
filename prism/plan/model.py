"""The cost model ``prism plan`` sizes a deployment with.

A planner can check it by hand. For each backend and each kind of call
(``read``: GetItems, ReadEvents; ``write``: PutItems, WriteEvents, Publish),
a benchmark on this kind of machine measured one worker, pinned to one CPU,
at saturation:

    cpu_us   worker CPU per call (microseconds), for a small value
    sat_rps  calls/s one worker served (about 1e6 / cpu_us when the worker,
             not the backend, is what saturates)

Then, for a namespace declaring ``read_rps`` R, ``write_rps`` W and values of
``item_bytes`` B:

    per-call CPU   c(op) = cpu_us(op) + PER_KIB_US(op) * B / 1024
    cached reads   a hit costs CACHE_HIT_SHARE * c(read); the share of reads
                   that hit is h = min(1, cache_records / records) (uniform
                   keys: a skewed key distribution only hits more; with
                   records not declared, h = 0)
    demand         D = R * (h * CACHE_HIT_SHARE + (1 - h)) * c(read) + W * c(write)
                   (CPU-microseconds per second: D / 1e6 CPUs)
    workers        N = ceil(D / 1e6 / TARGET_UTILISATION), at least 1: each
                   worker is one CPU, kept at TARGET_UTILISATION of it at
                   the declared peak (the rest is headroom for bursts)
    utilisation    U = D / 1e6 / N

A tenant's namespaces share its workers, so a tenant's N is that of the sum
of its namespaces' D. The machine needs the sum of the tenants' N, plus one
CPU for the supervisor and admin process when there are more than two.

Defaults (``DEFAULT_COSTS``) are this repository's own measurements
(``bench/results/backends.json``: h2load, 64 calls in flight, 100-byte
values; ``bench/results/gateway.json``: a shared-cache hit cost 0.44 of an
uncached read; ``bench/results/kv_get.json``'s ladder: the per-KiB costs).
``--bench FILE`` replaces them with a run on the planner's own machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from prism.errors import ConfigError

TARGET_UTILISATION: Final = 0.7
CACHE_HIT_SHARE: Final = 0.44
# Extra worker CPU per KiB of value: copying, framing, the backend's I/O.
PER_KIB_US: Final = {"read": 0.25, "write": 0.6}
# How many records a namespace's cache holds when the plan turns it on.
CACHE_RECORDS: Final = 100_000


@dataclass(frozen=True)
class Cost:
    """One backend's figures for one kind of call (see the module docstring)."""

    cpu_us: float
    sat_rps: float


@dataclass(frozen=True)
class CostTable:
    """Costs by (backend, "read" | "write"), and where they came from."""

    costs: dict[tuple[str, str], Cost]
    source: str
    machine: dict[str, Any] = field(default_factory=dict)

    def cost(self, backend: str, op: str) -> Cost | None:
        return self.costs.get((backend, op))

    @property
    def backends(self) -> set[str]:
        return {b for b, _ in self.costs}


# bench/results/backends.json (this repository, 2 CPUs, Xeon): cpu_us_per_call, calls_per_s.
DEFAULT_COSTS: Final = CostTable(
    {
        ("memory", "read"): Cost(60.4, 16373),
        ("memory", "write"): Cost(64.1, 15450),
        ("sqlite", "read"): Cost(85.3, 11705),
        ("sqlite", "write"): Cost(90.4, 10802),
        ("postgres", "read"): Cost(71.9, 13580),
        ("postgres", "write"): Cost(69.1, 13789),
        ("redis", "read"): Cost(80.3, 12324),
        ("redis", "write"): Cost(82.8, 11892),
    },
    "built in (bench/results/backends.json)",
)

_OPS: Final = {"prism_get": "read", "prism_put": "write"}


def load_costs(paths: list[Path]) -> CostTable:
    """A cost table from benchmark results (``bench/backends.py``'s JSON, or
    ``prism bench``'s results.json: ``prism.benchmark.costs``); later files
    override earlier ones. ConfigError naming the file if unusable."""
    if not paths:
        return DEFAULT_COSTS
    costs: dict[tuple[str, str], Cost] = {}
    machine: dict[str, Any] = {}
    for path in paths:
        try:
            data = json.loads(path.read_bytes())
            if data.get("kind") == "prism-bench-results":  # prism bench's results.json
                from prism.benchmark.costs import plan_costs

                costs.update({key: Cost(*figures) for key, figures in plan_costs(data).items()})
                machine = data.get("machine", machine)
                continue
            results = data["results"]
            machine = data.get("machine", machine)
            for backend, figures in results.items():
                for key, op in _OPS.items():
                    got = figures.get(key)
                    if got and got.get("cpu_us_per_call") and got.get("calls_per_s"):
                        costs[backend, op] = Cost(float(got["cpu_us_per_call"]), float(got["calls_per_s"]))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError, AttributeError, msgspec.ValidationError) as exc:
            raise ConfigError(f"{path}: not benchmark results ({type(exc).__name__}: {exc})") from None
    if not costs:
        raise ConfigError(f"{', '.join(map(str, paths))}: no backend costs in these results")
    return CostTable(costs, ", ".join(map(str, paths)), machine)


@dataclass(frozen=True)
class Demand:
    """What one namespace asks of its backend's workers, in CPU-microseconds per second."""

    cpu_us_per_s: float
    read_us: float  # per read, after the cache
    write_us: float  # per write
    hit_rate: float


def demand(
    table: CostTable,
    backend: str,
    read_rps: float,
    write_rps: float,
    item_bytes: int,
    records: int,
    cached: bool,
) -> Demand | None:
    """The module docstring's D for one namespace on ``backend``; None if the table has no figures for it."""
    read, write = table.cost(backend, "read"), table.cost(backend, "write")
    if read is None or write is None:
        return None
    kib = item_bytes / 1024
    c_read = read.cpu_us + PER_KIB_US["read"] * kib
    c_write = write.cpu_us + PER_KIB_US["write"] * kib
    hit = min(1.0, CACHE_RECORDS / records) if cached and records > 0 else 0.0  # (unknown: none)
    per_read = (hit * CACHE_HIT_SHARE + (1.0 - hit)) * c_read
    return Demand(read_rps * per_read + write_rps * c_write, per_read, c_write, hit)


def workers_for(cpu_us_per_s: float) -> int:
    """N of the module docstring."""
    return max(1, math.ceil(cpu_us_per_s / 1e6 / TARGET_UTILISATION - 1e-9))


def predicted_rps_per_worker(d: Demand, read_rps: float, write_rps: float) -> float:
    """The calls/s one worker saturates at, for this namespace's mix (1e6 CPU-us per second)."""
    calls = read_rps + write_rps
    if calls <= 0:
        return 0.0
    per_call = d.cpu_us_per_s / calls
    return 1e6 / per_call


__all__ = [
    "CACHE_HIT_SHARE",
    "DEFAULT_COSTS",
    "TARGET_UTILISATION",
    "Cost",
    "CostTable",
    "Demand",
    "demand",
    "load_costs",
    "predicted_rps_per_worker",
    "workers_for",
]
