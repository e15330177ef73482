"""Benchmark overload: quotas and adaptive shedding on one worker.

    python bench/overload.py [--duration 5] [--pg-dsn postgresql://127.0.0.1/test]
                             [--out bench/results/overload.json]

One ``prism serve`` with one worker pinned to a CPU; the load generator
(``prism.benchmark.loadgen``, one process, ``CONNECTIONS``
connections) pinned to the others. Every call is a ``GetItems`` of one of
``RECORDS`` records (100-byte values, each answer checked), with a 1 s
deadline (``grpc-timeout``). The generator costs about 8 us of CPU per
call, a tenth of what the worker spends: it offers twice the worker's
saturation from one CPU. (grpc.aio, used before, could not: from one CPU it
fell behind past ~4,000 calls/s, and the ladder's top steps measured the
client.) ``--server-share`` holds the server to a share of its CPU (a
cgroup CPU quota, where the cgroup v1 ``cpu`` controller is writable; the
JSON says whether it was); by default it is not capped: a quota's
throttling every 10 ms is itself a queue of several milliseconds. Run it on
a quiet machine under ``nice -n -15``: other work on the server's CPU shows
as latency and lowers the saturation it measures.

- **Ladder**, per backend (``sql``: SQLite; ``pg``: PostgreSQL, with
  ``--pg-dsn``): the saturation throughput is measured first, closed loop
  (``--saturation-inflight`` calls in flight, back to back, each count
  ``--saturation-repeats`` times in turn; the best count's mean), on
  a server of the same configuration that does not shed (a closed loop at a
  shedding worker measures how fast it refuses: its clients call again at
  once); then, on the shedding server, an *open-loop* offered load (calls due on a fixed schedule, whatever
  the answers) of 0.5, 0.8, 1.0, 1.5 and 2.0x that. The 2x step is taken
  ``--pairs`` times, each just after the saturation is measured again (the
  best count, on the server that does not shed, kept up for it), at twice
  that: goodput at 2x is the median of the pairs' ratios, each against the
  mean of the saturation measured just before and just after its step
  (this machine's CPU speed drifts between steps a minute apart, and
  within seconds). Per step: offered
  calls/s, goodput (OK answers/s), refused (RESOURCE_EXHAUSTED)/s, other
  failures, p50/p99 of the OK calls measured from their due time (so a call
  waiting for a free stream counts against the server, not for it; the most
  that waited so is ``client_backlog_max``), and the worker's RSS and CPU
  busy share. Targets: at 2x, goodput >= 90% of
  saturation and OK p99 <= 3x the OK p99 at 0.8x; RSS flat (largest <= 1.2x
  the first).
- **Flood**: namespace ``flood`` has ``limits = { rps = R }`` (by
  default ``FLOOD_SHARE``, 5%, of the SQLite saturation); namespace
  ``quiet`` is called at a modest rate alone (its quiet p99), then again
  while ``flood`` is offered 10x R by h2load (``--rps``; the server
  uncapped), in turn ``--flood-rounds`` times, each p99 of all the rounds'
  calls. Target: quiet's p99 within 1.5x of its quiet p99, and flood's
  goodput close to R.

Prints the figures and writes JSON (``--out``). See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_load import grpc_frame, h2load_path, machine_info, percentile
from bench_servers import (
    GET_ITEMS,
    PrismServer,
    fetch_checked_answer,
    make_prism,
    process_role,
    process_tree,
    seed,
)

from prism.benchmark.loadgen import Plan
from prism.benchmark.loadpool import LoadPool, StepTotals
from prism.benchmark.seed import seed_and_learn
from prism.benchmark.workload import Spec
from prism.proto import kv_pb2

HERE = Path(__file__).resolve().parent
LADDER = (0.5, 0.8, 1.0, 1.5, 2.0)
DEADLINE_S = 1.0  # every call's deadline (grpc-timeout)
WARMUP_S = 0.5  # per step, before the measured window
TARGETS = {
    "goodput_at_2x_vs_saturation": 0.9,
    "p99_2x_vs_p99_0_8x": 3.0,
    "rss_growth": 1.2,
    "neighbour_p99": 1.5,
}


# ---------------------------------------------------------------- load

# Open loop: calls are due on a fixed schedule whatever the answers do; a
# call's latency runs from when it was due (prism.benchmark.loadgen).
# Open and closed loop alike (the saturation is measured with the load's own
# shape: fewer connections carrying more calls each read larger batches, and
# a worker serves more calls a second that way than the open loop's load
# lets it).
CONNECTIONS = 32
RECORDS = 1000  # GetItems of one of these records (100-byte values), uniformly


def spec_of(namespace: str) -> Spec:
    return Spec(
        namespace=namespace,
        weights={"get": 1.0},
        records=RECORDS,
        value_bytes=100,
        distribution="uniform",
        zipf_skew=0.0,
        events_per_series=0,
        scan_limit=0,
    )


# ---------------------------------------------------------------- the server's share of its CPU


class CpuCap:
    """A cgroup (v1 ``cpu`` controller) holding the server's processes to a
    share of one CPU. On a machine of two CPUs, the load generator (grpc.aio,
    whose client costs more per call than Prism's server) has one CPU, and
    could not offer twice what an uncapped worker serves: the ladder would
    measure the client. Capped, the worker saturates first, as a server
    does in production. The quota's period is 10 ms, so that a throttled
    worker waits at most that long."""

    ROOT = Path("/sys/fs/cgroup/cpu")
    PERIOD_US = 10_000

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, share: float) -> CpuCap | None:
        path = cls.ROOT / f"prism-overload-{os.getpid()}"
        try:
            path.mkdir()
            (path / "cpu.cfs_period_us").write_text(str(cls.PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(max(1000, round(share * cls.PERIOD_US))))
        except OSError:
            return None
        return cls(path)

    def set_share(self, share: float | None) -> None:
        """Hold the processes to ``share`` of a CPU; None: no cap."""
        quota = -1 if share is None else max(1000, round(share * self.PERIOD_US))
        (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def add(self, pids: list[int]) -> None:
        for pid in pids:  # cgroup.procs moves every thread of the process; new ones inherit
            (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        try:
            self.path.rmdir()  # only once its processes have exited
        except OSError:
            pass


# ---------------------------------------------------------------- phases


class Bench:
    def __init__(self, server: PrismServer, pool: LoadPool, duration_s: float) -> None:
        self.server = server
        self.pool = pool
        self.duration_s = duration_s
        self.specs: dict[str, Spec] = {}
        self.saturation_busy = self.saturation_refused = 0.0
        self.saturation_inflight = 0  # the count whose mean was the saturation
        self.saturation_tried: list[dict[str, float]] = []

    def seed(self, namespace: str) -> None:
        host, port = self.server.target.rsplit(":", 1)
        self.specs[namespace] = seed_and_learn(host, int(port), spec_of(namespace))

    def _run(self, namespace: str, mode: str, connections: int, streams: int, rate: float) -> StepTotals:
        host, port = self.server.target.rsplit(":", 1)
        plan = Plan(
            host, int(port), mode, connections, streams, rate, 0.0, WARMUP_S, self.duration_s, 1,
            timeout_ms=round(DEADLINE_S * 1000),
        )  # fmt: skip
        start_at = self.pool.start(plan, self.specs[namespace])
        time.sleep(max(0.0, start_at + WARMUP_S - time.monotonic()))
        cpu_before = self.worker_cpu_s()
        time.sleep(max(0.0, start_at + WARMUP_S + self.duration_s - time.monotonic()))
        self.busy = (self.worker_cpu_s() - cpu_before) / self.duration_s
        totals = self.pool.collect(self.duration_s + 60)
        if totals.wrong_total:
            raise SystemExit(f"{namespace}: {totals.wrong_total} wrong answers, e.g. {totals.wrong}")
        return totals

    def saturation(self, namespace: str, inflight: tuple[int, ...], repeats: int = 1) -> float:
        """The most OK calls/s the worker served, closed loop, over ``inflight``
        calls in flight (back to back, CONNECTIONS connections): each count
        tried ``repeats`` times, in turn, and the best count's mean taken (the
        best single step of a noisy machine is the machine's luck)."""
        tried: dict[int, list[tuple[float, float, float]]] = {n: [] for n in inflight}
        for _ in range(repeats):
            for n in inflight:
                totals = self._run(namespace, "closed", CONNECTIONS, max(1, n // CONNECTIONS), 0.0)
                ok = totals.ok_calls / self.duration_s
                refused = totals.errors.get("get", {}).get("RESOURCE_EXHAUSTED", 0) / self.duration_s
                self.saturation_tried.append(
                    {"inflight": n, "ok_per_s": round(ok, 1), "refused_per_s": round(refused, 1),
                     "worker_busy": round(self.busy, 3)}
                )  # fmt: skip
                tried[n].append((ok, self.busy, refused))
        best = 0.0
        for n, steps in tried.items():
            ok, busy, refused = (sum(step[i] for step in steps) / len(steps) for i in range(3))
            if ok > best:
                best, self.saturation_busy, self.saturation_refused = ok, busy, refused
                self.saturation_inflight = n
        return best

    def offer(self, namespace: str, rate: float, keep: list[int] | None = None) -> dict[str, Any]:
        """Open-loop ``rate`` calls/s of ``namespace``; what came back (each
        OK call's latency, in us, also appended to ``keep``)."""
        rss_before = self.worker_rss_kib()
        totals = self._run(namespace, "open", CONNECTIONS, 0, rate)
        ok = totals.latencies_us.get("get", [])
        if keep is not None:
            keep += ok
        codes = totals.errors.get("get", {})
        return {
            "offered_per_s": round(rate, 1),
            "goodput_per_s": round(len(ok) / self.duration_s, 1),
            "refused_per_s": round(codes.get("RESOURCE_EXHAUSTED", 0) / self.duration_s, 1),
            "other_failures": {k: v for k, v in codes.items() if k != "RESOURCE_EXHAUSTED"},
            "ok_p50_us": percentile(ok, 50) if ok else math.nan,
            "ok_p99_us": percentile(ok, 99) if ok else math.nan,
            "client_backlog_max": totals.backlog_max,
            "loadgen_cpu_s": round(totals.loadgen_cpu_s, 2),
            "worker_rss_kib": max(rss_before, self.worker_rss_kib()),
            "worker_busy": round(self.busy, 3),  # the worker's CPU seconds per second
        }

    def worker_cpu_s(self) -> float:
        """CPU seconds the worker processes have used (user + system)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in process_tree(self.server.pid):
            if process_role(pid, self.server.pid).startswith("worker"):
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / tick
                except OSError:
                    pass
        return total

    def worker_rss_kib(self) -> int:
        total = 0
        for pid in process_tree(self.server.pid):
            if process_role(pid, self.server.pid).startswith("worker"):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
                except OSError:
                    pass
        return total


def capacity(bench: Bench, namespace: str, inflight: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """The saturation throughput of ``namespace`` on ``bench``'s server (one
    without shedding: what the worker can serve, before it refuses anything)."""
    before = len(bench.saturation_tried)
    saturation = bench.saturation(namespace, inflight, repeats)
    steps = ", ".join(f"{t['inflight']}: {t['ok_per_s']:,.0f}" for t in bench.saturation_tried[before:])
    print(
        f"\n{namespace}: saturation (closed loop, {inflight} in flight x{repeats}, no shedding): "
        f"{saturation:,.0f} calls/s, worker busy {bench.saturation_busy:.0%} (steps {steps})"
    )
    return {
        "saturation_per_s": round(saturation, 1),
        "saturation_worker_busy": round(bench.saturation_busy, 3),
        "saturation_inflight": bench.saturation_inflight,
        "saturation_tried": list(bench.saturation_tried),
    }


def ladder(
    bench: Bench, namespace: str, measured: dict[str, Any], probe: Bench, pairs: int
) -> dict[str, Any]:
    """The offered-load ladder of ``namespace`` on ``bench``'s (shedding)
    server. Its 2x step is taken ``pairs`` times, each right after the
    saturation is measured again on ``probe``'s server (closed loop, the
    count of calls in flight that gave the saturation): each pair's 2x is
    twice that saturation, and goodput at 2x is the median of the pairs'
    ratios, each against the saturation before and after it
    (``bracketed_pairs``). On a shared machine the CPU's speed drifts between steps a
    minute apart (a worker 95% busy at 0.5x where it had served 1x at
    100%): a ratio of two steps taken seconds apart measures the server,
    not the drift."""
    saturation = measured["saturation_per_s"]
    print(f"{'load':>5} {'offered/s':>10} {'good/s':>9} {'refused/s':>10} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'backlog':>8} {'RSS MiB':>8} {'busy':>5} other")  # fmt: skip
    steps = []
    paired: list[dict[str, Any]] = []

    def show(got: dict[str, Any]) -> None:
        print(
            f"{got['load']:>5.1f} {got['offered_per_s']:>10,.0f} "
            f"{got['goodput_per_s']:>9,.0f} {got['refused_per_s']:>10,.0f} "
            f"{got['ok_p50_us'] / 1000:>7.2f} {got['ok_p99_us'] / 1000:>7.2f} "
            f"{got['client_backlog_max']:>8} {got['worker_rss_kib'] / 1024:>8.1f} "
            f"{got['worker_busy']:>5.0%} {got['other_failures'] or ''}"
        )

    for factor in LADDER:
        if factor != 2.0:
            got = bench.offer(namespace, saturation * factor)
            got["load"] = factor
            steps.append(got)
            show(got)
            continue
        paired = bracketed_pairs(
            lambda: probe.saturation(namespace, (measured["saturation_inflight"],)),
            lambda rate: bench.offer(namespace, rate),
            pairs,
            factor,
        )
        steps.append(paired[0])
        show(paired[0])
    at = {s["load"]: s for s in steps}
    ratios = [p["goodput_per_s"] / p["saturation_per_s"] for p in paired if p["saturation_per_s"]]
    rss = [s["worker_rss_kib"] for s in steps + paired]
    figures = {
        "goodput_at_2x_vs_saturation": round(statistics.median(ratios), 3) if ratios else math.nan,
        "p99_2x_vs_p99_0_8x": round(at[2.0]["ok_p99_us"] / at[0.8]["ok_p99_us"], 2),
        "rss_growth": round(max(rss) / rss[0], 3) if rss[0] else math.nan,
    }
    print(
        f"{namespace}: 2x pairs (saturation before and after, goodput): "
        + ", ".join(
            f"{p['saturation_before_per_s']:,.0f}/{p['saturation_after_per_s']:,.0f}"
            f" -> {p['goodput_per_s']:,.0f}"
            for p in paired
        )
    )
    print(
        f"{namespace}: goodput at 2x / saturation {figures['goodput_at_2x_vs_saturation']} (>= 0.9, "
        f"median of {len(ratios)} pairs: {', '.join(f'{r:.3f}' for r in ratios)}); "
        f"p99 at 2x / p99 at 0.8x {figures['p99_2x_vs_p99_0_8x']} (<= 3); "
        f"RSS growth {figures['rss_growth']} (<= 1.2)"
    )
    return {
        **measured,
        "steps": steps,
        "pairs_at_2x": paired,
        **figures,
    }


def bracketed_pairs(
    saturation: Callable[[], float], offer: Callable[[float], dict[str, Any]], pairs: int, factor: float
) -> list[dict[str, Any]]:
    """``pairs`` steps at ``factor`` times the saturation, each between two
    measurements of it (``saturation()``; one more than there are steps, a
    step's *after* the next one's *before*): a step is offered ``factor``
    times the saturation just before it, and its ratio is taken against the
    mean of the two around it (``saturation_per_s``). This machine's speed
    drifts within seconds (consecutive saturations 2,600-3,400 calls/s): one
    measurement on each side halves what a steady drift adds to the ratio."""
    paired: list[dict[str, Any]] = []
    before = saturation()
    for _ in range(pairs):
        got = offer(before * factor)
        after = saturation()
        got["load"] = factor
        got["saturation_before_per_s"] = round(before, 1)
        got["saturation_after_per_s"] = round(after, 1)
        got["saturation_per_s"] = round((before + after) / 2, 1)
        paired.append(got)
        before = after
    return paired


def flood(
    bench: Bench,
    flood_rps: float,
    quiet_rps: float,
    tmp: Path,
    cap: CpuCap | None,
    client_cpus: set[int],
    rounds: int,
) -> dict[str, Any]:
    """The neighbour's p99 alone, then beside a namespace offered 10x its rps,
    ``rounds`` times in turn: each p99 is of all its rounds' calls (one step
    of a few seconds at 300 calls/s has its p99 in its ten slowest calls,
    which the machine's noise alone moved by 2x between runs).

    The flood comes from h2load (``--rps`` per connection), not grpc.aio: five
    thousand calls a second from grpc.aio would take the client CPU the
    neighbour's client shares, and measure the client. For the same reason
    h2load runs at nice 19: the neighbour's client is woken first when both
    have work on the client CPU (what is measured is the server's isolation). The server runs
    uncapped here (a quota at 10x is a small load for a worker: the point is
    what refusing it costs the neighbour, not saturation)."""
    if cap is not None:
        cap.set_share(None)
    h2load = h2load_path()
    if h2load is None:
        raise SystemExit("the flood phase needs h2load (Debian: nghttp2-client)")
    body = tmp / "flood.bin"
    request = kv_pb2.GetItemsRequest(namespace="flood", id="r").SerializeToString()
    body.write_bytes(grpc_frame(request))
    answer = len(grpc_frame(fetch_checked_answer(bench.server.target, request, [(b"k", b"v" * 100)])))
    connections = FLOOD_CONNECTIONS
    argv = [
        "nice", "-n", "19", "taskset", "-c", ",".join(map(str, sorted(client_cpus))),
        h2load, "-t", "1", "-c", str(connections), "-m", "16",
        "--rps", f"{flood_rps * 10 / connections:g}", "-D", str(max(1, round(bench.duration_s + 2))),
        "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
        f"http://{bench.server.target}{GET_ITEMS}",
    ]  # fmt: skip
    quiet_alone: list[int] = []
    quiet_flooded: list[int] = []
    steps: list[dict[str, Any]] = []
    started = data = 0
    span = refused = 0.0
    for _ in range(rounds):
        alone = bench.offer("quiet", quiet_rps, quiet_alone)
        before = limited(bench.server, "flood")
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            both = bench.offer("quiet", quiet_rps, quiet_flooded)
            out, _ = proc.communicate(timeout=bench.duration_s + 60)
        refused += limited(bench.server, "flood") - before
        requests = _H2LOAD_REQUESTS.search(out)
        traffic = _H2LOAD_DATA.search(out)
        finished = _H2LOAD_FINISHED.search(out)
        if requests is None or traffic is None or finished is None:
            raise SystemExit(f"cannot read h2load's output:\n{out}")
        started += int(requests.group(1))
        data += int(traffic.group(1))
        span += float(finished.group(1)) * (1.0 if finished.group(2) == "s" else 1e-3)
        steps.append({"quiet_alone": alone, "quiet_with_flood": both})
    alone_p99, flooded_p99 = percentile(sorted(quiet_alone), 99), percentile(sorted(quiet_flooded), 99)
    busy = sum(step["quiet_with_flood"]["worker_busy"] for step in steps) / rounds
    flood_out = {
        "offered_per_s": flood_rps * 10,
        "sent_per_s": round(started / span, 1),
        "goodput_per_s": round(data / answer / span, 1),
        "refused_per_s": round(refused / span, 1),
        "worker_busy": round(busy, 3),
    }
    ratio = flooded_p99 / alone_p99
    by_round = ", ".join(
        f"x{step['quiet_with_flood']['ok_p99_us'] / step['quiet_alone']['ok_p99_us']:.2f}" for step in steps
    )
    print(f"\nflood ({rounds} rounds): quiet alone p99 {alone_p99 / 1000:.2f} ms; with flood at 10x its rps "
          f"({flood_rps * 10:,.0f}/s offered, {flood_out['sent_per_s']:,.0f}/s sent): quiet p99 "
          f"{flooded_p99 / 1000:.2f} ms (x{ratio:.2f}, <= 1.5; by round {by_round}), flood goodput "
          f"{flood_out['goodput_per_s']:,.0f}/s (limit {flood_rps:,.0f}), refused "
          f"{flood_out['refused_per_s']:,.0f}/s; worker busy {busy:.0%}")  # fmt: skip
    return {
        "flood_rps": flood_rps,
        "rounds": steps,
        "quiet_alone_p99_us": alone_p99,
        "quiet_with_flood_p99_us": flooded_p99,
        "quiet_calls": [len(quiet_alone), len(quiet_flooded)],
        "flood": flood_out,
        "neighbour_p99": round(ratio, 2),
    }


FLOOD_CONNECTIONS = 10
# The flooded namespace's rps, by default: a share of the worker's SQLite
# saturation, so that the calls its quota admits are the same share of the
# worker on any machine (each of its refusals is measured against them).
# 500 rps was 5.4% of a worker on the day this phase was written (9,300
# calls/s); on a day this machine served 3,300, the same 500 (and its 4,500
# refusals a second) kept the worker 70-80% busy and the neighbour's p99 at
# x2.2-x4.6; at 165 rps, 50% busy and x1.29-x1.47.
FLOOD_SHARE = 0.05
FLOOD_RPS_SKIPPED = 500.0  # --skip-ladder: no saturation measured
_H2LOAD_REQUESTS = re.compile(r"^requests: \d+ total, (\d+) started", re.M)
_H2LOAD_DATA = re.compile(r"^traffic: .*\((\d+)\) data", re.M)
_H2LOAD_FINISHED = re.compile(r"^finished in ([\d.]+)(s|ms)", re.M)


def limited(server: PrismServer, namespace: str) -> float:
    """Calls of ``namespace`` refused by a limit so far (``/metrics``)."""
    return sum(
        s.value
        for s in server.metrics()
        if s.name == "prism_calls_limited_total" and s.labels.get("namespace") == namespace
    )


CONFIG = """workers = 1
[overload]
enabled = {shedding}
target_delay_ms = {target_ms}
interval_ms = {interval_ms}
[[namespaces]]
name = "sql"
[[namespaces]]
name = "flood"
limits = {{ rps = {flood_rps} }}
[[namespaces]]
name = "quiet"
"""
PG = """[[namespaces]]
name = "pg"
backend = "postgres"
options = {{ dsn = "{dsn}" }}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per step (default 5)")
    parser.add_argument(
        "--pg-dsn", default=os.environ.get("PRISM_TEST_PG_DSN", ""), help="also a PostgreSQL ladder"
    )
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument(
        "--server-share",
        type=float,
        default=0.0,
        help="the share of its CPU the server may use (a cgroup CPU quota; default 0: no cap)",
    )
    parser.add_argument(
        "--saturation-inflight",
        default="64,128,256,512",
        help="closed-loop calls in flight tried for the saturation (the best counts; default 64,128,256,512)",
    )
    parser.add_argument(
        "--saturation-repeats",
        type=int,
        default=2,
        help="closed-loop steps per in-flight count, in turn; the best count's mean counts (default 2)",
    )
    parser.add_argument(
        "--flood-rps",
        type=float,
        default=None,
        help="the flooded namespace's rps limit (default: FLOOD_SHARE of the SQLite saturation; "
        f"{FLOOD_RPS_SKIPPED:g} with --skip-ladder)",
    )
    parser.add_argument("--quiet-rps", type=float, default=300.0, help="the neighbour's offered calls/s")
    parser.add_argument(
        "--flood-rounds", type=int, default=3, help="the flood phase's alone/flooded pairs (default 3)"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=5,
        help="2x steps per backend, each right after the saturation is measured again (default 5)",
    )
    parser.add_argument("--target-delay-ms", type=float, default=5.0)
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--skip-ladder", action="store_true")
    parser.add_argument(
        "--no-shedding", action="store_true", help="[overload] enabled = false (for comparison)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "overload.json")
    args = parser.parse_args(argv)
    try:
        inflight = tuple(int(n) for n in args.saturation_inflight.split(","))
    except ValueError:
        parser.error(
            f"--saturation-inflight: {args.saturation_inflight!r} is not a list of numbers (64,128,256,512)"
        )
    if not inflight or min(inflight) < 1:
        parser.error(f"--saturation-inflight: {args.saturation_inflight!r}: each must be at least 1")
    if args.saturation_repeats < 1:
        parser.error(f"--saturation-repeats: {args.saturation_repeats} must be at least 1")
    if args.pairs < 1:
        parser.error(f"--pairs: {args.pairs} must be at least 1")
    if args.flood_rounds < 1:
        parser.error(f"--flood-rounds: {args.flood_rounds} must be at least 1")
    if args.flood_rps is not None and not args.flood_rps > 0:
        parser.error(f"--flood-rps: {args.flood_rps:g} must be more than 0")
    if not 0 <= args.server_share <= 1:
        parser.error(f"--server-share: {args.server_share} is not a share of one CPU (0 to 1; 0: no cap)")

    allowed = os.sched_getaffinity(0)
    client_cpus = allowed - {args.server_cpu} or allowed
    laddered = () if args.skip_ladder else ("sql", *(("pg",) if args.pg_dsn else ()))

    # (Known once the saturation is: the server that does not shed is
    # started with this one, and serves no flood.)
    flood_rps = FLOOD_RPS_SKIPPED if args.flood_rps is None else args.flood_rps

    def config(shedding: bool) -> str:
        body = CONFIG.format(
            target_ms=args.target_delay_ms,
            interval_ms=args.interval_ms,
            flood_rps=flood_rps,
            shedding="true" if shedding else "false",
        )
        return body + (PG.format(dsn=args.pg_dsn) if args.pg_dsn else "")

    def started(tmp: Path, shedding: bool) -> PrismServer:
        server = make_prism("overload", tmp, config(shedding), (args.server_cpu,), "sql")
        server.start()
        try:
            server.wait_ready(30)
            if cap is not None:
                cap.add(process_tree(server.pid))
        except BaseException:
            server.stop()
            raise
        return server

    with tempfile.TemporaryDirectory(prefix="prism-overload-") as tmp:
        bench: Bench | None = None
        cap: CpuCap | None = None
        if args.server_share:
            cap = CpuCap.create(args.server_share)
            if cap is None:
                print("no writable cgroup v1 cpu controller: the server runs uncapped", file=sys.stderr)
        stack = contextlib.ExitStack()
        server: PrismServer | None = None
        unshed: PrismServer | None = None
        try:
            pool = stack.enter_context(LoadPool(1, tuple(sorted(client_cpus))))
            # The saturation first, on a server that does not shed (a closed
            # loop at a shedding worker measures how fast it refuses); it
            # stays up, idle, for the saturation measured again before each
            # 2x step (ladder).
            measured: dict[str, dict[str, Any]] = {}
            probes: dict[str, Bench] = {}
            if laddered:
                (Path(tmp) / "capacity").mkdir()
                unshed = started(Path(tmp) / "capacity", False)
                for namespace in laddered:
                    probe = probes[namespace] = Bench(unshed, pool, args.duration)
                    probe.seed(namespace)
                    measured[namespace] = capacity(probe, namespace, inflight, args.saturation_repeats)
            if args.flood_rps is None and "sql" in measured:
                flood_rps = float(max(1, round(FLOOD_SHARE * measured["sql"]["saturation_per_s"])))
            server = started(Path(tmp), not args.no_shedding)
            seed(server.target, "flood", "r", b"k", b"v" * 100)  # (h2load's calls)
            bench = Bench(server, pool, args.duration)
            for namespace in ("quiet", *laddered):
                bench.seed(namespace)
            result: dict[str, Any] = {
                "machine": machine_info("prism.benchmark.loadgen"),
                # (the output's name, not this machine's path to it)
                "args": vars(args) | {"out": args.out.name},
                "server_capped": cap is not None,
            }
            result["targets"] = TARGETS
            for namespace, key in (("sql", "sqlite"), ("pg", "postgres")):
                if namespace in laddered:
                    result[key] = ladder(bench, namespace, measured[namespace], probes[namespace], args.pairs)
            if unshed is not None:
                unshed.stop()
                unshed = None
            result["flood"] = flood(
                bench, flood_rps, args.quiet_rps, Path(tmp), cap, client_cpus, args.flood_rounds
            )
        finally:
            stack.close()
            for running in (server, unshed):
                if running is not None:
                    running.stop()
            if cap is not None:
                cap.remove()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
