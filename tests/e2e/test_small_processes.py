"""How much memory an idle worker costs, as ``/proc/PID/smaps_rollup`` shows
it: a memory-only worker loads no driver (no sqlite3, psycopg, hiredis, NATS
client or PyJWT), which keeps its proportional set size under the bound."""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.conftest import PrismTree, put, tenant_toml

# Measured 29.1 MB (35.7 MB before drivers became lazy); issue 12 aims at 20.
# A driver loaded for nothing (PyJWT alone is ~6 MB of PSS) crosses this.
WORKER_PSS_BOUND_KB = 32 * 1024


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError(f"no Pss line for {pid}")


WITHOUT_COVERAGE: dict[str, str | None] = {"COVERAGE_PROCESS_CONFIG": None, "COVERAGE_PROCESS_START": None}


def worker_pids(tree: PrismTree) -> list[int]:
    return [p for p in tree.tree_pids() if b"prism.workers.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_an_idle_memory_only_worker_stays_under_the_pss_bound(prism_tree) -> None:
    # Without coverage.py in its processes (CI measures coverage in every
    # process: its tracer and its SQLite data file are not Prism's memory).
    tree: PrismTree = prism_tree(
        tenant_toml("t", ['{ name = "mem", backend = "memory" }']), env=WITHOUT_COVERAGE
    )
    put(tree.kv(), "mem", "r", b"k", b"v")  # served once: its call path is loaded too
    time.sleep(1)  # idle
    (worker,) = worker_pids(tree)

    assert 0 < pss_kb(worker) < WORKER_PSS_BOUND_KB
