"""How much memory an idle worker costs, as ``/proc/PID/smaps_rollup`` shows
it: a memory-only worker loads no driver (no sqlite3, psycopg, hiredis, NATS
client or PyJWT), and it is forked from the worker template
(``prism.workers.zygote``), whose imported modules it shares, which keeps its
proportional set size under the bound."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.e2e.conftest import PrismTree, get, put, tenant_toml, wait_until

# Measured 29.1 MB exec'd (35.7 MB before drivers became lazy); forked from
# the template, without asyncio and prometheus-client, 17.6 MB. A driver
# loaded for nothing (PyJWT alone is ~6 MB of PSS) crosses this.
WORKER_PSS_BOUND_KB = 20 * 1024


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError(f"no Pss line for {pid}")


WITHOUT_COVERAGE: dict[str, str | None] = {"COVERAGE_PROCESS_CONFIG": None, "COVERAGE_PROCESS_START": None}


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_an_idle_memory_only_worker_stays_under_the_pss_bound(prism_tree) -> None:
    # Without coverage.py in its processes (CI measures coverage in every
    # process: its tracer and its SQLite data file are not Prism's memory).
    tree: PrismTree = prism_tree(
        tenant_toml("t", ['{ name = "mem", backend = "memory" }']), env=WITHOUT_COVERAGE
    )
    put(tree.kv(), "mem", "r", b"k", b"v")  # served once: its call path is loaded too
    time.sleep(1)  # idle
    (worker,) = tree.worker_pids()["t"]

    assert b"prism.workers.zygote" in cmdline(worker)  # forked by the template
    assert Path(f"/proc/{worker}/comm").read_text().startswith("0:t@cpu")  # its label, for ps and top
    assert 0 < pss_kb(worker) < WORKER_PSS_BOUND_KB


def test_workers_are_exec_d_once_the_template_is_gone(prism_tree) -> None:
    """A worker template that died is not a reason to stop serving: the next
    worker is exec'd, as before there was a template."""
    tree: PrismTree = prism_tree(tenant_toml("t", ['{ name = "mem", backend = "memory" }']))
    assert tree.proc is not None
    [template] = [
        p for p in tree.tree_pids() if Path(f"/proc/{p}/comm").read_text().strip() == "prism-template"
    ]
    (worker,) = tree.worker_pids()["t"]
    os.kill(template, signal.SIGKILL)
    os.kill(worker, signal.SIGKILL)

    def replaced() -> int | None:
        pids = tree.worker_pids().get("t", set())
        return next((p for p in pids if p not in (0, worker) and b"prism.workers.worker" in cmdline(p)), None)

    wait_until(replaced, 10.0, step_s=0.1, what="a worker exec'd in place of the killed one")
    put(tree.kv(), "mem", "r", b"k", b"v2")
    assert get(tree.kv(), "mem", "r") == {b"k": b"v2"}
