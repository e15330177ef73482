"""Prism's CPU per call on each backend, beside the same operation done directly.

    python bench/backends.py [--duration 5] [--runs 3] [--out bench/results/backends.json]
                             [--backends memory,sqlite,postgres,postgres_single,redis]

For each backend, ``GetItems`` (a record with one 100-byte item) and
``PutItems`` (the same shape) through Prism with 64 calls in flight (h2load
``-c 4 -m 16``; server pinned to CPU 0, 1 worker, a top-level namespace on
that backend), measuring calls/s, p50/p99 and CPU per call summed over
Prism's process tree. Beside it, the equivalent operation done DIRECTLY with
the backend's sync client library from this (one) process, sequentially on one
connection: psycopg (the primary-key SELECT / ``INSERT ... ON CONFLICT`` on
the table Prism created), redis-py (``HGETALL`` / pipelined ``HSET``+``ZADD``
on Prism's keys), sqlite3 (Prism's SELECT / upsert on its file). The direct
client's CPU is its own process CPU time (``time.process_time``) over the
calls. memory has no direct client (n/a).

``ratios``: Prism's CPU per call over the direct client's, per backend and
operation; ``postgres_get_ratio`` is the target (<= 2.0).

Each run uses a fresh namespace name, so tables and keys never collide; the
PostgreSQL tables and Redis keys are dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from bench_load import (
    DISTURBED_PCT,
    Concurrency,
    LoadFailed,
    Target,
    add_run_options,
    check_run_options,
    choose,
    grpc_frame,
    load_function,
    machine_info,
    measure_run,
    percentile,
    summarize,
    warm_up,
)
from bench_servers import (
    GET_ITEMS,
    PUT_ITEMS,
    PrismServer,
    ServerFailed,
    fetch_checked_answer,
    make_prism,
    metric_sum,
    pin_benchmark,
    seed,
)

from prism.proto import kv_pb2

HERE = Path(__file__).resolve().parent
# "postgres_single" is PostgreSQL with read coalescing off (coalesce_reads =
# false): one statement per GetItems, to show what coalescing buys.
BACKENDS = ("memory", "sqlite", "postgres", "postgres_single", "redis")
DSN = "postgresql://127.0.0.1/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
GET_ID, PUT_ID, ITEM_KEY = "user:1", "user:2", b"profile"
SEED_VALUE = bytes((i * 37 + 11) % 256 for i in range(100))
EXPECTED = [(ITEM_KEY, SEED_VALUE)]
CONCURRENCY = Concurrency("c64", 4, 16)
SERVER_CPU, LOAD_CPU = 0, 1
TARGET_PG_GET_RATIO = 2.0
DIRECT_WARMUP = 300


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_run_options(parser, out=HERE / "results" / "backends.json", duration_s=5.0, unit="run")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument(
        "--pg-pool-timeout", type=float, default=None,
        help="postgres option pool_timeout_s (default: Prism's own, 0.5 s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.backends = list(choose(parser, "--backends", args.backends, BACKENDS))
    args.loadgen = check_run_options(parser, args)
    return args


def config(backend: str, namespace: str, redis_prefix: str, pg_pool_timeout: float | None = None) -> str:
    """The TOML body for one backend (make_prism adds the admin port)."""
    options = ""
    if backend in ("postgres", "postgres_single"):
        extra = "" if pg_pool_timeout is None else f", pool_timeout_s = {pg_pool_timeout}"
        if backend == "postgres_single":
            extra += ", coalesce_reads = false"
            backend = "postgres"
        options = f'options = {{ dsn = "{DSN}"{extra} }}\n'
    elif backend == "redis":
        options = f'options = {{ url = "{REDIS_URL}", key_prefix = "{redis_prefix}" }}\n'
    return f'workers = 1\n[[namespaces]]\nname = "{namespace}"\nbackend = "{backend}"\n{options}'


# ---------------------------------------------------------------- through Prism


def prism_op(
    server: PrismServer, namespace: str, op: str, opts: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """Load one operation through Prism: medians over runs, verified against /metrics."""
    if op == "get":
        method = GET_ITEMS
        request = kv_pb2.GetItemsRequest(namespace=namespace, id=GET_ID).SerializeToString()
        answer = fetch_checked_answer(server.target, request, EXPECTED)
    else:
        method = PUT_ITEMS
        item = kv_pb2.Item(key=ITEM_KEY, value=SEED_VALUE)
        request = kv_pb2.PutItemsRequest(namespace=namespace, id=PUT_ID, items=[item]).SerializeToString()
        with grpc.insecure_channel(server.target) as channel:
            answer = channel.unary_unary(PUT_ITEMS)(request, timeout=10)
    body = workdir / f"{op}.body"
    body.write_bytes(grpc_frame(request))
    load = load_function(opts.loadgen, Target("127.0.0.1", server.port, method, request, body), answer)
    log = workdir / f"{op}.log"
    requests = warm_up(load, CONCURRENCY, log, opts.warmup, opts.duration)
    runs, by_process, loadgen_us = [], [], []
    calls = ok = 0.0
    operation = "GetItems" if op == "get" else "PutItems"
    for _ in range(opts.runs):
        before = server.settled_metrics()
        metrics, details = measure_run(server, load, CONCURRENCY, log, requests, 5 + len(answer), {LOAD_CPU})
        after = server.settled_metrics()
        calls += details.calls
        labels = {"namespace": namespace, "operation": operation, "status": "OK"}
        ok += metric_sum(after, "prism_requests_total", **labels) - metric_sum(
            before, "prism_requests_total", **labels
        )
        runs.append(metrics)
        by_process.append(details.cpu_us_per_call_by_process)
        loadgen_us.append(details.loadgen_cpu_us_per_call)
    if op == "put":  # the puts landed
        get = kv_pb2.GetItemsRequest(namespace=namespace, id=PUT_ID).SerializeToString()
        fetch_checked_answer(server.target, get, EXPECTED)
    else:
        fetch_checked_answer(server.target, request, EXPECTED)
    out = summarize(CONCURRENCY, requests, runs)
    labels = sorted({label for run in by_process for label in run})
    problems = [] if ok == calls else [f"prism_requests_total OK delta {ok:g} != h2load calls {calls:g}"]
    out.update(
        answer_bytes=len(answer),
        loadgen_cpu_us_per_call=statistics.median(loadgen_us),
        cpu_us_per_call_by_process={k: statistics.median(r.get(k, 0.0) for r in by_process) for k in labels},
        verification={"calls": calls, "requests_ok": ok, "ok": not problems, "problems": problems},
    )
    return out


# ---------------------------------------------------------------- direct clients


def time_calls(call: Callable[[], object], duration_s: float, runs: int) -> dict[str, Any]:
    """Sequential calls: calls/s, p50/p99 and this process's CPU per call, medians over runs."""
    for _ in range(DIRECT_WARMUP):
        call()
    results = []
    for _ in range(runs):
        latencies: list[int] = []
        clock = time.perf_counter_ns
        c0, w0 = time.process_time(), time.perf_counter()
        end = w0 + duration_s
        while True:
            t0 = clock()
            call()
            latencies.append((clock() - t0) // 1000)
            if len(latencies) % 64 == 0 and time.perf_counter() >= end:
                break
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        latencies.sort()
        n = len(latencies)
        results.append({
            "calls": n, "calls_per_s": n / wall, "p50_us": percentile(latencies, 50),
            "p99_us": percentile(latencies, 99), "cpu_us_per_call": cpu / n * 1e6,
        })  # fmt: skip
    out: dict[str, Any] = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "calls"}
    out.update(in_flight=1, runs=results)
    return out


