"""A SQLite namespace moved to PostgreSQL under load, through every phase (issue 14).

One ``prism serve`` holds namespace ``mig_<run>`` on SQLite, seeded with
``--records`` records. A writer thread writes continuously (each PutItems
with its own idempotency token and the client's clock as its stamp) and a
reader thread reads; meanwhile the migration goes:

    before (--window-s)  ->  start (dual_write, then the backfill at --rate)
    -> shadow_read (--window-s, shadow fraction --shadow-fraction)
    -> promote -> after (--window-s) -> writer and reader stop -> finish

It records the clients' p50/p99 latency in four windows (before, during
the backfill, shadow reads, after promotion), the CPU each used (cores busy
and ms per client call: the server's processes, the PostgreSQL sessions on
``--dsn``'s database, the clients, and what else ran on the machine: on a
shared machine, ``other_cores`` says how noisy a window was) and the copy
rate, then checks:

- no client call failed;
- the target holds exactly the source's records (before finish, while both
  are written: every record's items, values and expiry; read with the
  backends' own ``export_records``);
- the shadow reads made after the backfill found 0 mismatches;
- after finish (the namespace on PostgreSQL alone), every acknowledged write
  is readable with the value that won (the writer's last for each id).

It prints the figures and writes ``bench/results/migration.json``. The issue
asks that the backfill at the default rate (1000 records/s) keep the p99
within 2x of the p99 before it (``p99_backfill_vs_before``); a write during
the backfill also goes to the target, so ``p99_backfill_vs_shadow_read``
(dual writes without a backfill) shows what the copy itself costs.

    python bench/migration.py                  # the full run (a quiet machine)
    python bench/migration.py --quick          # a short run that checks it all works
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from statistics import quantiles
from typing import Any

import grpc
import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_servers import make_prism
from prism.backends import registry
from prism.backends.keyvalue import Migratable
from prism.benchmark.procstat import CLK_TCK, process_role, process_tree, stat_fields
from prism.proto import common_pb2, kv_pb2, kv_pb2_grpc

RESULTS = Path(__file__).resolve().parent / "results" / "migration.json"
TOKEN = "bench-migration-token-1234"
SETTLE_S = 3.0


class Client:
    """A writer or a reader thread: every call's latency, stamped with when it ended."""

    def __init__(self, stub: kv_pb2_grpc.KeyValueStub, namespace: str, ids: int, write: bool) -> None:
        self.stub, self.namespace, self.ids, self.write = stub, namespace, ids, write
        self.samples: list[tuple[float, float]] = []  # (end, seconds)
        self.errors: list[str] = []
        self.acked: dict[str, bytes] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._rng = random.Random(1 if write else 2)

    def _run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            rid = f"r{self._rng.randrange(self.ids):07d}"
            started = time.perf_counter()
            try:
                if self.write:
                    seq += 1
                    value = f"{rid}:w{seq}".encode()
                    token = common_pb2.IdempotencyToken(
                        generation_time_us=time.time_ns() // 1000, token=uuid.uuid4().hex
                    )
                    self.stub.PutItems(
                        kv_pb2.PutItemsRequest(
                            namespace=self.namespace,
                            id=rid,
                            items=[kv_pb2.Item(key=b"k", value=value)],
                            idempotency_token=token,
                        ),
                        timeout=10,
                    )
                    self.acked[rid] = value
                else:
                    self.stub.GetItems(kv_pb2.GetItemsRequest(namespace=self.namespace, id=rid), timeout=10)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            ended = time.perf_counter()
            self.samples.append((ended, ended - started))


def window(clients: list[Client], start: float, end: float) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": round(end - start, 2)}
    for client in clients:
        lat = sorted(s for t, s in client.samples if start <= t < end)
        kind = "write" if client.write else "read"
        out[f"{kind}_calls"] = len(lat)
        if len(lat) >= 2:
            q = quantiles(lat, n=100)
            out[f"{kind}_p50_ms"] = round(q[49] * 1000, 3)
            out[f"{kind}_p99_ms"] = round(q[98] * 1000, 3)
    return out


