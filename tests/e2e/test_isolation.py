"""A tenant whose backend stalls does not slow or fail another tenant."""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time

import grpc

from .conftest import get, put, sqlite_ns, tenant_toml


def _latencies(stubs, seconds: float) -> tuple[list[float], list[str]]:
    """GetItems on fast's namespace, one thread per stub, for ``seconds``."""
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(stub) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                get(stub, "fastns", "hot", timeout=5)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)

    threads = [threading.Thread(target=run, args=(s,)) for s in stubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 10)
    return lat, errors


def test_stalled_backend_of_one_tenant_does_not_slow_another(prism_tree) -> None:
    tree = prism_tree(tenant_toml("slow", [sqlite_ns("slowns")]) + tenant_toml("fast", [sqlite_ns("fastns")]))
    slow_stubs = [tree.kv("slow.prism") for _ in range(5)]
    fast_stubs = [tree.kv("fast.prism") for _ in range(2)]
    put(fast_stubs[0], "fastns", "hot", b"k", b"v" * 100)
    for stub in slow_stubs:
        put(stub, "slowns", "warm", b"k", b"v")
    db = tree.data_dir / "slowns.sqlite3"
    assert db.exists(), db

    _latencies(fast_stubs, 0.3)  # warm up
    base, base_errors = _latencies(fast_stubs, 1.0)
    assert not base_errors, base_errors[:5]
    base_p50 = statistics.median(base)

    # Stall slow's backend: an exclusive transaction held from outside.
    holder = sqlite3.connect(db, timeout=0, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    outcomes: list[str] = []
    lock = threading.Lock()

    def slow_put(n: int) -> None:
        try:
            put(slow_stubs[n % len(slow_stubs)], "slowns", f"s{n}", b"k", b"v", timeout=30)
            status = "OK"
        except grpc.RpcError as exc:
            status = exc.code().name
        with lock:
            outcomes.append(status)

    writers = [threading.Thread(target=slow_put, args=(n,)) for n in range(50)]
    try:
        for t in writers:
            t.start()
        time.sleep(0.3)  # the writes are now queued behind the lock
        with lock:
            assert len(outcomes) < 5, f"slow's writes are not stalled: {outcomes}"
        during, during_errors = _latencies(fast_stubs, 1.5)
        with lock:
            stalled = len(outcomes)
    finally:
        holder.rollback()
        holder.close()
    for t in writers:
        t.join(40)
    assert not any(t.is_alive() for t in writers), "slow's writes hang after the stall ended"

    during_p50 = statistics.median(during)
    bound = max(3 * base_p50, base_p50 + 0.005)
    print(
        f"fast p50: baseline {base_p50 * 1e3:.2f} ms ({len(base)} calls), "
        f"during the stall {during_p50 * 1e3:.2f} ms ({len(during)} calls), bound {bound * 1e3:.2f} ms; "
        f"slow writes finished during the stall: {stalled}; slow outcomes: "
        f"{ {s: outcomes.count(s) for s in set(outcomes)} }"
    )
    assert not during_errors, during_errors[:5]
    assert stalled < 50, "the stall did not hold slow's writes back"
    assert during_p50 <= bound, (during_p50, base_p50)
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
