"""h2load: run it on one fixed request, and read back what it reports.

h2load cannot see the ``grpc-status`` trailer, so an error status arrives as
an HTTP 200 with no body. The DATA byte count catches that: every correct
answer is exactly one known-length gRPC message (:func:`check_correct`).
Its ``--log-file`` has one ``start_us<TAB>status<TAB>latency_us`` line per
request, from which latency percentiles are computed here.

Moved from ``bench/bench_load.py`` (which imports it from here) so that
``prism bench`` and the scripts under ``bench/`` run h2load with one copy.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

H2LOAD_TIMEOUT_GRACE_S = 30.0


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
    out = run_tool(argv, run_timeout(requests, duration_s))
    return parse_summary(out, *read_log(log_file))


def run_timeout(requests: int | None, duration_s: float | None) -> float:
    """A bound on a run: generous, but a stalled server cannot hang the benchmark."""
    if duration_s is not None:
        return 3 * duration_s + H2LOAD_TIMEOUT_GRACE_S
    return H2LOAD_TIMEOUT_GRACE_S + (requests or 0) / 100  # >= 100 calls/s expected


def run_tool(argv: list[str], timeout_s: float) -> str:
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


def parse_summary(out: str, latencies_us: list[int], span_s: float) -> LoadResult:
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
