"""Drive load with h2load (or a Python grpc.aio client) and read back the results.

Both load generators report the same things: how many calls were answered
with HTTP 200, how many failed, how many response DATA bytes arrived, and a
per-request log of ``start_us<TAB>status<TAB>latency_us`` lines (h2load's
``--log-file`` format), from which latency percentiles are computed here.

h2load cannot see the ``grpc-status`` trailer, so an error status arrives as
an HTTP 200 with no body. The DATA byte count catches that: every correct
answer is exactly one known-length gRPC message.

Running h2load and reading its output is ``prism.benchmark.h2load``, shared
with ``prism bench``; the scripts import its names from here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench_servers import CLK_TCK, ServerProcess, cpu_counters, ticks_to_us

from prism.benchmark.h2load import (
    Concurrency,
    LoadFailed,
    LoadResult,
    Target,
    check_correct,
    h2load_path,
    h2load_version,
    percentile,
    read_log,
    run_h2load,
    run_timeout,
    run_tool,
)
from prism.benchmark.h2load import (
    grpc_frame as grpc_frame,  # re-exported for the scripts
)

HERE = Path(__file__).resolve().parent
DISTURBED_PCT = 5.0  # others % on the server CPUs above which a phase is flagged
# The per-run metrics whose medians over runs are reported.
METRICS = (
    "calls_per_s", "p50_us", "p99_us", "mean_us", "cpu_us_per_call",
    "server_cpu_pct", "other_on_server_cpu_pct", "steal_on_server_cpu_pct",
)  # fmt: skip


def run_python_client(
    target: Target,
    conc: Concurrency,
    log_file: Path,
    expected: bytes,
    *,
    requests: int | None,
    duration_s: float | None,
) -> LoadResult:
    """One run of ``aio_load_client.py``, the fallback when h2load is missing."""
    argv = [
        sys.executable,
        str(HERE / "aio_load_client.py"),
        "--target", f"{target.host}:{target.port}",
        "--method", target.path,
        "--request-hex", target.request.hex(),
        "--expect-hex", expected.hex(),
        "--connections", str(conc.clients),
        "--streams", str(conc.streams),
        "--log-file", str(log_file),
    ]  # fmt: skip
    if target.authority:
        argv += ["--authority", target.authority]
    if duration_s is not None:
        argv += ["--duration", str(duration_s)]
    else:
        argv += ["--requests", str(requests)]
    out = run_tool(argv, run_timeout(requests, duration_s))
    report = json.loads(out.strip().splitlines()[-1])
    latencies_us, span_s = read_log(log_file)
    return LoadResult(
        started=int(report["started"]),
        succeeded=int(report["succeeded"]),
        failed=int(report["failed"]),
        non_2xx=0,
        data_bytes=int(report["data_bytes"]),
        elapsed_s=float(report["elapsed_s"]),
        latencies_us=latencies_us,
        span_s=span_s,
    )


# ---------------------------------------------------------------- measuring

LoadFn = Callable[[Concurrency, Path, int | None, float | None], LoadResult]


def load_function(loadgen: str, target: Target, answer: bytes) -> LoadFn:
    """Bind the chosen load generator to the target, as (conc, log, n, seconds) -> result."""

    def load(conc: Concurrency, log: Path, requests: int | None, duration_s: float | None) -> LoadResult:
        if loadgen == "h2load":
            return run_h2load(target, conc, log, requests=requests, duration_s=duration_s)
        return run_python_client(target, conc, log, answer, requests=requests, duration_s=duration_s)

    return load


def warm_up(load: LoadFn, conc: Concurrency, log: Path, warmup_s: float, duration_s: float) -> int:
    """Run unmeasured for ``warmup_s``; the call count that makes a run ``duration_s`` long.

    A fixed count, not a fixed time, makes the CPU window hold exactly the
    calls it is divided by.
    """
    result = load(conc, log, None, warmup_s)
    if result.succeeded == 0 or result.failed or result.non_2xx:
        raise LoadFailed(
            f"warm-up: {result.succeeded} succeeded, {result.failed} failed, {result.non_2xx} non-2xx"
        )
    return max(conc.in_flight * 20, round(result.calls_per_s * duration_s))


@dataclass(frozen=True)
class RunDetails:
    """What one measured run saw besides its headline metrics."""

    calls: int
    loadgen_cpu_us_per_call: float  # the load generator's own CPU (h2load is our child)
    cpu_us_per_call_by_process: dict[str, float]  # the server's, per process of its tree


def measure_run(
    server: ServerProcess,
    load: LoadFn,
    conc: Concurrency,
    log: Path,
    requests: int,
    frame_len: int,
    load_cpus: set[int] | None = None,
) -> tuple[dict[str, float], RunDetails]:
    """One measured run: server CPU ticks (whole process tree) around a fixed-count load run.

    Also what else used the server's CPUs meanwhile, so that a run disturbed
    by other work on the machine can be told from a clean one. When the load
    generator shares a server CPU (``load_cpus``), its own CPU time (read from
    this process's reaped-children times) is not counted as "other".
    """
    cpus = server.cpus or (0,)
    wall_before, (busy_before, steal_before) = time.monotonic(), cpu_counters(cpus)
    children_before = _children_ticks()
    by_process_before = server.cpu_ticks_by_process()
    result = load(conc, log, requests, None)
    by_process_after = server.cpu_ticks_by_process()
    children_ticks = _children_ticks() - children_before
    wall_ticks = (time.monotonic() - wall_before) * CLK_TCK
    busy_after, steal_after = cpu_counters(cpus)
    check_correct(result, frame_len)
    latencies = sorted(result.latencies_us)
    server_ticks = sum(by_process_after.values()) - sum(by_process_before.values())
    shared_load_ticks = children_ticks if load_cpus and load_cpus & set(cpus) else 0.0
    others = busy_after - busy_before - server_ticks - shared_load_ticks
    calls = result.succeeded
    metrics = {
        "calls": calls,
        "elapsed_s": result.span_s or result.elapsed_s,
        "calls_per_s": result.calls_per_s,
        "p50_us": percentile(latencies, 50),
        "p99_us": percentile(latencies, 99),
        "mean_us": statistics.fmean(latencies),
        "cpu_us_per_call": ticks_to_us(server_ticks) / calls,
        "server_cpu_pct": round(100 * server_ticks / wall_ticks, 1),
        "other_on_server_cpu_pct": round(100 * max(0.0, others) / wall_ticks, 1),
        "steal_on_server_cpu_pct": round(100 * (steal_after - steal_before) / wall_ticks, 1),
    }
    if result.first_byte_max_us is not None:
        metrics["first_byte_max_us"] = result.first_byte_max_us
    by_process = {
        label: round(ticks_to_us(ticks - by_process_before.get(label, 0)) / calls, 1)
        for label, ticks in sorted(by_process_after.items())
    }
    return metrics, RunDetails(calls, round(ticks_to_us(children_ticks) / calls, 1), by_process)


def _children_ticks() -> float:
    """CPU clock ticks of this process's reaped children (the load generator runs)."""
    times = os.times()
    return (times.children_user + times.children_system) * CLK_TCK


def summarize(conc: Concurrency, requests: int, runs: list[dict[str, float]]) -> dict[str, Any]:
    """Medians over runs, with the runs themselves kept for inspection."""
    summary: dict[str, Any] = {m: statistics.median(run[m] for run in runs) for m in METRICS}
    if all("first_byte_max_us" in run for run in runs):
        summary["first_byte_max_us"] = statistics.median(run["first_byte_max_us"] for run in runs)
    summary.update(
        in_flight=conc.in_flight, clients=conc.clients, streams_per_client=conc.streams,
        requests_per_run=requests, runs=runs,
    )  # fmt: skip
    return summary


def machine_info(loadgen: str) -> dict[str, Any]:
    """What the numbers were taken on, to compare runs across machines."""
    from google.protobuf.internal import api_implementation

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "clk_tck": CLK_TCK,
        "versions": {d: version(d) for d in ("grpcio", "protobuf", "h2", "hpack", "trio")},
        "protobuf_backend": api_implementation.Type(),
        "loadgen": loadgen,
        "h2load": h2load_version() if loadgen == "h2load" else None,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def resolve_loadgen(choice: str) -> str | None:
    """``auto`` -> h2load if installed, else python; None if ``h2load`` was asked for but is missing."""
    if choice == "auto":
        return "h2load" if h2load_path() else "python"
    if choice == "h2load" and not h2load_path():
        return None
    return choice


def add_run_options(parser: argparse.ArgumentParser, *, out: Path, duration_s: float, unit: str) -> None:
    """The options every benchmark takes: --duration --runs --out --loadgen --warmup --ready-timeout.
    ``unit`` names what one measurement is ("run", "phase")."""
    parser.add_argument(
        "--duration",
        type=float,
        default=duration_s,
        help=f"seconds per measured {unit} (default {duration_s:g})",
    )
    parser.add_argument("--runs", type=int, default=3, help=f"runs per {unit}; medians reported (default 3)")
    parser.add_argument("--out", type=Path, default=out, help="JSON output")
    parser.add_argument("--loadgen", choices=("auto", "h2load", "python"), default="auto")
    parser.add_argument("--warmup", type=float, default=1.0, help=f"unmeasured seconds before each {unit}")
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to wait for a server")


def check_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Exit with a usage error if the common options are out of range; the load generator to use."""
    if args.duration <= 0 or args.runs < 1 or args.warmup <= 0:
        parser.error("--duration and --warmup must be > 0, --runs >= 1")
    loadgen = resolve_loadgen(args.loadgen)
    if loadgen is None:
        parser.error("--loadgen h2load: h2load not found (apt-get install nghttp2-client)")
    return loadgen


def choose(parser: argparse.ArgumentParser, flag: str, value: str, known: Sequence[str]) -> tuple[str, ...]:
    """A comma list of ``known`` names, in ``known``'s (documented) order."""
    chosen = {s.strip() for s in value.split(",") if s.strip()}
    if not chosen or chosen - set(known):
        parser.error(f"{flag}: choose from {', '.join(known)}")
    return tuple(name for name in known if name in chosen)
