"""Benchmark Prism's gateway paths: workers, the shared cache, tenants and forwarding.

    python bench/gateway.py [--duration 6] [--runs 3] [--out bench/results/gateway.json]

Every scenario calls ``GetItems`` of one 100-byte item with 128 calls in
flight (h2load ``-c 8 -m 16``) and measures calls/s, p50/p99 latency and the
server's CPU time per call, summed over Prism's whole process tree
(supervisor, admin process, workers):

- ``sqlite_1w``: namespace on SQLite, no cache, 1 worker: the local uncached call;
- ``sqlite_2w``: the same with 2 workers (CPU per call must not grow with workers);
- ``cache_hit``: SQLite with the shared cache on, 1 worker: every call a cache hit;
- ``local_2t``: tenants ``front`` and ``store`` (1 worker each); the client names
  ``store`` (``:authority: store.bench``), so its connections end up on the
  worker that owns ``kv`` and every call is local;
- ``forwarded``: the same server, the client names ``front``: its connections
  end up on front's worker and every call is forwarded (nng) to store's.

Prism's own metrics (``/metrics`` on the admin port) verify that each
scenario did what it claims: forwarded calls, cache hits, hand-offs. See
README.md for how the numbers are taken and read.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from bench_load import (
    DISTURBED_PCT,
    Concurrency,
    LoadFailed,
    LoadFn,
    Target,
    add_run_options,
    check_run_options,
    choose,
    grpc_frame,
    load_function,
    machine_info,
    measure_run,
    summarize,
    warm_up,
)
from bench_servers import (
    GET_ITEMS,
    PrismServer,
    Sample,
    ServerFailed,
    cpu_list,
    fetch_checked_answer,
    make_prism,
    metric_sum,
    pin_benchmark,
    seed,
)

from prism.proto import kv_pb2

HERE = Path(__file__).resolve().parent
NAMESPACE, RECORD_ID, ITEM_KEY = "kv", "user:1", b"profile"
# A value that is not one repeated byte, so a truncated or shifted answer shows.
SEED_VALUE = bytes((i * 37 + 11) % 256 for i in range(100))
EXPECTED = [(ITEM_KEY, SEED_VALUE)]
CONCURRENCY = Concurrency("c128", 8, 16)
SERVER_CPU, LOAD_CPU = 0, 1
CACHE_TTL_S = 300
TARGETS = {"workers_2_vs_1": 1.15, "cache_hit_vs_uncached": 0.6, "forwarded_vs_local": 1.5}
MIN_WORKER_SHARE = 0.05  # with 2 workers, each must do at least this share of the workers' CPU


@dataclass(frozen=True)
class ServerSpec:
    """One ``prism serve`` configuration; several scenarios may share it."""

    name: str
    workers: int  # for the record
    cpus: tuple[int, ...]  # the supervisor's CPUs when pinned (workers pin within them)

    def config(self, pinned: bool) -> str:
        """The TOML body (``make_prism`` adds the admin port)."""
        kv = f'name = "{NAMESPACE}"\nbackend = "sqlite"\n'
        if self.name == "two_tenants":
            cpus = "cpus = [0]\n" if pinned else ""
            return (
                f'[[tenants]]\nname = "front"\nworkers = 1\n{cpus}'
                'namespaces = [{ name = "front_own", backend = "sqlite" }]\n'
                f'[[tenants]]\nname = "store"\nworkers = 1\n{cpus}'
                f'namespaces = [{{ name = "{NAMESPACE}", backend = "sqlite" }}]\n'
            )
        cache = f"cache = {{ enabled = true, ttl_s = {CACHE_TTL_S} }}\n" if self.name == "cache" else ""
        return f"workers = {self.workers}\n[[namespaces]]\n{kv}{cache}"


SERVERS = {
    spec.name: spec
    for spec in (
        ServerSpec("sqlite_1w", 1, (SERVER_CPU,)),
        ServerSpec("sqlite_2w", 2, (SERVER_CPU, LOAD_CPU)),
        ServerSpec("cache", 1, (SERVER_CPU,)),
        ServerSpec("two_tenants", 2, (SERVER_CPU,)),
    )
}


@dataclass(frozen=True)
class Scenario:
    """A load against one server, with the :authority its connections send."""

    name: str
    server: str
    authority: str | None
    what: str


SCENARIOS = (
    Scenario("sqlite_1w", "sqlite_1w", None, "sqlite, no cache, 1 worker"),
    Scenario("sqlite_2w", "sqlite_2w", None, "sqlite, no cache, 2 workers"),
    Scenario("cache_hit", "cache", None, f"sqlite, cache ttl {CACHE_TTL_S}s, 1 worker: every call hits"),
    Scenario("local_2t", "two_tenants", "store.bench", "2 tenants; client names the owner: local"),
    Scenario("forwarded", "two_tenants", "front.bench", "2 tenants; client names the other: forwarded"),
)
SCENARIO_NAMES = tuple(s.name for s in SCENARIOS)


@dataclass(frozen=True)
class Options:
    """Command-line options."""

    duration_s: float
    runs: int
    out: Path
    scenarios: tuple[str, ...]
    loadgen: str
    warmup_s: float
    ready_timeout_s: float


def parse_args(argv: list[str] | None = None) -> Options:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_run_options(parser, out=HERE / "results" / "gateway.json", duration_s=6.0, unit="scenario")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIO_NAMES), help=f"comma list of {', '.join(SCENARIO_NAMES)}"
    )
    args = parser.parse_args(argv)
    scenarios = choose(parser, "--scenarios", args.scenarios, SCENARIO_NAMES)
    loadgen = check_run_options(parser, args)
    return Options(args.duration, args.runs, args.out, scenarios, loadgen, args.warmup, args.ready_timeout)


# ---------------------------------------------------------------- verification


@dataclass
class Counts:
    """Prism's counters for one scenario, summed over its measured runs."""

    calls: int = 0  # successful calls h2load made
    forwarded_calls: float = 0.0
    cache_hits: float = 0.0
    cache_misses: float = 0.0
    handoffs: float = 0.0
    requests_ok: float = 0.0  # GetItems calls Prism counted as OK (a forwarded call counts twice)

    def add(self, calls: int, before: list[Sample], after: list[Sample]) -> None:
        """Add one run: its calls and the counter deltas around it."""

        def delta(name: str, **labels: str) -> float:
            return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

        self.calls += calls
        self.forwarded_calls += delta(
            "prism_forwarded_calls_total", namespace=NAMESPACE, operation="GetItems"
        )
        self.cache_hits += delta("prism_cache_hits_total", namespace=NAMESPACE)
        self.cache_misses += delta("prism_cache_misses_total", namespace=NAMESPACE)
        self.handoffs += delta("prism_connection_handoffs_total")
        self.requests_ok += delta(
            "prism_requests_total", namespace=NAMESPACE, operation="GetItems", status="OK"
        )


