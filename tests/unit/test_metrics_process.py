"""Metrics in multiprocess mode name the process that wrote them, though the
process id is read once per process (``prism.metrics``): a fork's child
writes its own file, and the admin page sums both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os, sys
from prism import metrics
metrics.FORWARDED.labels("ns", "GetItems").inc()
child = os.fork()
if child == 0:
    metrics.FORWARDED.labels("ns", "GetItems").inc(2)
    os._exit(0)
os.waitpid(child, 0)
print(os.getpid(), child)
"""


def test_a_forked_child_writes_its_own_samples(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    parent, child = done.stdout.split()
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted([f"counter_{parent}.db", f"counter_{child}.db"])

    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    labels = {"namespace": "ns", "operation": "GetItems"}
    assert registry.get_sample_value("prism_forwarded_calls_total", labels) == 3.0
