"""Benchmark unary KeyValue/GetItems: Prism against grpcio's grpc.aio.

    python bench/kv_get.py [--duration 6] [--runs 3] [--out bench/results/kv_get.json]
        [--concurrencies c1,c128] [--tracing 0.01]

Each server runs alone, pinned to CPU 0, while the load generator (h2load,
or a grpc.aio client without it) runs on CPU 1, so that the two never
compete for a core and the server's CPU time per call is its own (see
bench/README.md). For each server and each concurrency (1 and 128 calls in
flight, and 1,000 connections with one call in flight each, opened at once
at the start of each run: the slowest connection's time to its first answer
is recorded too) it measures calls/s, p50/p99 latency and the server's CPU
time per call, repeats ``--runs`` times and reports medians. Then a value-size
ladder (``--sizes``, default 100 B, 4 KiB, 64 KiB, 1 MiB): GetItems and
PutItems of one item of each size at 16 in flight, for the CPU per call of
big messages. A run only counts if every call returned the seeded value: a
benchmark of a wrong answer is worthless.

``--tracing RATIO`` runs Prism with ``[tracing]`` on: spans sampled at
RATIO, exported over OTLP/HTTP to a sink this process serves (it answers
every export with 200 and keeps nothing), for what tracing costs a call.
"""

from __future__ import annotations

import argparse
import http.server
import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    ServerFailed,
    ServerProcess,
    fetch_checked_answer,
    free_port,
    make_prism,
    pin_benchmark,
    seed,
)

from prism.proto import kv_pb2

HERE = Path(__file__).resolve().parent
NAMESPACE, RECORD_ID, ITEM_KEY = "bench", "user:1", b"profile"
# A value that is not one repeated byte, so a truncated or shifted answer shows.
SEED_VALUE = bytes((i * 37 + 11) % 256 for i in range(100))
EXPECTED = [(ITEM_KEY, SEED_VALUE)]
METHOD = "/prism.kv.v1.KeyValue/GetItems"
PUT_METHOD = "/prism.kv.v1.KeyValue/PutItems"
# c1000x1: many connections, one call in flight on each; every run opens its
# 1,000 connections at once (a storm, as after a restart or a failover), and
# the slowest connection's time to its first answer is recorded.
CONCURRENCIES = (Concurrency("c1", 1, 1), Concurrency("c128", 8, 16), Concurrency("c1000x1", 1000, 1))
STORM_CLIENTS = 1000
STORM_SETTLE_S = 3.0
MANY_CPU_TARGET = 0.5  # c1000x1: CPU per call at most this share of grpc.aio's
MANY_FIRST_BYTE_TARGET = 1.5  # c1000x1: slowest first answer at most this multiple of grpc.aio's
# The value-size ladder: GetItems and PutItems of one item of each size, at
# 16 in flight (128 x 1 MiB in flight would measure the machine's memory).
LADDER_SIZES = (100, 4096, 65536, 1 << 20)
LADDER_CONCURRENCY = Concurrency("c16", 2, 8)
LADDER_TARGET = 0.5  # at 64 KiB and 1 MiB, Prism's CPU per call at most this share of grpc.aio's
SERVERS = ("prism", "grpc_aio")
SERVER_CPU, LOAD_CPU = 0, 1
# One worker: a memory namespace lives in one process (Prism would force 1 anyway).
CONFIG_TOML = f'workers = 1\n[[namespaces]]\nname = "{NAMESPACE}"\nbackend = "memory"\n'


@dataclass(frozen=True)
class Options:
    """Command-line options."""

    duration_s: float
    runs: int
    out: Path
    servers: tuple[str, ...]
    loadgen: str
    warmup_s: float
    ready_timeout_s: float
    sizes: tuple[int, ...]
    concurrencies: tuple[Concurrency, ...] = CONCURRENCIES
    tracing: float | None = None  # sample_ratio, or None: tracing off


