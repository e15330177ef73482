"""Metrics in multiprocess mode (``prism serve``): written by
``prism.metrics_files`` in prometheus-client's file layout, without
importing prometheus-client, and read back by its ``MultiProcessCollector``
(as the admin process does); a fork's child writes its own file, and the
page sums both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

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

CALLS = """
import sys
from prism import metrics
for seconds in (0.00005, 0.0003, 0.0003, 7.0, 99.0):
    metrics.record_call("ns", "GetItems", "OK", "memory", seconds)
metrics.record_call("n\\"s", "PutItems", "INTERNAL", "sqlite", 0.001)
for _ in range(3000):  # past the file's first 64 KiB: it grows
    metrics.record_call("ns", "op" + str(_), "OK", "memory", 0.001)
metrics.SHARED_CACHE_CORRUPT.inc(4)
metrics.connection_closed("idle")
print("prometheus_client" in sys.modules)
"""


def run(script: str, directory: Path) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def collected(directory: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry


def test_a_forked_child_writes_its_own_samples(tmp_path: Path) -> None:
    parent, child = run(SCRIPT, tmp_path).split()
    written = sorted(p.name for p in tmp_path.iterdir())
    assert f"counter_{parent}.db" in written and f"counter_{child}.db" in written

    labels = {"namespace": "ns", "operation": "GetItems"}
    assert collected(tmp_path).get_sample_value("prism_forwarded_calls_total", labels) == 3.0


def test_prometheus_client_reads_what_a_worker_writes_without_it(tmp_path: Path) -> None:
    assert run(CALLS, tmp_path).split() == ["False"]  # the writer did not import prometheus-client
    registry = collected(tmp_path)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    ok = {"namespace": "ns", "operation": "GetItems", "backend": "memory"}
    assert value("prism_requests_total", namespace="ns", operation="GetItems", status="OK") == 5.0
    assert value("prism_request_duration_seconds_count", **ok) == 5.0
    assert value("prism_request_duration_seconds_sum", **ok) == 0.00005 + 0.0003 + 0.0003 + 7.0 + 99.0
    assert value("prism_request_duration_seconds_bucket", **ok, le="0.0001") == 1.0
    assert value("prism_request_duration_seconds_bucket", **ok, le="0.0005") == 3.0
    assert value("prism_request_duration_seconds_bucket", **ok, le="10.0") == 4.0
    assert value("prism_request_duration_seconds_bucket", **ok, le="+Inf") == 5.0
    odd = {"namespace": 'n"s', "operation": "PutItems"}
    assert value("prism_requests_total", **odd, status="INTERNAL") == 1.0
    assert value("prism_requests_total", namespace="ns", operation="op2999", status="OK") == 1.0
    assert value("prism_shared_cache_corrupt_slots_total") == 4.0
    assert value("prism_shared_cache_evictions_total") == 0.0  # listed from the start, as before
    assert value("prism_connections_closed_total", reason="idle") == 1.0
    assert b"# HELP prism_requests_total gRPC calls answered" in generate_latest(registry)


def test_a_reused_pid_goes_on_from_its_files_values(tmp_path: Path) -> None:
    script = "from prism import metrics\nmetrics.FORWARDED.labels('ns', 'GetItems').inc()\nimport os\n"
    script += "print(os.getpid())"
    pid = run(script, tmp_path).strip()
    # A later process with that pid (as if reused) reopens the same file.
    again = f"import os\nos.getpid = lambda: {pid}\n" + script
    run(again, tmp_path)

    labels = {"namespace": "ns", "operation": "GetItems"}
    assert collected(tmp_path).get_sample_value("prism_forwarded_calls_total", labels) == 2.0
