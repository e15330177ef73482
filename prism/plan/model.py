"""The cost model ``prism plan`` sizes a deployment with.

A planner can check it by hand. For each backend and each operation
(``get``, ``put``: KeyValue's GetItems, PutItems; ``read_events``,
``write_events``: TimeSeries' ReadEvents of a whole 10-event series,
WriteEvents; PubSub costs as memory's get and put), a benchmark on this kind
of machine measured one worker, pinned to one CPU, on a ladder of load up to
saturation:

    cpu_us   worker CPU per call (microseconds), values of VALUE_BYTES, at
             the step where it is lowest (prism bench's saturation.per_worker:
             large batches; steadier than calls/s on a shared machine)
    sat_rps  1e6 / cpu_us: the calls/s one worker serves at its whole CPU

and, for a namespace with the shared cache: ``("cache", "get")``, a
GetItems answered from the cache; ``(backend, "get+cache")``, one that
missed (the lookup, the backend's read, storing the answer);
``(backend, "put+cache")``, a PutItems (it also invalidates the record).
A hit is measured as an application's read-mostly mix has them, among the
misses its writes cause: a run of 9 gets to 1 put (the plan's 30 s TTL, so
the puts, not the TTL, make the misses: about 90% of the gets hit at any
calls/s), its CPU per call c at hit ratio h, less the puts' and the
misses' shares: c_hit = (c - 0.1 c_put - 0.9 (1 - h) c_miss) / (0.9 h).
(Measured among a short TTL's expiries instead, the run's hit ratio moved
with its own calls/s, 0.4 to 0.9 over one ladder, and a hit cost 61 us
where the read-cached example's mix paid about 40; hits alone, answered in
whole batches with no task, cost 31.)
Without those two, a miss costs c(get) + CACHE_MISS_US and a write c(put) +
CACHE_WRITE_US. Then, for a namespace declaring ``read_rps`` R,
``write_rps`` W, ``records`` N and values of ``item_bytes`` B:

    per-call CPU  c(op) = cpu_us(op) + PER_KIB_US(op) * (B - VALUE_BYTES) / 1024
    hit rate      (KeyValue with the cache; uniform keys) an entry serves
                  from a read that missed until a write to its record or
                  its TTL T (CACHE_TTL_S): L = (1 - exp(-w T)) / w (T if
                  w = 0), with w = W / N * (1 + N / VERSION_WORDS) (a write
                  also invalidates the records sharing its version word: the
                  cache keeps 65,536); a record read r = R / N times a
                  second is a hit h = r L / (1 + r L) of the time, times the
                  share of records the cache holds, min(1, CACHE_RECORDS / N).
                  With W >> N / T, h ~ R / (R + W). N not declared: h = 0
    mixing        (no cache) a call of a mix with a share w = W / (R + W) of
                  writes costs x(w) = k w (1 - w) more than the weighted
                  mean of the two pure streams': 0 for either alone, most at
                  half and half. k from a run of reads and writes together
                  (key (backend, "get+put") or ("read_events+write_events"),
                  writes a share s, CPU per call c_m): k = (c_m - (1 - s)
                  cpu_us(read) - s cpu_us(write)) / (s (1 - s)); without
                  that run, x = 0. (SQLite's reads and writes run in
                  threads of their own, contending with the loop for its
                  CPU and the GIL; the reads also find the writes' WAL.)
    demand        D = R * (h * c_hit + (1 - h) * c(read)) + W * c(write)
                      + (R + W) * x(w)
                  in CPU-microseconds per second (D / 1e6 CPUs); c_hit is
                  ("cache", "get")'s cost, else CACHE_HIT_SHARE * c(read);
                  with the cache, c(read) and c(write) are the "+cache" ones
                  and x = 0 (a hit's cost is measured among writes)
    saturation    S = 1e6 * (R + W) / D: the calls/s of this mix one worker
                  serves at 100% of its CPU
    workers       N_w = ceil(D / 1e6 / TARGET_UTILISATION), at least 1: each
                  worker is one CPU, kept at TARGET_UTILISATION of it at
                  the declared peak (the rest is headroom for bursts)
    utilisation   U = D / 1e6 / N_w

A tenant's namespaces share its workers, so a tenant's N_w and S are those of
the sum of its namespaces' D and calls. The machine needs the sum of the
tenants' N_w, plus one CPU for the supervisor and admin process when there
are more than two.

Calibration and measure alike: each figure is ``prism bench``'s
saturation.per_worker (1e6 / the lowest worker CPU per call over the
steps where the worker was at least half busy), on the same closed
ladder (32, 128, 256 calls in flight, 2 s warm-up, 4 s measured, one worker
pinned). Other work only ever adds to a run's CPU per call (on the worker's
CPU, or the load generator's: a starved generator sends smaller batches,
each call then carrying more of the loop's fixed cost), so
``bench/plan_accuracy.py`` makes every run twice and keeps the lower.

Where the costs come from: ``--bench FILE`` (``prism bench``'s results.json
of a one-operation scenario, ``prism.plan.costfile``), a quick run of
``prism bench`` (``prism.plan.quick``), else ``DEFAULT_COSTS``: this
repository's own run of ``bench/plan_accuracy.py``'s calibration scenarios
on a 2-CPU AMD EPYC (the same scenarios ``--bench-quick`` runs, longer).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Final

TARGET_UTILISATION: Final = 0.7
CACHE_HIT_SHARE: Final = 0.62  # a hit's CPU (among misses) over an uncached read's: 41.6 / 66.6
# Extra worker CPU per KiB of value beyond VALUE_BYTES: copying, framing, the backend's I/O.
# (read_events reads 10 events: ten times get's.)
PER_KIB_US: Final = {"get": 0.25, "put": 0.6, "read_events": 2.5, "write_events": 0.6}
VALUE_BYTES: Final = 512  # the value size the costs are measured at
# The cache the plan gives a namespace: how many records, for how long.
CACHE_RECORDS: Final = 100_000
CACHE_TTL_S: Final = 30.0
VERSION_WORDS: Final = 65536  # prism.cache.shared's record version words
OPS: Final = {
    "keyvalue": ("get", "put"),
    "timeseries": ("read_events", "write_events"),
    "pubsub": ("get", "put"),
}
HIT: Final = ("cache", "get")
CACHED: Final = {"get": "get+cache", "put": "put+cache"}  # the ops' costs on a namespace with the cache
# Without a measurement of them: what the cache adds to a miss and to a write
# (DEFAULT_COSTS' sqlite: get 66.6 us, missing the cache 88.7; put 80.7, 94.7).
CACHE_MISS_US: Final = 22.0
CACHE_WRITE_US: Final = 14.0


@dataclass(frozen=True)
class Cost:
    """One backend's figures for one operation (see the module docstring).

    ``ladder``: (worker utilisation 0-1, p99 microseconds) of each step of
    the bench it came from, in ladder order; () when none (built in).
    """

    cpu_us: float
    sat_rps: float
    ladder: tuple[tuple[float, float], ...] = ()
    hit_ratio: float | None = None  # the cache's, in the run it came from (a namespace with the cache)
    write_share: float = 0.0  # the puts' share of that run's calls (a hit's: measured among writes)


@dataclass(frozen=True)
class CostTable:
    """Costs by (backend, operation), and where they came from."""

    costs: dict[tuple[str, str], Cost]
    source: str
    machine: dict[str, Any] = field(default_factory=dict)
    files: dict[tuple[str, str], str] = field(default_factory=dict)  # key -> the file it came from

    def cost(self, backend: str, op: str) -> Cost | None:
        return self.costs.get((backend, op))

    @property
    def backends(self) -> set[str]:
        return {b for b, _ in self.costs}


# bench/plan_accuracy.py --defaults on this repository's 2-CPU AMD EPYC
# (2026-12-06, busy: other processes took 3-57% of the worker's CPU during
# the runs): each a closed ladder of 32, 128 and 256 calls in flight, 4 s per
# step, 2,000 records of 512 B (200 for the cache's hits), uniform keys, one
# worker pinned to CPU 0; the worker's lowest CPU per call over the steps
# (prism bench's saturation.per_worker), the lowest of up to three runs. The
# figures before them (bench/results/backends.json: 100-byte values at 64 in
# flight, one cost for KeyValue's and TimeSeries' reads) were 20-45% off
# this machine's: a TimeSeries' ReadEvents of 10 events costs 2-3 GetItems.
# No run of reads and writes together: with these costs, mixing adds nothing (x = 0).
DEFAULT_COSTS: Final = CostTable(
    {
        # Among misses (1 s TTL, 89% hits: 46.7 us a get); hits alone 31.1. (The read-cached
        # example's quiet measure, 45.5 us a call at 93% hits, less its misses and writes: 39.)
        HIT: Cost(41.6, 24038),
        ("memory", "get"): Cost(58.3, 17153),
        ("memory", "put"): Cost(64.9, 15408),
        ("memory", "read_events"): Cost(115.8, 8636),
        ("memory", "write_events"): Cost(58.6, 17065),
        ("postgres", "get"): Cost(69.5, 14388),
        ("postgres", "put"): Cost(94.3, 10604),
        ("postgres", "read_events"): Cost(267.6, 3737),
        ("postgres", "write_events"): Cost(313.5, 3190),
        ("redis", "get"): Cost(68.3, 14641),
        ("redis", "put"): Cost(80.1, 12484),
        ("sqlite", "get"): Cost(66.6, 15015),
        ("sqlite", "get+cache"): Cost(88.7, 11274),
        ("sqlite", "put"): Cost(80.7, 12392),
        ("sqlite", "put+cache"): Cost(94.7, 10560),
        ("sqlite", "read_events"): Cost(183.8, 5441),
        ("sqlite", "write_events"): Cost(127.3, 7855),
    },
    "built in (bench/plan_accuracy.py's calibration, 2-CPU AMD EPYC)",
)


@dataclass(frozen=True)
class Demand:
    """What one namespace asks of its backend's workers, in CPU-microseconds per second."""

    cpu_us_per_s: float
    calls_per_s: float
    read_us: float  # per read, after the cache
    write_us: float  # per write
    hit_rate: float
    mix_us: float = 0.0  # per call: what mixing reads and writes adds (MIX), in cpu_us_per_s

    @property
    def saturation_rps(self) -> float:
        """S of the module docstring: this mix's calls/s at one worker's whole CPU."""
        return 1e6 * self.calls_per_s / self.cpu_us_per_s if self.cpu_us_per_s > 0 else 0.0