def parse_args(argv: list[str] | None = None) -> Options:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_run_options(parser, out=HERE / "results" / "kv_get.json", duration_s=6.0, unit="phase")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {', '.join(SERVERS)}")
    parser.add_argument(
        "--sizes",
        default=",".join(str(n) for n in LADDER_SIZES),
        help="value sizes of the GetItems/PutItems ladder, bytes, comma list ('' skips it)",
    )
    parser.add_argument(
        "--concurrencies",
        default=",".join(c.label for c in CONCURRENCIES),
        help=f"comma list of {', '.join(c.label for c in CONCURRENCIES)}",
    )
    parser.add_argument(
        "--tracing",
        type=float,
        default=None,
        metavar="RATIO",
        help="run Prism with [tracing] on, spans sampled at RATIO (0-1), exported to a local OTLP sink",
    )
    args = parser.parse_args(argv)
    servers = choose(parser, "--servers", args.servers, SERVERS)
    labels = choose(parser, "--concurrencies", args.concurrencies, [c.label for c in CONCURRENCIES])
    if args.tracing is not None and not 0 <= args.tracing <= 1:
        parser.error("--tracing: a sample ratio between 0 and 1")
    loadgen = check_run_options(parser, args)
    try:
        sizes = tuple(int(n) for n in args.sizes.split(",") if n.strip())
    except ValueError:
        parser.error(f"--sizes: expected a comma list of byte counts, got {args.sizes!r}")
    if any(not 1 <= n <= 2 << 20 for n in sizes):
        parser.error("--sizes: each size must be 1 to 2097152 bytes (the servers' message limits)")
    return Options(
        args.duration,
        args.runs,
        args.out,
        servers,
        loadgen,
        args.warmup,
        args.ready_timeout,
        sizes,
        tuple(c for c in CONCURRENCIES if c.label in labels),
        args.tracing,
    )


# ---------------------------------------------------------------- setup


def pin_self() -> tuple[int | None, int | None]:
    """Move this process (and so h2load, its child) to LOAD_CPU.

    Returns the (server, load) CPUs, or (None, None) when the machine has no
    two CPUs to give: numbers are then taken unpinned, and the JSON says so.
    """
    if not pin_benchmark({SERVER_CPU}, LOAD_CPU):
        return None, None
    return SERVER_CPU, LOAD_CPU


