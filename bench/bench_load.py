"""Drive load with h2load (or a Python grpc.aio client) and read back the results.

Both load generators report the same things: how many calls were answered
with HTTP 200, how many failed, how many response DATA bytes arrived, and a
per-request log of ``start_us<TAB>status<TAB>latency_us`` lines (h2load's
``--log-file`` format), from which latency percentiles are computed here.

h2load cannot see the ``grpc-status`` trailer, so an error status arrives as
an HTTP 200 with no body. The DATA byte count catches that: every correct
answer is exactly one known-length gRPC message.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench_servers import CLK_TCK, ServerProcess, cpu_counters, ticks_to_us

HERE = Path(__file__).resolve().parent
H2LOAD_TIMEOUT_GRACE_S = 30.0
DISTURBED_PCT = 5.0  # others % on the server CPUs above which a phase is flagged
# The per-run metrics whose medians over runs are reported.
METRICS = (
    "calls_per_s", "p50_us", "p99_us", "mean_us", "cpu_us_per_call",
    "server_cpu_pct", "other_on_server_cpu_pct", "steal_on_server_cpu_pct",
)  # fmt: skip


class LoadFailed(RuntimeError):
    """The load generator failed, timed out, or saw wrong answers."""


@dataclass(frozen=True)
class Concurrency:
    """Calls in flight = clients (connections) x streams per connection."""

    label: str
    clients: int
    streams: int

    @property
    def in_flight(self) -> int:
        """Total calls in flight."""
        return self.clients * self.streams


@dataclass(frozen=True)
class Target:
    """What to call: the server, the method, and the request/answer bytes."""

    host: str
    port: int
    path: str
    request: bytes  # the serialized request message, without gRPC framing
    body_file: Path  # the same, with the 5-byte gRPC prefix, for h2load -d
    authority: str | None = None  # the :authority to send (None: HOST:PORT)
    scheme: str = "http"  # "https": TLS (h2load offers ALPN h2 and checks no certificate)
    headers: tuple[str, ...] = ()  # more request headers ("name: value"), sent on every call

    @property
    def url(self) -> str:
        """The URL of the method (h2c, or h2 over TLS)."""
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


@dataclass(frozen=True)
class LoadResult:
    """What one load run reported."""

    started: int
    succeeded: int
    failed: int  # failed + errored + timed out
    non_2xx: int
    data_bytes: int
    elapsed_s: float  # as the load generator reports it (h2load: to 10 ms)
    latencies_us: list[int]  # of the requests answered with HTTP 200
    span_s: float  # first request start to last response end, from the log (to 1 us)
    # h2load's "time to 1st byte" of the slowest connection (from its connect
    # to the first byte it received); None from the Python client.
    first_byte_max_us: float | None = None

    @property
    def calls_per_s(self) -> float:
        """Successful calls per second, over the logged span when there is one."""
        seconds = self.span_s if self.span_s > 0 else self.elapsed_s
        return self.succeeded / seconds if seconds > 0 else 0.0


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def h2load_path() -> str | None:
    """h2load, if installed (Debian: nghttp2-client)."""
    return shutil.which("h2load") or ("/usr/bin/h2load" if Path("/usr/bin/h2load").exists() else None)


def h2load_version() -> str | None:
    """``h2load --version``'s line, for the record of what measured."""
    path = h2load_path()
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip() or None


def run_h2load(
    target: Target, conc: Concurrency, log_file: Path, *, requests: int | None, duration_s: float | None
) -> LoadResult:
    """One h2load run: a fixed number of ``requests``, or for ``duration_s``.

    One h2load thread: it is pinned to one CPU anyway.
    """
    path = h2load_path()
    if path is None:
        raise LoadFailed("h2load is not installed")
    argv = [path, "-t", "1", "-c", str(conc.clients), "-m", str(conc.streams)]
    if duration_s is not None:
        argv += ["-D", f"{max(1, round(duration_s * 1000))}ms"]
    else:
        argv += ["-n", str(requests)]
    log_file.unlink(missing_ok=True)  # h2load appends to an existing log
    argv += [
        "-d", str(target.body_file),
        "-H", "content-type: application/grpc",
        "-H", "te: trailers",
        "--log-file", str(log_file),
    ]  # fmt: skip
    if target.authority:
        argv += ["-H", f":authority: {target.authority}"]  # h2load overrides the pseudo-header
    for header in target.headers:
        argv += ["-H", header]
    argv.append(target.url)
    out = _run(argv, _timeout(requests, duration_s))
    return _parse_h2load(out, *read_log(log_file))


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
    out = _run(argv, _timeout(requests, duration_s))
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