def ops_needed(abstraction: str, read_rps: float, write_rps: float) -> list[str]:
    """The operations whose costs a namespace's demand takes (reads first)."""
    read, write = OPS[abstraction]
    return [op for op, rps in ((read, read_rps), (write, write_rps)) if rps > 0]


def hit_rate(read_rps: float, write_rps: float, records: int) -> float:
    """h of the module docstring."""
    if records <= 0 or read_rps <= 0:
        return 0.0
    r, w = read_rps / records, write_rps / records * (1 + (records - 1) / VERSION_WORDS)
    life = CACHE_TTL_S if w <= 0 else -math.expm1(-w * CACHE_TTL_S) / w
    held = min(1.0, CACHE_RECORDS / records)
    return held * r * life / (1.0 + r * life)


def per_call(cost: Cost, op: str, item_bytes: int) -> float:
    """c(op) of the module docstring, never below a tenth of the measured cost."""
    extra = PER_KIB_US.get(op, 0.0) * (item_bytes - VALUE_BYTES) / 1024
    return max(cost.cpu_us * 0.1, cost.cpu_us + extra)


def demand(
    table: CostTable,
    backend: str,
    abstraction: str,
    read_rps: float,
    write_rps: float,
    item_bytes: int,
    records: int,
    cached: bool,
) -> Demand | str:
    """The module docstring's D for one namespace on ``backend``; or what the
    table lacks for it ("sqlite put")."""
    read_op, write_op = OPS[abstraction]
    missing = [
        f"{backend} {op}" for op in ops_needed(abstraction, read_rps, write_rps)
        if table.cost(backend, op) is None
    ]  # fmt: skip
    if missing:
        return ", ".join(missing)
    read, write = table.cost(backend, read_op), table.cost(backend, write_op)
    c_read = per_call(read, read_op, item_bytes) if read else 0.0
    c_write = per_call(write, write_op, item_bytes) if write else 0.0
    hit_cost = table.cost(*HIT)
    c_hit = per_call(hit_cost, "get", item_bytes) if hit_cost else CACHE_HIT_SHARE * c_read
    if cached:
        c_read = _with_cache(table, backend, read_op, item_bytes, c_read, CACHE_MISS_US)
        c_write = _with_cache(table, backend, write_op, item_bytes, c_write, CACHE_WRITE_US)
    hit = hit_rate(read_rps, write_rps, records) if cached else 0.0
    per_read = hit * c_hit + (1.0 - hit) * c_read
    calls = read_rps + write_rps
    mixing = 0.0 if cached else mix_us(table, backend, abstraction, write_rps / calls if calls else 0.0)
    cpu = read_rps * per_read + write_rps * c_write + calls * mixing
    return Demand(cpu, calls, per_read, c_write, hit, mixing)