class Cpu:
    """CPU seconds so far: the server's process tree, the PostgreSQL sessions
    on the bench's database (the migration's connections), this process (the
    clients), and the whole machine (what else ran: the noise on a shared one)."""

    def __init__(self, server_pid: int, dsn: str) -> None:
        self.server_pid = server_pid
        self.conn = psycopg.connect(dsn, autocommit=True)

    def snapshot(self) -> dict[str, float]:
        def ticks(pids: list[int]) -> int:
            total = 0
            for pid in pids:
                fields = stat_fields(pid)
                if fields is not None:
                    total += int(fields[11]) + int(fields[12])
            return total

        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid != pg_backend_pid()"
        ).fetchall()
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
        times = os.times()
        tree = process_tree(self.server_pid)
        workers = [pid for pid in tree if process_role(pid, self.server_pid).startswith("worker")]
        return {
            "prism": ticks(tree) / CLK_TCK,
            "workers": ticks(workers) / CLK_TCK,
            "postgres": ticks([int(pid) for (pid,) in rows]) / CLK_TCK,
            "clients": times.user + times.system,
            "machine": (user + nice + system + irq + softirq) / CLK_TCK,
        }


def cpu_window(a: dict[str, float], b: dict[str, float], seconds: float, calls: int) -> dict[str, float]:
    """CPU used between two snapshots: cores busy (seconds a second), and the
    server's and PostgreSQL's CPU per client call (reads and writes) in ms."""
    used = {k: b[k] - a[k] for k in a}
    used["other"] = used["machine"] - used["prism"] - used["postgres"] - used["clients"]
    used["prism_rest"] = used["prism"] - used["workers"]  # the supervisor and the admin process
    out = {f"{k}_cores": round(v / seconds, 3) for k, v in used.items() if k != "machine"}
    if calls:
        out["prism_ms_per_call"] = round(used["prism"] * 1000 / calls, 3)
        out["postgres_ms_per_call"] = round(used["postgres"] * 1000 / calls, 3)
    return out


def admin(url: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + TOKEN)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=130) as answer:
            return dict(json.loads(answer.read()))
    except urllib.error.HTTPError as exc:
        raise SystemExit(
            f"migration: {method} {path}: {exc.code} {exc.read().decode(errors='replace')}"
        ) from None