def _timeout(requests: int | None, duration_s: float | None) -> float:
    """A bound on a run: generous, but a stalled server cannot hang the benchmark."""
    if duration_s is not None:
        return 3 * duration_s + H2LOAD_TIMEOUT_GRACE_S
    return H2LOAD_TIMEOUT_GRACE_S + (requests or 0) / 100  # >= 100 calls/s expected


def _run(argv: list[str], timeout_s: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise LoadFailed(f"{argv[0]} did not finish within {timeout_s:.0f}s: {' '.join(argv)}") from exc
    if done.returncode != 0:
        raise LoadFailed(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s),", re.M)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout",
    re.M,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
_DATA = re.compile(r"^traffic: .*\((\d+)\) data", re.M)
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
# min, max, mean, sd, +/- sd
_FIRST_BYTE = re.compile(r"^time to 1st byte:\s+[\d.]+(?:us|ms|s)\s+([\d.]+)(us|ms|s)\s", re.M)


def _parse_h2load(out: str, latencies_us: list[int], span_s: float) -> LoadResult:
    """Pull counts out of h2load's summary; fail loudly if its format changed."""
    finished, requests, status, data = (p.search(out) for p in (_FINISHED, _REQUESTS, _STATUS, _DATA))
    if finished is None or requests is None or status is None or data is None:
        raise LoadFailed(f"cannot parse h2load output:\n{out}")
    _total, started, _done, succeeded, failed, errored, timed_out = map(int, requests.groups())
    _ok, r3xx, r4xx, r5xx = map(int, status.groups())
    first_byte = _FIRST_BYTE.search(out)
    return LoadResult(
        started=started,
        succeeded=succeeded,
        failed=failed + errored + timed_out,
        non_2xx=r3xx + r4xx + r5xx,
        data_bytes=int(data.group(1)),
        elapsed_s=float(finished.group(1)) * _UNIT_S[finished.group(2)],
        latencies_us=latencies_us,
        span_s=span_s,
        first_byte_max_us=(
            float(first_byte.group(1)) * _UNIT_S[first_byte.group(2)] * 1e6 if first_byte else None
        ),
    )


def read_log(log_file: Path) -> tuple[list[int], float]:
    """Latencies (us) of the HTTP 200 rows of an h2load-format log, and its span (s).

    The span runs from the first request's start to the last response's
    end; h2load's own "finished in" has only 10 ms resolution.
    """
    latencies: list[int] = []
    first_start, last_end = math.inf, -math.inf
    with log_file.open() as lines:
        for line in lines:
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            start_us, latency_us = int(parts[0]), int(parts[2])
            first_start, last_end = min(first_start, start_us), max(last_end, start_us + latency_us)
            if parts[1] == "200":
                latencies.append(latency_us)
    span_s = (last_end - first_start) / 1e6 if latencies else 0.0
    return latencies, span_s


def check_correct(result: LoadResult, answer_frame_len: int) -> None:
    """Raise LoadFailed unless every call succeeded with a full-size answer."""
    problems = []
    if result.failed or result.non_2xx:
        problems.append(f"{result.failed} failed/errored/timed out, {result.non_2xx} non-2xx")
    if result.succeeded == 0:
        problems.append("no call succeeded")
    expected_bytes = result.succeeded * answer_frame_len
    if result.data_bytes != expected_bytes:
        problems.append(
            f"{result.data_bytes} response DATA bytes, expected {expected_bytes} "
            f"({result.succeeded} x {answer_frame_len}): some answers were errors or wrong"
        )
    if len(result.latencies_us) != result.succeeded:
        problems.append(f"log has {len(result.latencies_us)} OK rows for {result.succeeded} successes")
    if problems:
        raise LoadFailed("; ".join(problems))


def percentile(sorted_values: list[int], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


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