def direct_postgres(namespace: str, duration_s: float, runs: int) -> dict[str, Any]:
    """psycopg sync, one connection, autocommit: Prism's SELECT and upsert on its table."""
    import psycopg

    from prism.backends.postgres.keyvalue_sql import table_stem

    table = f'"prism_kv_{table_stem(namespace)}"'
    get_sql = (
        f"SELECT key, value, expires_at_ms FROM {table} WHERE id = %s"
        " AND (expires_at_ms = 0 OR expires_at_ms > %s) AND true ORDER BY key ASC LIMIT %s"
    )
    put_sql = (
        f"INSERT INTO {table} AS old (id, key, value, expires_at_ms, stamp_us, stamp_token)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id, key) DO UPDATE SET value = excluded.value,"
        " expires_at_ms = excluded.expires_at_ms, stamp_us = excluded.stamp_us,"
        " stamp_token = excluded.stamp_token"
        " WHERE (old.stamp_us, old.stamp_token) <= (excluded.stamp_us, excluded.stamp_token)"
        " OR (old.expires_at_ms != 0 AND old.expires_at_ms <= %s)"
    )
    with psycopg.connect(DSN, autocommit=True) as conn:
        cur = conn.cursor()
        rows = cur.execute(get_sql, (GET_ID, int(time.time() * 1000), 1001)).fetchall()
        if [(bytes(k), bytes(v)) for k, v, _ in rows] != EXPECTED:
            raise ServerFailed(f"direct postgres SELECT returned {rows!r}")

        def get() -> object:
            return cur.execute(get_sql, (GET_ID, int(time.time() * 1000), 1001)).fetchall()

        def put() -> object:
            now_us = time.time_ns() // 1000
            return cur.execute(put_sql, (PUT_ID, ITEM_KEY, SEED_VALUE, 0, now_us, "", now_us // 1000))

        return {
            "get": {**time_calls(get, duration_s, runs), "statement": get_sql},
            "put": {**time_calls(put, duration_s, runs), "statement": put_sql},
        }


def direct_redis(namespace: str, prefix: str, duration_s: float, runs: int) -> dict[str, Any]:
    """redis-py sync, one connection: HGETALL of the record's hash; a pipelined HSET + ZADD."""
    import redis

    base = f"{prefix}{namespace}:".encode()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        stored = client.hgetall(base + b"h:" + GET_ID.encode())
        if list(stored) != [ITEM_KEY] or not stored[ITEM_KEY].endswith(SEED_VALUE):
            raise ServerFailed(f"direct redis HGETALL returned {stored!r}")
        hkey, zkey = base + b"h:" + PUT_ID.encode(), base + b"z:" + PUT_ID.encode()

        def get() -> object:
            return client.hgetall(base + b"h:" + GET_ID.encode())

        def put() -> object:
            pipe = client.pipeline(transaction=False)
            header = f"0 {time.time_ns() // 1000} 0 ".encode()
            pipe.hset(hkey, ITEM_KEY, header + SEED_VALUE)
            pipe.zadd(zkey, {ITEM_KEY: 0})
            return pipe.execute()

        return {
            "get": {**time_calls(get, duration_s, runs), "statement": "HGETALL h:<id>"},
            "put": {**time_calls(put, duration_s, runs), "statement": "pipeline(HSET h:<id>, ZADD z:<id>)"},
        }
    finally:
        client.close()


def direct_sqlite(path: Path, duration_s: float, runs: int) -> dict[str, Any]:
    """sqlite3 on Prism's file: its SELECT; its upsert in BEGIN IMMEDIATE/COMMIT (synchronous FULL)."""
    from prism.backends.sqlite import keyvalue_ops as sqlite_ops

    get_sql = (
        "SELECT key, value, expires_at_ms FROM items"
        " WHERE id = ? AND (expires_at_ms = 0 OR expires_at_ms > ?) ORDER BY key LIMIT ?"
    )
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA busy_timeout = 5000")
        rows = conn.execute(get_sql, (GET_ID, int(time.time() * 1000), 1001)).fetchall()
        if [(k, v) for k, v, _ in rows] != EXPECTED:
            raise ServerFailed(f"direct sqlite SELECT returned {rows!r}")

        def get() -> object:
            return conn.execute(get_sql, (GET_ID, int(time.time() * 1000), 1001)).fetchall()

        def put() -> None:
            now_us = time.time_ns() // 1000
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sqlite_ops._UPSERT, (PUT_ID, ITEM_KEY, SEED_VALUE, 0, now_us, "", now_us // 1000))
            conn.execute("COMMIT")

        return {
            "get": {**time_calls(get, duration_s, runs), "statement": get_sql},
            "put": {**time_calls(put, duration_s, runs), "statement": "BEGIN IMMEDIATE; upsert; COMMIT"},
        }
    finally:
        conn.close()


# ---------------------------------------------------------------- cleanup


def cleanup(backend: str, namespace: str, prefix: str) -> list[str]:
    """Drop the bench's PostgreSQL tables / Redis keys; what was dropped."""
    done: list[str] = []
    if backend in ("postgres", "postgres_single"):
        import psycopg

        from prism.backends.postgres.keyvalue_sql import table_stem

        stem = table_stem(namespace)
        with psycopg.connect(DSN, autocommit=True) as conn:
            for table in (f"prism_kv_{stem}", f"prism_kv_{stem}_idem", f"prism_kv_{stem}_tomb"):
                conn.execute(f'DROP TABLE IF EXISTS "{table}"')
                done.append(table)
    elif backend == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            done.extend(k.decode() for k in keys)
        finally:
            client.close()
    return done


# ---------------------------------------------------------------- one backend


def bench_backend(backend: str, opts: argparse.Namespace, workdir: Path, pinned: bool) -> dict[str, Any]:
    """Prism's get and put, then the direct client's, for one backend."""
    namespace = f"bench_{backend}_{secrets.token_hex(4)}"
    prefix = f"prism_bench:{secrets.token_hex(6)}:"
    cpus = (SERVER_CPU,) if pinned else ()
    body = config(backend, namespace, prefix, opts.pg_pool_timeout)
    server = make_prism(backend, workdir, body, cpus, namespace)
    report: dict[str, Any] = {"namespace": namespace, "config": body}
    try:
        server.start()
        server.wait_ready(opts.ready_timeout)
        report["server_affinity"] = sorted(sorted(c) for c in server.affinities())
        seed(server.target, namespace, GET_ID, ITEM_KEY, SEED_VALUE)
        seed(server.target, namespace, PUT_ID, ITEM_KEY, SEED_VALUE)
        for op in ("get", "put"):
            report[f"prism_{op}"] = prism_op(server, namespace, op, opts, workdir)
            print(f"  prism {op}: {_row_text(report[f'prism_{op}'])}", flush=True)
        # Direct clients run while Prism is idle (its tables/keys/file are in place).
        direct: dict[str, Any] | None = None
        if backend in ("postgres", "postgres_single"):
            direct = direct_postgres(namespace, opts.duration, opts.runs)
        elif backend == "redis":
            direct = direct_redis(namespace, prefix, opts.duration, opts.runs)
        elif backend == "sqlite":
            direct = direct_sqlite(workdir / "data" / f"{namespace}.sqlite3", opts.duration, opts.runs)
        for op in ("get", "put"):
            report[f"direct_{op}"] = direct[op] if direct else None
            if direct:
                print(f"  direct {op}: {_row_text(direct[op])}", flush=True)
    except (ServerFailed, LoadFailed, grpc.RpcError, OSError, Exception) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["server_log_tail"] = server.log_tail()
        print(f"  {backend}: FAILED: {report['error']}", file=sys.stderr, flush=True)
    finally:
        server.stop()
        try:
            report["cleaned_up"] = len(cleanup(backend, namespace, prefix))
        except Exception as exc:  # reported, not fatal
            report["cleanup_error"] = f"{type(exc).__name__}: {exc}"
    report["server_log_issues"] = server.log_issues()
    return report


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['calls_per_s']:,.0f} calls/s, p50 {row['p50_us']:,.0f} us, p99 {row['p99_us']:,.0f} us, "
        f"CPU {row['cpu_us_per_call']:,.1f} us/call"
    )


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Prism CPU per call / direct client CPU per call, per backend and operation."""
    out: dict[str, float | None] = {}
    for backend, row in results.items():
        for op in ("get", "put"):
            prism, direct = row.get(f"prism_{op}"), row.get(f"direct_{op}")
            a = prism and prism.get("cpu_us_per_call")
            b = direct and direct.get("cpu_us_per_call")
            out[f"{backend}_{op}_ratio"] = round(a / b, 3) if a and b else None
    return out


def table(results: dict[str, dict[str, Any]], ratio_values: dict[str, float | None]) -> str:
    """The printed summary."""
    fmt = "{:<15} {:<4} {:<7} {:>9} {:>8} {:>8} {:>12} {:>8} {:>5}"
    head = ("backend", "op", "path", "calls/s", "p50 us", "p99 us", "CPU us/call", "others%", "ok")
    lines = [fmt.format(*head)]
    for backend, row in results.items():
        for op in ("get", "put"):
            for path in ("prism", "direct"):
                cell = row.get(f"{path}_{op}")
                if not cell:
                    lines.append(fmt.format(backend, op, path, "n/a", "", "", "", "", ""))
                    continue
                others = cell.get("other_on_server_cpu_pct")
                check = cell.get("verification")
                lines.append(fmt.format(
                    backend, op, path, f"{cell['calls_per_s']:,.0f}", f"{cell['p50_us']:,.0f}",
                    f"{cell['p99_us']:,.0f}", f"{cell['cpu_us_per_call']:,.1f}",
                    "" if others is None else f"{others:.0f}",
                    "" if check is None else ("yes" if check["ok"] else "NO"),
                ))  # fmt: skip
        if "error" in row:
            lines.append(f"ERROR {backend}: {row['error']}")
    lines.append("ratios (Prism CPU/call over direct client CPU/call):")
    for name, value in ratio_values.items():
        lines.append(f"  {name}: {'n/a' if value is None else f'{value:.2f}'}")
    pg = ratio_values.get("postgres_get_ratio")
    verdict = "n/a" if pg is None else ("met" if pg <= TARGET_PG_GET_RATIO else "MISSED")
    lines.append(f"postgres_get_ratio: {'n/a' if pg is None else f'{pg:.2f}'} "
                 f"(target <= {TARGET_PG_GET_RATIO:g}: {verdict})")  # fmt: skip
    if any(
        (row.get(f"prism_{op}") or {}).get("other_on_server_cpu_pct", 0) > DISTURBED_PCT
        for row in results.values() for op in ("get", "put")
    ):  # fmt: skip
        lines.append(f"warning: other work used > {DISTURBED_PCT:g}% of the server CPU in some run")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every backend, print the table, write the JSON; 1 if anything failed."""
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    pinned = pin_benchmark({SERVER_CPU}, LOAD_CPU)
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prism-backends-") as tmp:
        for backend in opts.backends:
            print(f"{backend}: {opts.runs} x {opts.duration:g}s per measurement", flush=True)
            workdir = Path(tmp) / backend
            workdir.mkdir()
            results[backend] = bench_backend(backend, opts, workdir, pinned)
    ratio_values = ratios(results)
    print()
    print(table(results, ratio_values))
    document = {
        "benchmark": "backends",
        "machine": machine_info(opts.loadgen),
        "params": {
            "duration_s": opts.duration, "runs": opts.runs, "warmup_s": opts.warmup,
            "backends": opts.backends, "value_bytes": len(SEED_VALUE), "pinned": pinned,
            "server_cpu": SERVER_CPU if pinned else None, "load_cpu": LOAD_CPU if pinned else None,
            "concurrency": {"clients": CONCURRENCY.clients, "streams": CONCURRENCY.streams},
            "direct": "sync client, one connection, sequential calls, in the bench process (pinned to "
                      "load_cpu); CPU = time.process_time of that process",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 1),
        },
        "results": results,
        "ratios": ratio_values,
        "postgres_get_ratio": ratio_values.get("postgres_get_ratio"),
        "target_postgres_get_ratio": TARGET_PG_GET_RATIO,
    }  # fmt: skip
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {opts.out}")
    failed = any(
        "error" in row or not all(
            (row.get(f"prism_{op}") or {}).get("verification", {}).get("ok") for op in ("get", "put")
        )
        for row in results.values()
    )  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