def problems(scenario: str, counts: Counts, worker_cpu: dict[str, float]) -> list[str]:
    """What the counters say the scenario did not do as claimed (empty: verified)."""
    found: list[str] = []
    calls = counts.calls

    def expect(what: str, value: float, wanted: float) -> None:
        if value != wanted:
            found.append(f"{what} = {value:g}, expected {wanted:g}")

    expect("forwarded_calls", counts.forwarded_calls, calls if scenario == "forwarded" else 0)
    expect("cache_hits", counts.cache_hits, calls if scenario == "cache_hit" else 0)
    expect("cache_misses", counts.cache_misses, 0)
    if scenario in ("sqlite_1w", "sqlite_2w", "cache_hit"):
        expect("handoffs", counts.handoffs, 0)
    if scenario == "sqlite_2w":
        total = sum(worker_cpu.values())
        if len(worker_cpu) != 2 or total <= 0 or min(worker_cpu.values()) / total < MIN_WORKER_SHARE:
            found.append(f"workers' CPU us/call {worker_cpu}: both of the 2 workers must serve calls")
    return found


# ---------------------------------------------------------------- measuring


@dataclass
class Phase:
    """One scenario's load, bound to its running server."""

    scenario: Scenario
    load: LoadFn
    frame_len: int
    log: Path
    requests: int = 0
    runs: list[dict[str, float]] = field(default_factory=list)
    loadgen_us: list[float] = field(default_factory=list)
    by_process: list[dict[str, float]] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)