def wait_phase(url: str, namespace: str, phase: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = admin(url, "GET", f"/v1/migrations/{namespace}")
        if status["phase"] == phase and not status["lagging"]:
            return status
        if time.monotonic() > deadline:
            raise SystemExit(f"migration: not in {phase} after {timeout_s:g}s: {status}")
        time.sleep(0.05)


async def _records(backend: Any) -> dict[str, list[tuple[bytes, bytes, int]]]:
    out: dict[str, list[tuple[bytes, bytes, int]]] = {}
    await backend.open()
    try:
        after = None
        while True:
            page = await backend.export_records(
                after=after, limit_items=1000, limit_bytes=4 << 20, now_ms=int(time.time() * 1000)
            )
            for rid, items in page.records:
                out[rid] = sorted((i.key, i.value, i.expires_at_ms) for i in items)
            if page.last_id is None:
                return out
            after = page.last_id
    finally:
        await backend.aclose()


def snapshot(data_dir: Path, namespace: str, dsn: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every record of the source (SQLite) and of the target (PostgreSQL), as the backends export them."""
    source = registry.create("sqlite", {}, data_dir=data_dir, namespace=namespace)
    target = registry.create("postgres", {"dsn": dsn, "pool_size": 2}, data_dir=data_dir, namespace=namespace)
    assert isinstance(source, Migratable) and isinstance(target, Migratable)
    return trio.run(_records, source), trio.run(_records, target)


def seed(stub: kv_pb2_grpc.KeyValueStub, namespace: str, records: int) -> None:
    def part(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            item = kv_pb2.Item(key=b"k", value=f"r{i:07d}:seed".encode())
            stub.PutItems(
                kv_pb2.PutItemsRequest(namespace=namespace, id=f"r{i:07d}", items=[item]), timeout=30
            )

    step = (records + 7) // 8
    threads = [
        threading.Thread(target=part, args=(lo, min(records, lo + step))) for lo in range(0, records, step)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def drop_tables(dsn: str, namespace: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for suffix in ("", "_idem", "_tomb"):
            conn.execute(f'DROP TABLE IF EXISTS "prism_kv_{namespace}{suffix}"'.encode())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=1000, help="backfill records/s (the default rate)")
    parser.add_argument("--window-s", type=float, default=15.0, help="before / shadow / after windows")
    parser.add_argument("--shadow-fraction", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dsn", default=os.environ.get("PRISM_TEST_PG_DSN", "postgresql://127.0.0.1/test"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp") / f"prism-bench-migration-{os.getpid()}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--samples", type=Path, help="also write every call's (end, seconds) and the phases' times"
    )
    parser.add_argument("--quick", action="store_true", help="2,000 records, 3 s windows: checks it works")
    args = parser.parse_args()
    if args.quick:
        args.records, args.window_s = 2000, 3.0
    if args.records < 1 or args.rate < 1 or args.window_s <= 0 or not 0 < args.shadow_fraction <= 1:
        parser.error("--records, --rate and --window-s must be positive, --shadow-fraction in (0, 1]")
    namespace = f"mig_{uuid.uuid4().hex[:8]}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    token_file = args.workdir / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    body = (
        f'admin_token_file = "{token_file}"\nworkers = {args.workers}\n'
        f'[[namespaces]]\nname = "{namespace}"\nbackend = "sqlite"\n'
    )
    server = make_prism("prism", args.workdir, body, (), namespace)
    server.start()
    try:
        server.wait_ready(60)
        return run(args, server, namespace)
    finally:
        server.stop()
        drop_tables(args.dsn, namespace)


def run(args: argparse.Namespace, server: Any, namespace: str) -> int:
    url = server.admin_url
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = kv_pb2_grpc.KeyValueStub(channel)
    seed(stub, namespace, args.records)
    time.sleep(SETTLE_S)  # the seeding's aftermath (SQLite's WAL checkpoint) out of the "before" window
    ids = args.records + args.records // 10  # a tenth of the writes make new records
    writer = Client(
        kv_pb2_grpc.KeyValueStub(grpc.insecure_channel(f"127.0.0.1:{server.port}")), namespace, ids, True
    )
    reader = Client(
        kv_pb2_grpc.KeyValueStub(grpc.insecure_channel(f"127.0.0.1:{server.port}")), namespace, ids, False
    )
    clients = [writer, reader]
    for c in clients:
        c.thread.start()
    cpu = Cpu(server.pid, args.dsn)
    t0 = time.perf_counter()
    time.sleep(1.0)
    cpus = {"t0": cpu.snapshot()}
    time.sleep(args.window_s - 1.0)
    t_start = time.perf_counter()
    cpus["start"] = cpu.snapshot()
    admin(
        url,
        "POST",
        f"/v1/migrations/{namespace}/start",
        {
            "to": "postgres",
            "options": {"dsn": args.dsn},
            "rate": args.rate,
            "shadow_fraction": args.shadow_fraction,
        },
    )
    wait_phase(url, namespace, "backfill", 30)
    shadow = wait_phase(url, namespace, "shadow_read", args.records / args.rate * 5 + 60)
    t_copied = time.perf_counter()
    cpus["copied"] = cpu.snapshot()
    copied = shadow["progress"]["copied"]
    reads_at_start = shadow["progress"]["shadow_reads"]
    time.sleep(args.window_s)
    t_shadowed = time.perf_counter()
    cpus["shadowed"] = cpu.snapshot()
    shadowed = admin(url, "GET", f"/v1/migrations/{namespace}")["progress"]
    admin(url, "POST", f"/v1/migrations/{namespace}/promote")
    t_promoted = time.perf_counter()
    cpus["promoted"] = cpu.snapshot()
    time.sleep(args.window_s)
    t_end = time.perf_counter()
    cpus["end"] = cpu.snapshot()
    cpu.conn.close()
    for c in clients:
        c.stop.set()
    for c in clients:
        c.thread.join()
    # Every acknowledged write on both backends before they are compared: none
    # waiting for retry (queued) nor still on its way (pending). The workers
    # write these counters every second: one written before the clients
    # stopped could show 0 with writes still in flight.
    time.sleep(1.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        progress = admin(url, "GET", f"/v1/migrations/{namespace}")["progress"]
        if not progress["queued"] and not progress["pending"]:
            break
        time.sleep(0.1)
    source, target = snapshot(Path(args.workdir / "data"), namespace, args.dsn)
    same = source == target
    differ = sorted(set(source) ^ set(target)) + sorted(
        k for k in set(source) & set(target) if source[k] != target[k]
    )
    admin(url, "POST", f"/v1/migrations/{namespace}/finish")
    wrong = 0
    for rid, value in writer.acked.items():
        answer = stub.GetItems(kv_pb2.GetItemsRequest(namespace=namespace, id=rid), timeout=10)
        if [(i.key, i.value) for i in answer.items] != [(b"k", value)]:
            wrong += 1
    windows = {
        "before": window(clients, t0 + 1.0, t_start),
        "backfill": window(clients, t_start, t_copied),
        "shadow_read": window(clients, t_copied, t_shadowed),
        "after_promote": window(clients, t_promoted, t_end),
    }
    bounds = {
        "before": ("t0", "start"),
        "backfill": ("start", "copied"),
        "shadow_read": ("copied", "shadowed"),
        "after_promote": ("promoted", "end"),
    }
    for name, (a, b) in bounds.items():
        w = windows[name]
        w["cpu"] = cpu_window(
            cpus[a], cpus[b], w["seconds"], w.get("write_calls", 0) + w.get("read_calls", 0)
        )
    mismatches = sum(shadowed["mismatches"].values())

    def ratio(kind: str, base: str = "before") -> float | None:
        b, d = windows[base].get(f"{kind}_p99_ms"), windows["backfill"].get(f"{kind}_p99_ms")
        return round(d / b, 2) if b and d else None

    result = {
        "namespace": namespace,
        "records": args.records,
        "rate": args.rate,
        "workers": args.workers,
        "window_s": args.window_s,
        "windows": windows,
        "p99_backfill_vs_before": {"write": ratio("write"), "read": ratio("read")},
        # The backfill's own cost: against dual writes without it (shadow_read writes to both too).
        "p99_backfill_vs_shadow_read": {
            "write": ratio("write", "shadow_read"),
            "read": ratio("read", "shadow_read"),
        },
        "copy": {
            "copied": copied,
            "seconds": round(t_copied - t_start, 2),
            "records_per_s": round(copied / (t_copied - t_start), 1),  # start to shadow_read, all included
            "backfill_records_per_s": shadow["progress"][
                "records_per_s"
            ],  # the copy's own, as it measured it
        },
        "checks": {
            "failed_calls": len(writer.errors) + len(reader.errors),
            "first_errors": (writer.errors + reader.errors)[:5],
            "acknowledged_writes": len(writer.acked),
            "acknowledged_not_readable": wrong,
            "target_equals_source": same,
            "records_compared": len(source),
            "records_differing": differ[:10],
            "shadow_reads_after_backfill": shadowed["shadow_reads"] - reads_at_start,
            "shadow_mismatches": mismatches,
        },
    }
    checks = result["checks"]
    result["verified"] = (
        checks["failed_calls"] == 0
        and wrong == 0
        and same
        and mismatches == 0
        and checks["shadow_reads_after_backfill"] > 0
    )
    ratios = [r for r in result["p99_backfill_vs_before"].values() if r is not None]
    result["p99_within_2x"] = bool(ratios) and max(ratios) <= 2.0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.samples is not None:
        marks = {"t0": t0, "start": t_start, "copied": t_copied, "shadowed": t_shadowed}
        marks |= {"promoted": t_promoted, "end": t_end}
        calls = {("write" if c.write else "read"): c.samples for c in clients}
        args.samples.write_text(json.dumps({"marks": marks, "calls": calls}))
    for name, w in windows.items():
        print(
            f"{name:>14}: writes {w.get('write_calls', 0):6d} p50 {w.get('write_p50_ms', 0):7.2f} ms "
            f"p99 {w.get('write_p99_ms', 0):7.2f} ms | reads {w.get('read_calls', 0):6d} "
            f"p50 {w.get('read_p50_ms', 0):7.2f} ms p99 {w.get('read_p99_ms', 0):7.2f} ms"
        )
        c = w["cpu"]
        print(
            f"{'':>14}  cpu cores: prism {c['prism_cores']:.2f} (workers {c['workers_cores']:.2f}) "
            f"postgres {c['postgres_cores']:.2f} "
            f"clients {c['clients_cores']:.2f} other {c['other_cores']:.2f}; per call: prism "
            f"{c.get('prism_ms_per_call', 0):.3f} ms postgres {c.get('postgres_ms_per_call', 0):.3f} ms"
        )
    print(
        f"copy: {copied} records in {result['copy']['seconds']} s = "
        f"{result['copy']['records_per_s']} records/s (the copy's own: "
        f"{result['copy']['backfill_records_per_s']})"
    )
    print(
        f"p99 during backfill vs before: {result['p99_backfill_vs_before']} "
        f"(within 2x: {result['p99_within_2x']}); vs shadow_read: {result['p99_backfill_vs_shadow_read']}"
    )
    print(f"checks: {json.dumps(checks)}")
    print(f"verified: {result['verified']}; wrote {args.out.name}")
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
