"""SIGTERM drains under load: calls end OK or UNAVAILABLE, exit 0 in time, no process left. SIGINT is fast."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import grpc

from prism.proto import kv_pb2

from .conftest import Load, get, pid_alive, put, sqlite_ns, tenant_toml

GRACEFUL_S = 5.0


def _load_on(tree, threads: int) -> Load:
    stubs = [tree.kv("t.prism") for _ in range(threads)]
    for stub in stubs:
        get(stub, "kv", "warm")

    def work(i: int, n: int) -> None:
        if n % 3 == 0:
            put(stubs[i], "kv", f"r{i}", f"k{n % 50}".encode(), f"v{n}".encode(), timeout=10)
        else:
            get(stubs[i], "kv", f"r{i}", timeout=10)

    return Load(threads, work)


def test_sigterm_under_load_drains_cleanly(prism_tree) -> None:
    tree = prism_tree(tenant_toml("t", [sqlite_ns("kv")], workers=2), graceful_timeout_s=GRACEFUL_S)
    assert tree.proc is not None
    with _load_on(tree, 8) as load:
        load.wait_for_calls(300)
        pids = tree.tree_pids()
        assert len(pids) == 4, pids  # two workers, the admin process and the worker template
        ok_before = load.ok
        tree.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            code = tree.proc.wait(GRACEFUL_S + 2)
        except Exception:
            code = None
        took = time.monotonic() - sent
        time.sleep(0.2)  # calls made after the exit fail fast (refused): they must be UNAVAILABLE too
    print(f"drained in {took:.3f}s; {load.ok - ok_before} calls OK after SIGTERM; statuses {load.statuses}")
    assert code == 0, f"supervisor exit code {code} after {took:.2f}s; stderr: {tree.stderr()[-2000:]}"
    assert took < GRACEFUL_S + 2
    bad = [e for e in load.errors if e[1] != "UNAVAILABLE"]
    assert not bad, f"{len(bad)} calls ended neither OK nor UNAVAILABLE: {bad[:5]}"
    left = [pid for pid in pids if pid_alive(pid)]
    assert not left, f"processes of the tree still alive after the supervisor exited: {left}"


def test_sigint_stops_fast(prism_tree) -> None:
    tree = prism_tree(tenant_toml("t", [sqlite_ns("kv")], workers=2), graceful_timeout_s=GRACEFUL_S)
    assert tree.proc is not None
    with _load_on(tree, 4) as load:
        load.wait_for_calls(100)
        pids = tree.tree_pids()
        assert len(pids) == 4, pids  # two workers, the admin process and the worker template
        tree.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            code = tree.proc.wait(3.0)
        except Exception:
            code = None
        took = time.monotonic() - sent
    print(f"SIGINT: exit {code} in {took:.3f}s")
    assert code is not None, f"supervisor still running 3s after SIGINT; stderr: {tree.stderr()[-2000:]}"
    assert took < 3.0
    left = [pid for pid in pids if pid_alive(pid)]
    assert not left, f"processes of the tree still alive after the supervisor exited: {left}"


def test_sigterm_finishes_in_flight_calls_on_handed_off_connections(prism_tree) -> None:
    """Calls in flight on connections another worker handed over finish OK, as on any connection.

    b's worker is stopped while the connections are made, so a's worker accepts
    every one of them and hands it to b: all of them are handed-off connections.
    Each then carries a write that b's backend holds (an exclusive lock taken
    from outside) when SIGTERM arrives; the lock goes 1 s into the drain.
    """
    tree = prism_tree(
        tenant_toml("a", [sqlite_ns("na")]) + tenant_toml("b", [sqlite_ns("nb")]),
        graceful_timeout_s=GRACEFUL_S,
        heartbeat_timeout_s=5.0,
    )
    assert tree.proc is not None
    [b_worker] = tree.owners("nb")
    handoffs = tree.metric("prism_connection_handoffs_total", tenant="b")
    tree.stop_worker(b_worker["pid"])
    try:
        stubs = [tree.kv("b.prism") for _ in range(4)]  # only a's worker accepts meanwhile
        first = [s.GetItems.future(kv_pb2.GetItemsRequest(namespace="nb", id="w"), timeout=10) for s in stubs]
        time.sleep(0.3)
    finally:
        os.kill(b_worker["pid"], signal.SIGCONT)
    for f in first:
        f.result()
    assert tree.metric("prism_connection_handoffs_total", tenant="b") == handoffs + len(stubs)

    holder = sqlite3.connect(tree.data_dir / "nb.sqlite3", timeout=0, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        calls = [
            s.PutItems.future(
                kv_pb2.PutItemsRequest(namespace="nb", id=f"r{n}", items=[kv_pb2.Item(key=b"k", value=b"v")]),
                timeout=10,
            )
            for n, s in enumerate(stubs)
        ]
        time.sleep(0.3)
        assert not any(c.done() for c in calls), "the writes were not held by the lock"
        tree.send_signal(signal.SIGTERM)
        time.sleep(1.0)
    finally:
        holder.rollback()
        holder.close()
    outcomes = []
    for c in calls:
        try:
            c.result()
            outcomes.append("OK")
        except grpc.RpcError as exc:
            outcomes.append(f"{exc.code().name}: {exc.details()}")
    code = tree.proc.wait(GRACEFUL_S + 2)
    assert code == 0
    assert outcomes == ["OK"] * len(calls), f"in-flight calls on handed-off connections: {outcomes}"


def test_a_worker_that_does_not_drain_in_time_is_killed(prism_tree) -> None:
    """SIGTERM, then SIGKILL for a worker still running graceful_timeout_s later; the exit is still 0."""
    graceful_s = 1.0
    body = tenant_toml("t", [sqlite_ns("kv")], workers=2)
    tree = prism_tree(body, graceful_timeout_s=graceful_s, heartbeat_timeout_s=30.0)
    assert tree.proc is not None
    stuck, other = sorted(o["pid"] for o in tree.owners("kv"))
    tree.stop_worker(stuck)  # a stopped process cannot act on SIGTERM; SIGKILL still ends it
    tree.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = tree.proc.wait(graceful_s + 5)
    took = time.monotonic() - sent
    print(f"drained in {took:.3f}s")
    assert code == 0, tree.stderr()[-2000:]
    assert graceful_s <= took < graceful_s + 2
    assert not pid_alive(stuck) and not pid_alive(other)
    killed = [line for line in tree.stderr().splitlines() if "did not drain in time" in line]
    assert killed and "SIGKILL" in killed[0], tree.stderr()[-2000:]