def bench_server(
    spec: ServerSpec, scenarios: Sequence[Scenario], opts: Options, workdir: Path, pinned: bool
) -> dict[str, dict[str, Any]]:
    """Start one server, check and measure its scenarios, stop it.

    The measured runs of scenarios that share the server alternate (A B A B
    ...), so that a slow drift of the machine affects both alike.
    """
    cpus = spec.cpus if pinned else ()
    server = make_prism(spec.name, workdir, spec.config(pinned), cpus, NAMESPACE)
    request = kv_pb2.GetItemsRequest(namespace=NAMESPACE, id=RECORD_ID).SerializeToString()
    body_file = workdir / "get_items.body"
    body_file.write_bytes(grpc_frame(request))
    reports: dict[str, dict[str, Any]] = {s.name: {"server": spec.name} for s in scenarios}
    try:
        server.start()
        server.wait_ready(opts.ready_timeout_s)
        affinity = sorted(sorted(c) for c in server.affinities())
        seed(server.target, NAMESPACE, RECORD_ID, ITEM_KEY, SEED_VALUE, scenarios[0].authority)
        phases = []
        for scenario in scenarios:
            answer = fetch_checked_answer(server.target, request, EXPECTED, scenario.authority)
            target = Target("127.0.0.1", server.port, GET_ITEMS, request, body_file, scenario.authority)
            log = workdir / f"{scenario.name}.log"
            phases.append(Phase(scenario, load_function(opts.loadgen, target, answer), 5 + len(answer), log))
            reports[scenario.name].update(
                authority=scenario.authority, what=scenario.what, server_cpus=list(cpus),
                server_affinity=affinity, answer_bytes=len(answer),
            )  # fmt: skip
        for phase in phases:
            phase.requests = warm_up(phase.load, CONCURRENCY, phase.log, opts.warmup_s, opts.duration_s)
        for _ in range(opts.runs):
            for phase in phases:
                measure(server, phase)
        for phase in phases:  # still right after the load
            fetch_checked_answer(server.target, request, EXPECTED, phase.scenario.authority)
        for phase in phases:
            reports[phase.scenario.name].update(report(phase))
            print(f"  {phase.scenario.name}: {_row_text(reports[phase.scenario.name])}", flush=True)
    except (ServerFailed, LoadFailed, grpc.RpcError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"  {spec.name}: FAILED: {error}", file=sys.stderr, flush=True)
        for name in reports:
            reports[name].update(error=error, server_log_tail=server.log_tail())
    finally:
        server.stop()
    issues = server.log_issues()
    for name in reports:
        reports[name]["server_log_issues"] = issues
    return reports


def measure(server: PrismServer, phase: Phase) -> None:
    """One measured run of a phase, with Prism's counters read around it (once settled)."""
    before = server.settled_metrics()
    metrics, details = measure_run(
        server, phase.load, CONCURRENCY, phase.log, phase.requests, phase.frame_len, {LOAD_CPU}
    )
    after = server.settled_metrics()
    phase.counts.add(details.calls, before, after)
    phase.runs.append(metrics)
    phase.loadgen_us.append(details.loadgen_cpu_us_per_call)
    phase.by_process.append(details.cpu_us_per_call_by_process)


def report(phase: Phase) -> dict[str, Any]:
    """A scenario's medians, runs, CPU breakdown and verification."""
    out = summarize(CONCURRENCY, phase.requests, phase.runs)
    labels = sorted({label for run in phase.by_process for label in run})
    by_process = {
        label: statistics.median(run.get(label, 0.0) for run in phase.by_process) for label in labels
    }
    workers = {label: us for label, us in by_process.items() if label.startswith("worker")}
    found = problems(phase.scenario.name, phase.counts, workers)
    out.update(
        loadgen_cpu_us_per_call=statistics.median(phase.loadgen_us),
        cpu_us_per_call_by_process=by_process,
        verification={**vars(phase.counts), "ok": not found, "problems": found},
    )
    return out


# ---------------------------------------------------------------- reporting


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """CPU per call of one scenario over another's; None where one is missing."""

    def ratio(ours: str, base: str) -> float | None:
        a, b = results.get(ours, {}).get("cpu_us_per_call"), results.get(base, {}).get("cpu_us_per_call")
        return round(a / b, 3) if a and b else None

    return {
        "workers_2_vs_1": ratio("sqlite_2w", "sqlite_1w"),
        "cache_hit_vs_uncached": ratio("cache_hit", "sqlite_1w"),
        "forwarded_vs_local": ratio("forwarded", "local_2t"),
    }


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['calls_per_s']:,.0f} calls/s, p50 {row['p50_us']:,.0f} us, p99 {row['p99_us']:,.0f} us, "
        f"CPU {row['cpu_us_per_call']:,.1f} us/call, others on server CPUs "
        f"{row['other_on_server_cpu_pct']:.0f}%, verified: {_verified(row)}"
    )


def _verified(row: dict[str, Any]) -> str:
    check = row.get("verification")
    if check is None:
        return "n/a"
    return "yes" if check["ok"] else "NO: " + "; ".join(check["problems"])


