"""One step of the ladder: drive it (built-in generator or h2load) and meter the server around it.

The server's CPU time (``/proc``, per process of its tree) and its
``/metrics`` counters are read just before and just after the measured
window, the load generator's figures cover the same window, and CPU per
call is CPU time over the calls answered OK in it.
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prism.benchmark import h2load
from prism.benchmark.loadgen import Plan
from prism.benchmark.loadpool import LoadPool, StepTotals
from prism.benchmark.metrics_text import Sample, fetch_metrics, metric_sum
from prism.benchmark.procstat import CLK_TCK, cpu_counters, ticks_to_us
from prism.benchmark.results import Backend, Operation, Step, latency
from prism.benchmark.servers import PrismServer
from prism.benchmark.workload import EMPTY_ANSWER, PATHS, Calls, Spec

H2LOAD_OPS = ("get", "put", "scan", "read_events")


@dataclass(frozen=True)
class Rung:
    """What a step asks for."""

    index: int
    mode: str
    value: float  # concurrency (closed) or calls/s (open)
    streams_per_connection: int
    open_connections: int
    warmup_s: float
    duration_s: float

    @property
    def shape(self) -> tuple[int, int]:
        """(connections, streams per connection) for a closed-loop step."""
        wanted = int(self.value)
        connections = max(1, math.ceil(wanted / self.streams_per_connection))
        return connections, math.ceil(wanted / connections)


# (when, CPU ticks by process, (busy, steal) ticks of the server's CPUs, /metrics samples)
Reading = tuple[float, dict[str, int] | None, tuple[int, int] | None, list[Sample] | None]


class Meter:
    """The server-side readings around a window: CPU by process, CPU counters, /metrics."""

    def __init__(
        self, server: PrismServer | None, cpus: tuple[int, ...] | None, admin_url: str | None
    ) -> None:
        self.server, self.cpus, self.admin_url = server, cpus, admin_url

    def read(self, *, before: bool) -> Reading:
        """Readings for the start (``before``) or the end of a window. /metrics is read
        outside the window's CPU readings: the admin process's work answering it is not
        the calls'."""
        samples = fetch_metrics(self.admin_url) if self.admin_url and before else None
        now = time.monotonic()
        ticks = self.server.cpu_ticks_by_process() if self.server is not None else None
        counters = cpu_counters(self.cpus) if self.cpus else None
        if self.admin_url and not before:
            samples = fetch_metrics(self.admin_url)
        return now, ticks, counters, samples


def one_request(spec: Spec) -> bool:
    """Whether every call of the workload is the same request (what h2load can send)."""
    if len(spec.weights) != 1:
        return False
    (op,) = spec.weights
    if op == "scan":
        return spec.records <= spec.scan_limit  # else the page carries a token, which need not repeat
    return op in H2LOAD_OPS and spec.records == 1


def fixed_request(spec: Spec, calls: Calls) -> tuple[str, bytes, bytes] | None:
    """(op, request, expected answer) when every call of the workload is the same request."""
    if not one_request(spec):
        return None
    (op,) = spec.weights
    if op == "get":
        return op, calls.build[op](0), calls.expected_get(0)
    if op == "put":
        return op, calls.build[op](0), EMPTY_ANSWER
    answer = spec.learned.get(op, {}).get(0)
    return (op, calls.build[op](0), answer) if answer is not None else None


def run_builtin(
    pool: LoadPool, spec: Spec, rung: Rung, host: str, port: int, meter: Meter, wait: Callable[[float], None]
) -> tuple[StepTotals, list[Reading], int]:
    """Drive one step with the built-in generator; (totals, [before, after] readings, connections)."""
    if rung.mode == "closed":
        connections, streams = rung.shape
        rate = 0.0
    else:
        connections, streams, rate = rung.open_connections, 0, rung.value
    plan = Plan(
        host, port, rung.mode, connections, streams, rate, 0.0, rung.warmup_s, rung.duration_s, rung.index + 1
    )
    start_at = pool.start(plan, spec)
    readings: list[Reading] = []
    try:
        wait(start_at + rung.warmup_s)
        readings.append(meter.read(before=True))
        wait(start_at + rung.warmup_s + rung.duration_s)
        if rung.mode == "closed":
            readings.append(meter.read(before=False))
            return pool.collect(30.0), readings, connections
        # Open loop: the window's calls may be answered after it (the drain); the
        # server's CPU is read once they are.
        totals = pool.collect(30.0)
        readings.append(meter.read(before=False))
        return totals, readings, connections
    except KeyboardInterrupt:
        pool.stop()
        if len(readings) == 1:
            readings.append(meter.read(before=False))
        totals = pool.collect(30.0)
        raise Interrupted(totals, readings, connections) from None


