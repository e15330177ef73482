"""A worker that stops heartbeating is replaced; a worker that cannot boot halts the server (exit 3)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from .conftest import get, pid_alive, put, sqlite_ns, tenant_toml, wait_until

HEARTBEAT_S = 1.0


def test_stopped_worker_is_killed_and_replaced(prism_tree) -> None:
    tree = prism_tree(
        tenant_toml("a", [sqlite_ns("na")]) + tenant_toml("b", [sqlite_ns("nb")]),
        heartbeat_timeout_s=HEARTBEAT_S,
    )
    stub = tree.kv("a.prism")
    put(stub, "na", "r", b"k", b"before")
    [old] = tree.owners("na")
    [b_worker] = tree.owners("nb")
    tree.stop_worker(old["pid"])
    stopped = time.monotonic()

    def replaced() -> dict | None:
        fresh = [o for o in tree.owners("na") if o["pid"] != old["pid"] and o["serving"]]
        return fresh[0] if fresh else None

    new = wait_until(replaced, HEARTBEAT_S + 2, step_s=0.02, what="stopped worker replaced and serving")
    took = time.monotonic() - stopped
    tree.known_pids.add(new["pid"])
    wait_until(lambda: not pid_alive(old["pid"]), 1.0, what=f"stopped worker {old['pid']} gone")
    print(f"stopped worker replaced in {took:.3f}s")
    assert took >= HEARTBEAT_S * 0.9, f"replaced after {took:.3f}s, before the heartbeat timeout"
    # The other tenant's worker was left alone, and a's data is served by the new worker.
    assert tree.owners("nb") == [b_worker]
    assert get(tree.kv("a.prism"), "na", "r") == {b"k": b"before"}
    assert "missed heartbeats" in tree.stderr()


def test_worker_that_cannot_boot_halts_with_exit_3(prism_tree) -> None:
    ns = sqlite_ns("broken", extra=', options = { path = "/proc/nope/x.sqlite3" }')
    tree = prism_tree(tenant_toml("t", [ns]), start=False)
    tree.spawn()
    assert tree.proc is not None
    started = time.monotonic()
    try:
        code = tree.proc.wait(15)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - started
    err = tree.stderr()
    assert code == 3, f"exit {code} after {took:.1f}s; stderr: {err[-2000:]}"
    lines = [line for line in err.splitlines() if "cannot boot" in line]
    assert lines, err[-2000:]
    assert any("worker" in line and "'t'" in line for line in lines), lines


def test_admin_process_that_dies_is_restarted(prism_tree) -> None:
    """The admin process holds no state and can be restarted at any time: the supervisor does so."""
    tree = prism_tree(tenant_toml("t", [sqlite_ns("kv")]))
    [admin] = [
        pid for pid in tree.tree_pids() if b"prism.admin.main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    os.kill(admin, signal.SIGKILL)
    killed = time.monotonic()

    def answers() -> bool:
        return tree.fetch("/readyz", timeout_s=0.5)[0] == 200 and admin not in tree.tree_pids()

    try:
        wait_until(answers, 3.0, step_s=0.05, what="admin endpoint answers again after its process died")
    finally:
        print(
            f"admin after {time.monotonic() - killed:.2f}s: children {tree.tree_pids()}, zombie: "
            f"{os.path.exists(f'/proc/{admin}') and not pid_alive(admin)}"
        )
    assert not os.path.exists(f"/proc/{admin}"), "the dead admin process was not reaped"
    assert get(tree.kv("t.prism"), "kv", "r") == {}


def test_workers_of_a_tenant_boot_together_on_a_fresh_data_dir(prism_tree) -> None:
    """Two workers of one tenant open the same new SQLite files at about the same time: both boot.

    Whether their opens of one file overlap depends on start-up jitter, hence
    several files and rounds (``test_two_processes_open_the_same_new_sqlite_file``
    makes the overlap certain).
    """
    count = 8
    namespaces = [sqlite_ns(f"n{i}") for i in range(count)]
    for round_ in range(3):
        tree = prism_tree(tenant_toml("t", namespaces, workers=2), start=False, name=f"round{round_}")
        try:
            tree.start()
            assert all(len(tree.owners(f"n{i}")) == 2 for i in range(count))
        finally:
            assert tree.stop() == 0


def _open_backends(directories: list[str], barrier: Any, results: Any) -> None:
    """In a child process: open (and close) each directory's SQLite backend, in step with a sibling."""
    import trio

    from prism.backends.sqlite.keyvalue import SqliteBackend
    from prism.backends.sqlite.options import SqliteOptions

    for directory in directories:
        backend = SqliteBackend(SqliteOptions(), data_dir=Path(directory), namespace="ns")
        barrier.wait()
        try:
            trio.run(backend.open)
        except Exception as exc:
            results.put(f"{directory}: {exc!r} (cause: {exc.__cause__!r})")
        else:
            trio.run(backend.aclose)
            results.put("ok")


def test_two_processes_open_the_same_new_sqlite_file(tmp_path: Path) -> None:
    """What two workers of a tenant do at boot: open one new SQLite file at the same moment.

    Both must succeed (the backend's busy timeout is there for this); a
    failure is a worker that cannot boot, which halts the whole server.
    """
    ctx = multiprocessing.get_context("spawn")
    directories = [str(tmp_path / f"d{i}") for i in range(30)]
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_open_backends, args=(directories, barrier, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=30) for _ in range(2 * len(directories))]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failed = [o for o in outcomes if o != "ok"]
    assert not failed, f"{len(failed)} of {len(outcomes)} opens failed, e.g. {failed[:2]}"