def table(results: dict[str, dict[str, Any]], ratio_values: dict[str, float | None]) -> str:
    """The human-readable summary printed at the end."""
    header = (
        "scenario",
        "CPUs",
        "calls/s",
        "p50 us",
        "p99 us",
        "CPU us/call",
        "others %",
        "fwd",
        "hits",
        "ok",
    )
    fmt = "{:<10} {:>5} {:>9} {:>8} {:>8} {:>12} {:>9} {:>8} {:>8} {:>4}"
    lines = [fmt.format(*header)]
    disturbed = False
    for name, row in results.items():
        if "cpu_us_per_call" not in row:
            lines.append(f"{name:<10} {'':>5} {'(failed)':>9}")
            continue
        check = row["verification"]
        disturbed |= row["other_on_server_cpu_pct"] > DISTURBED_PCT
        cells = (
            name, cpu_list(row["server_cpus"]) or "-", f"{row['calls_per_s']:,.0f}",
            f"{row['p50_us']:,.0f}", f"{row['p99_us']:,.0f}", f"{row['cpu_us_per_call']:,.1f}",
            f"{row['other_on_server_cpu_pct']:.0f}", f"{check['forwarded_calls']:,.0f}",
            f"{check['cache_hits']:,.0f}", "yes" if check["ok"] else "NO",
        )  # fmt: skip
        lines.append(fmt.format(*cells))
    for name, row in results.items():
        if "cpu_us_per_call_by_process" in row:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in row["cpu_us_per_call_by_process"].items())
            lines.append(
                f"  {name} CPU us/call by process: {parts}; h2load {row['loadgen_cpu_us_per_call']:.1f}"
            )
    for name, target in TARGETS.items():
        value = ratio_values[name]
        verdict = (
            "n/a" if value is None else ("met" if value <= target else f"MISSED by {value / target - 1:.0%}")
        )
        shown = "n/a" if value is None else f"{value:.2f}"
        lines.append(f"ratio {name}: {shown} (target <= {target:g}: {verdict})")
    if disturbed:
        lines.append(
            f"warning: other work used > {DISTURBED_PCT:g}% of the server CPUs in some scenario "
            "('others %'); those numbers are not clean"
        )
    if "sqlite_2w" in results and results["sqlite_2w"].get("server_cpus") == [SERVER_CPU, LOAD_CPU]:
        lines.append(
            f"note: sqlite_2w's second worker shares CPU {LOAD_CPU} with h2load: "
            "compare CPU per call, not calls/s"
        )
    for name, row in results.items():
        for problem in row.get("verification", {}).get("problems", []):
            lines.append(f"VERIFICATION FAILED {name}: {problem}")
        if "error" in row:
            lines.append(f"ERROR {name}: {row['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every scenario, print the table, write the JSON; 1 if any failed or was not verified."""
    opts = parse_args(argv)
    # SIGTERM's default action would skip the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    pinned = pin_benchmark({SERVER_CPU}, LOAD_CPU)
    started = time.time()
    chosen = [s for s in SCENARIOS if s.name in opts.scenarios]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prism-gateway-") as tmp:
        for spec in SERVERS.values():
            scenarios = [s for s in chosen if s.server == spec.name]
            if not scenarios:
                continue
            names = ", ".join(s.name for s in scenarios)
            print(f"{spec.name}: measuring {names} ({opts.runs} x {opts.duration_s:g}s each)", flush=True)
            workdir = Path(tmp) / spec.name
            workdir.mkdir()
            results.update(bench_server(spec, scenarios, opts, workdir, pinned))
    ratio_values = ratios(results)
    print()
    print(table(results, ratio_values))
    shown_issues = set()
    for row in results.values():
        for line in row.get("server_log_issues", []):
            if (row["server"], line) not in shown_issues:
                shown_issues.add((row["server"], line))
                print(f"{row['server']} log: {line}")
    document = {
        "benchmark": "gateway",
        "machine": machine_info(opts.loadgen),
        "params": {
            "duration_s": opts.duration_s, "runs": opts.runs, "warmup_s": opts.warmup_s,
            "scenarios": list(opts.scenarios), "method": GET_ITEMS, "namespace": NAMESPACE, "id": RECORD_ID,
            "value_bytes": len(SEED_VALUE), "pinned": pinned, "load_cpu": LOAD_CPU if pinned else None,
            "concurrency": {"clients": CONCURRENCY.clients, "streams": CONCURRENCY.streams},
            "configs": {s.name: s.config(pinned) for s in SERVERS.values()},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 1),
        },
        "results": results,
        "ratios": ratio_values,
        "targets": TARGETS,
    }  # fmt: skip
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {opts.out}")
    failed = any("error" in row or not row.get("verification", {}).get("ok") for row in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