class Interrupted(Exception):
    """Ctrl-C during a step: what was measured until then."""

    def __init__(self, totals: StepTotals | None, readings: list[Reading], connections: int) -> None:
        super().__init__("interrupted")
        self.totals, self.readings, self.connections = totals, readings, connections


def run_h2load(
    fixed: tuple[str, bytes, bytes],
    rung: Rung,
    host: str,
    port: int,
    meter: Meter,
    wait: Callable[[float], None],
) -> tuple[StepTotals, list[Reading], int]:
    """Drive one closed-loop step of one fixed request with h2load, and check its answers by size."""
    op, request, answer = fixed
    path = h2load.h2load_path()
    if path is None:
        raise h2load.LoadFailed("h2load is not installed")
    connections, streams = rung.shape
    with tempfile.TemporaryDirectory(prefix="prism-bench-h2load-") as tmp:
        body, log = Path(tmp) / "body", Path(tmp) / "log"
        body.write_bytes(request)
        argv = [
            path, "-t", "1", "-c", str(connections), "-m", str(streams),
            "-D", f"{max(1, round((rung.warmup_s + rung.duration_s) * 1000))}ms",
            "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
            "--log-file", str(log), f"http://{host}:{port}{PATHS[op].decode()}",
        ]  # fmt: skip
        before_cpu = _children_cpu_s()
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        readings: list[Reading] = []
        try:
            wait(started + 0.1 + rung.warmup_s)
            readings.append(meter.read(before=True))
            wait(started + 0.1 + rung.warmup_s + rung.duration_s)
            readings.append(meter.read(before=False))
            out, _ = proc.communicate(timeout=rung.duration_s + rung.warmup_s + 60)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise h2load.LoadFailed(f"h2load exited with {proc.returncode}:\n{out}")
        result = h2load.parse_summary(out, *h2load.read_log(log))
        window = _window_latencies(log, rung.warmup_s, rung.duration_s)
    errors: dict[str, int] = {}
    wrong: list[str] = []
    if result.failed or result.non_2xx:
        errors["HTTP_ERROR"] = result.failed + result.non_2xx
    if result.data_bytes != result.succeeded * len(answer):
        # An error status comes as HTTP 200 with no DATA: h2load cannot tell it from a wrong answer.
        wrong.append(
            f"h2load: {result.data_bytes} answer bytes for {result.succeeded} calls "
            f"of {len(answer)} bytes each (error statuses or wrong answers)"
        )
    totals = StepTotals(
        latencies_us={op: sorted(window)},
        errors={op: errors},
        wrong=wrong,
        wrong_total=len(wrong),
        loadgen_cpu_s=(_children_cpu_s() - before_cpu) * rung.duration_s / (rung.warmup_s + rung.duration_s),
        backlog_max=0,
        last_answer_at=0.0,
    )
    return totals, readings, connections


def _window_latencies(log: Path, warmup_s: float, duration_s: float) -> list[int]:
    """Latencies of the HTTP 200 calls of an h2load log that ended in the measured window
    (from ``warmup_s`` after the first call started, for ``duration_s``)."""
    rows = []
    with log.open() as lines:
        for line in lines:
            parts = line.split("\t")
            if len(parts) >= 3:
                rows.append((int(parts[0]), parts[1], int(parts[2])))
    if not rows:
        return []
    begin = min(r[0] for r in rows) + warmup_s * 1e6
    end = begin + duration_s * 1e6
    return [latency for start, status, latency in rows if status == "200" and begin <= start + latency < end]


def _children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


