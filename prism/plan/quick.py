"""Measuring the cost model's figures on this machine with ``prism bench``.

``prism plan --bench-quick`` (or yes to its question on a terminal) runs
``prism bench --quick`` once per figure the needs can use: for each backend a
need may take (its candidates: ``planner.candidates_for``), the operations
it sends (KeyValue get, put; TimeSeries read_events, write_events) and, where
the plan may give it the shared cache (and it declares its records: else
the model counts no hits), a cache hit, a miss and a write with the cache
on. A hit is measured as applications' read-mostly mixes have them: among
misses that writes cause (``HIT_MIX``: 9 gets to 1 put, the puts
invalidating their records, about 90% of the gets hits whatever the calls/s;
``prism.plan.costfile`` takes the misses' and the writes' cost out, so a
hit's figure needs the miss's and the write's runs too).
A need that reads and writes (with no cache) also gets a run of both, half
and half: what mixing them adds to a call (``prism.plan.model``'s x(w)).
``bench/plan_accuracy.py`` runs the same scenarios with longer steps. Each
scenario is one operation on one namespace (a hit's: two), records of
``model.VALUE_BYTES``, uniform keys, one worker pinned (``prism bench``'s
placement), with the options the plan writes for that backend; its
results.json is what ``--bench`` reads (``prism.benchmark.costs``).

PubSub has no such scenario (a subscriber's delivery is no bench operation):
its needs keep the built-in costs.

Every run is a ``prism bench`` process, bounded by a timeout; one that fails
stops the measuring with one line naming it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from prism.plan.model import HIT, OPS, VALUE_BYTES
from prism.plan.needs import Need
from prism.plan.planner import candidates_for, would_cache

LADDER = (32, 128, 256)  # closed loop: calls in flight; the top saturates one worker here
RECORDS = 2000
MIX = "mix"  # a Calibration's op: its abstraction's read and write, half and half (model's x(w))
HIT_MIX = {"get": 9, "put": 1}  # a hit's run: gets among invalidating puts, ~90% of gets hit
HIT_TTL_S = 30.0  # (as a plan's: the writes, not the TTL, make the misses)
MISS_TTL_S = 0.001  # every entry expired when read again: misses only
QUICK_TIMEOUT_S = 90.0
FULL_STEP_S = (2.0, 4.0)  # warm-up, measured, per step of a full (not quick) run (plan_accuracy's measure's)


class QuickFailed(RuntimeError):
    """A calibration run failed: one line naming it."""


@dataclass(frozen=True)
class Calibration:
    """One figure to measure: ``op`` on ``backend`` (``MIX``: its abstraction's
    read and write, half and half); ``cache``: "" (none), "hit", "miss" (a
    get) or "on" (a put) with the shared cache."""

    backend: str
    abstraction: str
    op: str
    cache: str = ""

    @property
    def name(self) -> str:
        if self.op == MIX:
            return f"{self.backend}-{self.abstraction}-mix"
        return "-".join(p for p in ("cache" if self.cache == "hit" else self.backend, self.op,
                                    "" if self.cache == "hit" else self.cache) if p)  # fmt: skip

    @property
    def key(self) -> tuple[str, str]:
        """The cost table key the run gives."""
        if self.cache == "hit":
            return HIT
        if self.op == MIX:
            return (self.backend, "+".join(OPS[self.abstraction]))
        return (self.backend, f"{self.op}+cache" if self.cache else self.op)


def calibrations_for(needs: Sequence[Need], addresses: Mapping[str, str]) -> list[Calibration]:
    """The runs that give every figure ``needs`` can use on this machine, in a stable order."""
    out: dict[tuple[str, str], Calibration] = {}
    for need in needs:
        if need.abstraction == "pubsub":
            continue
        read, write = OPS[need.abstraction]
        for backend in candidates_for(need, addresses):
            wanted = [c for c, rps in ((read, need.read_rps), (write, need.write_rps)) if rps > 0]
            for op in [*wanted, MIX] if len(wanted) == 2 else wanted:  # (both: what mixing adds)
                cal = Calibration(backend, need.abstraction, op)
                out.setdefault(cal.key, cal)
            if would_cache(need, backend) and need.records > 0:  # (no records declared: no hits)
                for cal in (  # (a hit's figure takes the miss's and the cached write's out)
                    Calibration(backend, "keyvalue", "get", "hit"),
                    Calibration(backend, "keyvalue", "get", "miss"),
                    Calibration(backend, "keyvalue", "put", "on"),
                ):
                    out.setdefault(cal.key, cal)
    return list(out.values())


def scenario_toml(cal: Calibration, addresses: Mapping[str, str], quick: bool) -> str:
    """The ``prism bench`` scenario of one calibration."""
    options = {"postgres": ("dsn", "postgres"), "redis": ("url", "redis")}.get(cal.backend)
    cache = {"hit": f"{HIT_TTL_S}", "on": "30", "miss": f"{MISS_TTL_S}"}.get(cal.cache)
    warmup, duration = FULL_STEP_S
    lines = [
        f'name = "plan-calibration-{cal.name}"',
        "[server]",
        "workers = 1",
        "[[namespaces]]",
        'name = "plancal"',
        f'abstraction = "{cal.abstraction}"',
        f'backend = "{cal.backend}"',
    ]
    if options is not None:
        key, backend = options
        lines.append(f"options = {{ {key} = {_q(addresses[backend])} }}")
    if cache is not None:
        lines.append(f"cache = {{ enabled = true, ttl_s = {cache} }}")
    lines += [
        "[workload]",
        f"records = {RECORDS}",
        f"value_bytes = {VALUE_BYTES}",
        "[workload.mix]",
        *(f"{op} = {w}" for op, w in _mix(cal).items()),
        "[load]",
        'mode = "closed"',
        f"concurrency = [{', '.join(map(str, LADDER))}]",
        f"warmup_s = {warmup}",
        f"duration_s = {duration}",
    ]
    return "\n".join(lines) + "\n"


def seconds(calibrations: Sequence[Calibration], quick: bool) -> float:
    """About how long the runs take (start, seeding and the steps)."""
    warmup, duration = (0.3, 1.0) if quick else FULL_STEP_S
    return len(calibrations) * (4.0 + len(LADDER) * (warmup + duration + 0.6))


def calibrate(
    calibrations: Sequence[Calibration],
    addresses: Mapping[str, str],
    workdir: Path,
    *,
    quick: bool = True,
    progress: TextIO = sys.stderr,
    timeout_s: float | None = None,
) -> list[Path]:
    """Run each calibration with ``prism bench`` (``--quick`` if ``quick``) in
    ``workdir``; their results.json files. QuickFailed (one line) if one fails."""
    paths = []
    limit = timeout_s or (QUICK_TIMEOUT_S if quick else QUICK_TIMEOUT_S + len(LADDER) * sum(FULL_STEP_S))
    for i, cal in enumerate(calibrations):
        scenario = workdir / f"{cal.name}.toml"
        out = workdir / cal.name
        scenario.write_text(scenario_toml(cal, addresses, quick))
        progress.write(f"prism plan: measuring {' '.join(cal.key)} ({i + 1}/{len(calibrations)}): "
                       f"prism bench{' --quick' if quick else ''} {scenario.name}\n")  # fmt: skip
        progress.flush()
        argv = [sys.executable, "-m", "prism.cli", "bench", str(scenario), "--out", str(out)]
        started = time.monotonic()
        try:
            done = subprocess.run(
                [*argv, "--quick"] if quick else argv,
                capture_output=True, text=True, timeout=limit, env=os.environ, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise QuickFailed(f"prism bench of {cal.name} took over {limit:.0f} s: stopped") from None
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.startswith("prism bench")]
            why = lines[-1] if lines else f"exit {done.returncode}"
            raise QuickFailed(f"prism bench of {cal.name} failed ({why})")
        paths.append(out / "results.json")
        progress.write(f"prism plan: {cal.name} measured in {time.monotonic() - started:.0f} s\n")
        progress.flush()
    return paths


def _mix(cal: Calibration) -> dict[str, int]:
    if cal.cache == "hit":
        return HIT_MIX
    if cal.op == MIX:
        return dict.fromkeys(OPS[cal.abstraction], 1)
    return {cal.op: 1}


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["Calibration", "QuickFailed", "calibrate", "calibrations_for", "scenario_toml", "seconds"]