def mix_us(table: CostTable, backend: str, abstraction: str, w: float) -> float:
    """x(w) of the module docstring: what a call costs more in a mix of reads and a
    share ``w`` of writes than the two streams' weighted mean; 0 without MIX's run."""
    read_op, write_op = OPS[abstraction]
    mixed, read, write = (table.cost(backend, op) for op in (f"{read_op}+{write_op}", read_op, write_op))
    s = mixed.write_share if mixed else 0.0
    if mixed is None or read is None or write is None or not 0 < s < 1:
        return 0.0
    k = (mixed.cpu_us - (1 - s) * read.cpu_us - s * write.cpu_us) / (s * (1 - s))
    return k * w * (1 - w)


def _with_cache(
    table: CostTable, backend: str, op: str, item_bytes: int, plain: float, extra: float
) -> float:
    """c(op) on a namespace with the cache: measured ("+cache"), else ``plain + extra``."""
    measured = table.cost(backend, CACHED.get(op, op))
    return per_call(measured, op, item_bytes) if measured else plain + extra


def workers_for(cpu_us_per_s: float) -> int:
    """N_w of the module docstring."""
    return max(1, math.ceil(cpu_us_per_s / 1e6 / TARGET_UTILISATION - 1e-9))


def p99_at(ladder: tuple[tuple[float, float], ...], utilisation: float) -> tuple[float, str] | None:
    """The p99 a bench ladder (in ladder order) measured at ``utilisation``
    (0-1): interpolated linearly between the first two consecutive steps
    whose worker utilisation brackets it, else that of the step nearest to
    it; (p99 us, "interpolated" | "nearest"), None without a ladder."""
    if not ladder:
        return None
    for (u0, p0), (u1, p1) in itertools.pairwise(ladder):
        low, high = min(u0, u1), max(u0, u1)
        if low <= utilisation <= high and high > low:
            return p0 + (utilisation - u0) / (u1 - u0) * (p1 - p0), "interpolated"
    _, p = min(ladder, key=lambda s: abs(s[0] - utilisation))
    return p, "nearest"


__all__ = [
    "CACHED",
    "CACHE_HIT_SHARE",
    "CACHE_RECORDS",
    "DEFAULT_COSTS",
    "HIT",
    "OPS",
    "TARGET_UTILISATION",
    "Cost",
    "CostTable",
    "Demand",
    "demand",
    "hit_rate",
    "ops_needed",
    "p99_at",
    "workers_for",
]
