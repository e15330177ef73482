"""Workers run on the CPUs they were pinned to: the tenant's ``cpus``, else round robin."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from .conftest import Load, cpus_allowed, get, last_cpu, parse_cpu_list, put, sqlite_ns, tenant_toml


def _tasks(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def _task_cpus_allowed(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}/{tid}")


def _task_last_cpu(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[39 - 3])


def test_workers_run_on_their_pinned_cpus(prism_tree, tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    pinned_cpu = allowed[-1]
    body = tenant_toml("pinned", [sqlite_ns("np")], workers=2, cpus=[pinned_cpu]) + tenant_toml(
        "free", [sqlite_ns("nf")], workers=2
    )
    tree = prism_tree(body)

    owners = {name: ns["owners"] for name, ns in tree.namespaces().items()}
    assert len(owners["np"]) == 2 and len(owners["nf"]) == 2, owners
    assert all(o["serving"] for os_ in owners.values() for o in os_), owners

    # The pinned tenant: every worker on exactly the CPU it named.
    for o in owners["np"]:
        assert cpus_allowed(o["pid"]) == str(pinned_cpu), (o, cpus_allowed(o["pid"]))
    # Without cpus: one CPU each, round robin over the CPUs the supervisor may use.
    free = sorted(owners["nf"], key=lambda o: o["id"])
    got = [cpus_allowed(o["pid"]) for o in free]
    expected = [str(allowed[n % len(allowed)]) for n in range(len(free))]
    assert got == expected, (got, expected)

    # Some load on both tenants, so every worker (and its threads) has run.
    stubs = {t: [tree.kv(f"{t}.prism") for _ in range(2)] for t in ("pinned", "free")}
    namespace = {"pinned": "np", "free": "nf"}

    def work(i: int, n: int) -> None:
        tenant = ("pinned", "free")[i % 2]
        stub = stubs[tenant][(i // 2) % 2]
        if n % 4 == 0:
            put(stub, namespace[tenant], f"r{i}", b"k", str(n).encode())
        else:
            get(stub, namespace[tenant], f"r{i}")

    with Load(4, work) as load:
        load.wait_for_calls(400)
        time.sleep(0.3)
    assert not load.errors, load.errors[:5]

    for ns, cpu_list in (("np", str(pinned_cpu)), ("nf", None)):
        for o in owners[ns]:
            pid = o["pid"]
            want = cpu_list or cpus_allowed(pid)
            want_set = parse_cpu_list(want)
            assert len(want_set) == 1, (pid, want)
            assert last_cpu(pid) in want_set, (pid, last_cpu(pid), want)
            # Every thread of the worker (sqlite hops, nng) inherits the pinning.
            for tid in _tasks(pid):
                try:
                    allowed_t = _task_cpus_allowed(pid, tid)
                    ran_on = _task_last_cpu(pid, tid)
                except FileNotFoundError:
                    continue  # the thread ended meanwhile
                assert allowed_t == want, (pid, tid, allowed_t, want)
                assert ran_on in want_set, (pid, tid, ran_on, want)


def test_pinning_to_a_cpu_this_process_cannot_use_is_refused(prism_tree) -> None:
    """``cpus`` naming a CPU outside the allowed set: refused with a reason, not a crash loop."""
    cpu = max(os.sched_getaffinity(0)) + 1
    tree = prism_tree(tenant_toml("t", [sqlite_ns("kv")], cpus=[cpu]), start=False)
    tree.spawn()
    assert tree.proc is not None
    try:
        code = tree.proc.wait(8)
    except subprocess.TimeoutExpired:
        code = None
    err = tree.stderr()
    restarts = err.count("restarting in")
    assert code in (2, 3), f"exit {code} (None: still running after 8s, {restarts} restarts); {err[-1500:]}"
    assert any("cpu" in line.lower() and str(cpu) in line for line in err.splitlines()), err[-1500:]
    assert "Traceback" not in err, err[-1500:]