def step_record(
    rung: Rung, generator: str, totals: StepTotals, readings: list[Reading], connections: int, complete: bool
) -> Step:
    """The ``Step`` of results.json from what was measured."""
    window = rung.duration_s
    if len(readings) == 2 and (rung.mode == "closed" or not complete):
        window = max(1e-6, readings[1][0] - readings[0][0])
    elif len(readings) == 2 and totals.last_answer_at:
        # Open loop: the window's calls were answered by last_answer_at (in the drain when
        # the server fell behind): the rate they were answered at.
        window = max(rung.duration_s, totals.last_answer_at - readings[0][0])
    ok = totals.ok_calls
    errors: dict[str, int] = {}
    for counts in totals.errors.values():
        for status, n in counts.items():
            errors[status] = errors.get(status, 0) + n
    if totals.wrong_total:
        errors["WRONG_ANSWER"] = max(errors.get("WRONG_ANSWER", 0), totals.wrong_total)
    every = sorted(v for values in totals.latencies_us.values() for v in values)
    operations = {
        op: Operation(
            calls=len(values),
            calls_per_s=round(len(values) / window, 1),
            errors=totals.errors.get(op, {}),
            latency=latency(values),
        )
        for op, values in totals.latencies_us.items()
    }
    cpu, pct, others, backend = _server_figures(readings, ok)
    closed = rung.mode == "closed"
    return Step(
        index=rung.index,
        mode=rung.mode,
        concurrency=int(rung.value) if closed else None,
        offered_calls_per_s=None if closed else rung.value,
        connections=connections,
        streams_per_connection=rung.shape[1] if closed else None,
        load_generator=generator,
        warmup_s=rung.warmup_s,
        duration_s=round(window, 3),
        calls=ok,
        calls_per_s=round(ok / window, 1),
        errors=errors,
        error_calls_per_s=round(sum(errors.values()) / window, 1),
        latency=latency(every),
        operations=operations,
        cpu_us_per_call=cpu,
        cpu_pct=pct,
        loadgen_cpu_us_per_call=round(totals.loadgen_cpu_s * 1e6 / ok, 1) if ok else None,
        other_on_server_cpus_pct=others,
        backend=backend,
        open_loop_backlog_max=None if closed else totals.backlog_max,
        complete=complete,
    )


def _server_figures(
    readings: list[Reading], ok: int
) -> tuple[dict[str, float] | None, dict[str, float] | None, float | None, Backend | None]:
    if len(readings) != 2:
        return None, None, None, None
    (start, ticks0, counters0, samples0), (end, ticks1, counters1, samples1) = readings
    window = max(1e-6, end - start)
    cpu: dict[str, float] | None = None
    pct: dict[str, float] | None = None
    others: float | None = None
    backend: Backend | None = None
    if ticks0 is not None and ticks1 is not None:
        delta = {_role(k): v - ticks0.get(k, 0) for k, v in ticks1.items()}
        total = sum(delta.values())
        wall_ticks = window * CLK_TCK
        if ok:
            cpu = {k: round(ticks_to_us(v) / ok, 1) for k, v in sorted(delta.items())}
            cpu["total"] = round(ticks_to_us(total) / ok, 1)
        pct = {k: round(100 * v / wall_ticks, 1) for k, v in sorted(delta.items())}
        if counters0 is not None and counters1 is not None:
            others = round(100 * max(0.0, counters1[0] - counters0[0] - total) / wall_ticks, 1)
    if samples0 is not None and samples1 is not None:
        backend = _backend(samples0, samples1)
    return cpu, pct, others, backend


def _role(label: str) -> str:
    return "supervisor" if label == "root" else label


def _backend(before: list[Sample], after: list[Sample]) -> Backend:
    def diff(name: str, **labels: str) -> int:
        return round(metric_sum(after, name, **labels) - metric_sum(before, name, **labels))

    hits, misses = diff("prism_cache_hits_total"), diff("prism_cache_misses_total")
    limited = {s.labels.get("reason", ""): 0 for s in after if s.name == "prism_calls_limited_total"}
    for reason in limited:
        limited[reason] = diff("prism_calls_limited_total", reason=reason)
    statuses = {s.labels.get("status", "") for s in after if s.name == "prism_requests_total"}
    return Backend(
        cache_hits=hits,
        cache_misses=misses,
        cache_hit_ratio=round(hits / (hits + misses), 4) if hits + misses else None,
        calls_limited={k: v for k, v in limited.items() if v},
        calls_refused=diff("prism_calls_refused_total"),
        server_calls_by_status={
            s: n for s in sorted(statuses) if (n := diff("prism_requests_total", status=s))
        },
    )