@contextmanager
def otlp_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint that accepts every export and keeps nothing: its URL."""

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def make_server(name: str, workdir: Path, cpu: int | None, extra_toml: str = "") -> ServerProcess:
    """A not-yet-started server of the given kind, with its own ports and files.

    Prism is a process tree (supervisor, admin, one worker); pinning the
    supervisor pins them all, since a worker pins itself to the supervisor's CPUs.
    """
    cpus = () if cpu is None else (cpu,)
    if name == "prism":
        return make_prism(name, workdir, CONFIG_TOML + extra_toml, cpus, NAMESPACE)
    port = free_port()
    argv = [sys.executable, str(HERE / "peer_server.py"), "--listen", f"127.0.0.1:{port}"]
    return ServerProcess(name, argv, port, workdir / f"{name}.log", cpus, NAMESPACE)


# ---------------------------------------------------------------- measuring


def measure_phase(
    server: ServerProcess, load: LoadFn, conc: Concurrency, log: Path, requests: int, frame_len: int
) -> dict[str, float]:
    """One measured run; see ``bench_load.measure_run``."""
    metrics, _details = measure_run(server, load, conc, log, requests, frame_len, {LOAD_CPU})
    return metrics


def bench_server(
    name: str, opts: Options, workdir: Path, cpu: int | None, extra_toml: str = ""
) -> dict[str, Any]:
    """Start one server, check it, measure every concurrency, stop it."""
    server = make_server(name, workdir, cpu, extra_toml)
    request = kv_pb2.GetItemsRequest(namespace=NAMESPACE, id=RECORD_ID).SerializeToString()
    body_file = workdir / "get_items.body"
    body_file.write_bytes(grpc_frame(request))
    target = Target("127.0.0.1", server.port, METHOD, request, body_file)
    report: dict[str, Any] = {}
    try:
        server.start()
        server.wait_ready(opts.ready_timeout_s)
        report["server_affinity"] = sorted(sorted(cpus) for cpus in server.affinities())
        seed(server.target, NAMESPACE, RECORD_ID, ITEM_KEY, SEED_VALUE)
        answer = fetch_checked_answer(server.target, request, EXPECTED)
        report["answer_bytes"] = len(answer)
        load = load_function(opts.loadgen, target, answer)
        for conc in opts.concurrencies:
            log = workdir / f"{name}-{conc.label}.log"
            requests = warm_up(load, conc, log, opts.warmup_s, opts.duration_s)
            runs = []
            for _ in range(opts.runs):
                if conc.clients >= STORM_CLIENTS:
                    # The last run's 1,000 connections are closing: each run's
                    # storm meets a server at rest (grpc.aio answered ~1% of
                    # the calls of a storm right after another with errors).
                    time.sleep(STORM_SETTLE_S)
                runs.append(measure_phase(server, load, conc, log, requests, 5 + len(answer)))
            report[conc.label] = summarize(conc, requests, runs)
            print(f"  {name} {conc.label}: {_row_text(report[conc.label])}", flush=True)
        fetch_checked_answer(server.target, request, EXPECTED)  # still right after the load
        if opts.sizes:
            report["ladder"] = measure_ladder(name, server, opts, workdir)
    except (ServerFailed, LoadFailed, grpc.RpcError, OSError) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["server_log_tail"] = server.log_tail()
        print(f"  {name}: FAILED: {report['error']}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    report["server_log_issues"] = server.log_issues()
    return report


def measure_ladder(name: str, server: ServerProcess, opts: Options, workdir: Path) -> dict[str, Any]:
    """GetItems and PutItems of one item of each size: ``{"get_65536": summary, ...}``."""
    conc = LADDER_CONCURRENCY
    out: dict[str, Any] = {}
    for size in opts.sizes:
        record, value = f"size:{size}", bytes((i * 131 + size) % 251 for i in range(size))
        seed(server.target, NAMESPACE, record, ITEM_KEY, value)
        get = kv_pb2.GetItemsRequest(namespace=NAMESPACE, id=record).SerializeToString()
        put = kv_pb2.PutItemsRequest(
            namespace=NAMESPACE, id=record, items=[kv_pb2.Item(key=ITEM_KEY, value=value)]
        ).SerializeToString()
        for op, method, request in (("get", METHOD, get), ("put", PUT_METHOD, put)):
            if op == "get":
                answer = fetch_checked_answer(server.target, request, [(ITEM_KEY, value)])
            else:
                answer = b""  # PutItemsResponse {} serializes to no bytes
            body_file = workdir / f"{op}_{size}.body"
            body_file.write_bytes(grpc_frame(request))
            load = load_function(
                opts.loadgen, Target("127.0.0.1", server.port, method, request, body_file), answer
            )
            log = workdir / f"{name}-{op}-{size}.log"
            requests = warm_up(load, conc, log, opts.warmup_s, opts.duration_s)
            runs = [
                measure_phase(server, load, conc, log, requests, 5 + len(answer)) for _ in range(opts.runs)
            ]
            out[f"{op}_{size}"] = summarize(conc, requests, runs)
            print(f"  {name} {op} {size} B ({conc.label}): {_row_text(out[f'{op}_{size}'])}", flush=True)
        fetch_checked_answer(server.target, get, [(ITEM_KEY, value)])  # the puts stored the same bytes
    return out


# ---------------------------------------------------------------- reporting


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """prism / grpc_aio for the headline metrics; None where one is missing."""

    def ratio(label: str, metric: str) -> float | None:
        ours, peer = results.get("prism", {}).get(label), results.get("grpc_aio", {}).get(label)
        if not ours or not peer or not peer.get(metric) or metric not in ours:
            return None
        return round(float(ours[metric]) / float(peer[metric]), 3)

    values = {
        "cpu_per_call_c128": ratio("c128", "cpu_us_per_call"),
        "cpu_per_call_c1": ratio("c1", "cpu_us_per_call"),
        "cpu_per_call_c1000x1": ratio("c1000x1", "cpu_us_per_call"),
        "first_byte_max_c1000x1": ratio("c1000x1", "first_byte_max_us"),
        "calls_per_s_c128": ratio("c128", "calls_per_s"),
        "calls_per_s_c1": ratio("c1", "calls_per_s"),
        "p50_c1": ratio("c1", "p50_us"),
    }
    ours, peer = results.get("prism", {}).get("ladder", {}), results.get("grpc_aio", {}).get("ladder", {})
    for case in ours:
        if case in peer and peer[case]["cpu_us_per_call"]:
            values[f"cpu_per_call_{case}"] = round(
                ours[case]["cpu_us_per_call"] / peer[case]["cpu_us_per_call"], 3
            )
    return values


def _row_text(summary: dict[str, Any]) -> str:
    return (
        f"{summary['calls_per_s']:,.0f} calls/s, p50 {summary['p50_us']:,.0f} us, "
        f"p99 {summary['p99_us']:,.0f} us, CPU {summary['cpu_us_per_call']:,.1f} us/call, "
        f"others on server CPU {summary['other_on_server_cpu_pct']:.0f}%"
    )


def table(results: dict[str, dict[str, Any]], ratio_values: dict[str, float | None]) -> str:
    """The human-readable summary printed at the end, with a warning if the CPU was shared."""
    header = ("server", "in flight", "calls/s", "p50 us", "p99 us", "CPU us/call", "others %")
    lines = ["{:<10} {:>9} {:>10} {:>9} {:>9} {:>12} {:>9}".format(*header)]
    disturbed = False
    for conc in CONCURRENCIES:
        if not any(conc.label in report or "error" in report for report in results.values()):
            continue  # not measured (--concurrencies)
        for name, report in results.items():
            row = report.get(conc.label)
            if row is None:
                lines.append(f"{name:<10} {conc.in_flight:>9} {'(failed)':>10}")
                continue
            disturbed |= row["other_on_server_cpu_pct"] > DISTURBED_PCT
            lines.append(
                f"{name:<10} {conc.in_flight:>9} {row['calls_per_s']:>10,.0f} {row['p50_us']:>9,.0f} "
                f"{row['p99_us']:>9,.0f} {row['cpu_us_per_call']:>12,.1f} "
                f"{row['other_on_server_cpu_pct']:>9.0f}"
            )
    headline = {
        k: v for k, v in ratio_values.items() if not k.startswith(("cpu_per_call_get_", "cpu_per_call_put_"))
    }
    shown = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in headline.items())
    lines.append(f"ratio prism/grpc_aio: {shown}")
    for key, target, what in (
        ("cpu_per_call_c1000x1", MANY_CPU_TARGET, "CPU per call"),
        ("first_byte_max_c1000x1", MANY_FIRST_BYTE_TARGET, "slowest first answer"),
    ):
        value = ratio_values.get(key)
        if value is not None:
            verdict = "met" if value <= target else "MISSED"
            lines.append(
                f"1,000 connections x 1 call, {what}: {value:.2f} of grpc.aio's "
                f"(target <= {target:g}: {verdict})"
            )
    ladder = {k: v for k, v in ratio_values.items() if k not in headline and v is not None}
    if ladder:
        lines.append(
            f"value-size ladder ({LADDER_CONCURRENCY.in_flight} in flight), CPU per call prism/grpc_aio:"
        )
        for key, value in ladder.items():
            size = int(key.rsplit("_", 1)[1])
            target = f" (target <= {LADDER_TARGET:g}: {'met' if value <= LADDER_TARGET else 'MISSED'})"
            lines.append(f"  {key[len('cpu_per_call_') :]:>12}: {value:.2f}{target if size >= 65536 else ''}")
    if disturbed:
        lines.append(
            f"warning: other work used > {DISTURBED_PCT:g}% of the server CPU in some phase "
            "('others %'); those numbers are not clean"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every server in turn, print the table, write the JSON; 1 if any failed."""
    opts = parse_args(argv)
    # SIGTERM's default action would skip the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    server_cpu, load_cpu = pin_self()
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prism-bench-") as tmp, otlp_sink() as sink:
        tracing = ""
        if opts.tracing is not None:
            tracing = f'[tracing]\notlp_endpoint = "{sink}"\nsample_ratio = {opts.tracing}\n'
        for name in opts.servers:
            print(f"{name}: measuring ({opts.runs} x {opts.duration_s:g}s per phase)", flush=True)
            workdir = Path(tmp) / name
            workdir.mkdir()
            results[name] = bench_server(name, opts, workdir, server_cpu, tracing if name == "prism" else "")
    ratio_values = ratios(results)
    print()
    print(table(results, ratio_values))
    for name, report in results.items():
        for line in report.get("server_log_issues", []):
            print(f"{name} log: {line}")
    measured = opts.concurrencies
    document = {
        "benchmark": "kv_get",
        "machine": machine_info(opts.loadgen),
        "params": {
            "duration_s": opts.duration_s, "runs": opts.runs, "warmup_s": opts.warmup_s,
            "servers": list(opts.servers), "method": METHOD, "namespace": NAMESPACE, "id": RECORD_ID,
            "value_bytes": len(SEED_VALUE), "server_cpu": server_cpu, "load_cpu": load_cpu,
            "ladder_sizes": list(opts.sizes), "ladder_concurrency": LADDER_CONCURRENCY.in_flight,
            "concurrency": {c.label: {"clients": c.clients, "streams": c.streams} for c in measured},
            "tracing_sample_ratio": opts.tracing,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 1),
        },
        "results": results,
        "ratios": ratio_values,
    }  # fmt: skip
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {opts.out}")
    return 1 if any("error" in report for report in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
