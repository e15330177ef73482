"""``prism bench`` against real ``prism serve`` trees: the built-in generator's answers are
checked (a wrong one fails), the CLI writes results.json (schema-checked) and report.html
(with its plots), and Ctrl-C stops cleanly, keeping what was measured and stopping the server."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from prism.benchmark import results
from prism.benchmark.loadgen import Outcome, Plan, run_step
from prism.benchmark.report import have_matplotlib
from prism.benchmark.seed import SeedFailed, seed_and_learn
from prism.benchmark.servers import PrismServer, make_prism
from prism.benchmark.workload import Spec

REPO = Path(__file__).resolve().parents[2]
MEMORY_KV = REPO / "bench" / "scenarios" / "memory-kv.toml"
CONFIG = """workers = 1
[[namespaces]]
name = "kv"
backend = "memory"
[[namespaces]]
name = "ts"
abstraction = "timeseries"
backend = "sqlite"
[[namespaces]]
name = "ps"
abstraction = "pubsub"
backend = "memory"
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrismServer]:
    srv = make_prism("prism", tmp_path, CONFIG, (), "kv")
    srv.start()
    try:
        srv.wait_ready(60)
        yield srv
    finally:
        srv.stop()


def spec(namespace: str, **weights: float) -> Spec:
    return Spec(namespace, weights, 50, 100, "zipf", 1.1, 5, 10)


def step(srv: PrismServer, s: Spec, *, mode: str = "closed", rate: float = 0.0) -> Outcome:
    plan = Plan("127.0.0.1", srv.port, mode, 2, 4, rate, time.monotonic() + 0.1, 0.2, 0.8, 7)
    return run_step(plan, s)


def test_every_operation_is_answered_and_checked_in_both_loops(server: PrismServer) -> None:
    for s in (
        spec("kv", get=8, put=1, scan=1),
        spec("ts", read_events=3, write_events=1),
        spec("ps", publish=1),
    ):
        learned = seed_and_learn("127.0.0.1", server.port, s)
        for mode, rate in (("closed", 0.0), ("open", 300.0)):
            outcome = step(server, learned, mode=mode, rate=rate)
            assert outcome.wrong_total == 0, outcome.wrong
            assert outcome.errors == {op: {} for op in s.weights}
            counts = {op: len(raw) // 8 for op, raw in outcome.latencies_us.items()}
            assert all(n > 0 for n in counts.values()), (s.namespace, mode, counts)
            if mode == "open":  # the calls due in the window: 300/s for 0.8 s, whatever the server does
                assert 238 <= sum(counts.values()) <= 242, counts


def test_a_wrong_answer_is_counted_and_shown_never_measured(server: PrismServer) -> None:
    seed_and_learn("127.0.0.1", server.port, spec("kv", get=1))
    # The records hold 100-byte values; this spec expects 99-byte ones.
    wrong = msgspec.structs.replace(spec("kv", get=1), value_bytes=99)
    outcome = step(server, wrong)
    assert outcome.latencies_us == {"get": b""}
    assert outcome.errors["get"]["WRONG_ANSWER"] > 0
    assert outcome.wrong_total >= outcome.errors["get"]["WRONG_ANSWER"]
    assert outcome.wrong[0].startswith("get key ")
    with pytest.raises(SeedFailed, match="GetItems of record 0 answered OK"):
        seed_and_learn("127.0.0.1", server.port, wrong, write=False)


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prism.cli", "bench", *args],
        capture_output=True, text=True, timeout=180, cwd=cwd, env=os.environ | {"PYTHONPATH": str(REPO)},
    )  # fmt: skip


@pytest.mark.parametrize("generator", ["auto", "builtin"])
def test_quick_bench_writes_checked_results_and_a_report_with_plots(generator: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = bench(str(MEMORY_KV), "--quick", "--out", str(out), "--load-generator", generator, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = results.read(out / "results.json")
    assert run.outcome == "ok" and run.failure is None
    assert [s.concurrency for s in run.steps] == [1, 16, 256]
    from prism.benchmark.h2load import h2load_path

    expected = "h2load" if generator == "auto" and h2load_path() else "builtin"
    for s in run.steps:
        assert s.load_generator == expected
        assert s.complete and s.calls > 0 and s.errors == {}
        assert s.latency.p50_us is not None and s.latency.p50_us <= s.latency.p99_us  # type: ignore[operator]
        assert s.cpu_us_per_call is not None and s.cpu_us_per_call["total"] > 0
        assert any(role.startswith("worker0:") for role in s.cpu_us_per_call)
        # The server's count over (about) the same window: the two windows are not aligned to the call.
        assert s.backend is not None
        assert abs(s.backend.server_calls_by_status["OK"] - s.calls) <= 0.25 * s.calls + 50
    assert run.saturation is not None
    assert run.saturation.calls_per_s == max(s.calls_per_s for s in run.steps)
    # What prism plan predicts: calls/s at the worker's whole CPU, from one step's CPU per call.
    per_worker = run.saturation.per_worker
    assert per_worker is not None and "per worker at 100% of its CPU:" in done.stdout
    cpu = run.steps[per_worker.step].cpu_us_per_call
    assert cpu is not None
    worker_us = sum(us for role, us in cpu.items() if role.startswith("worker"))
    assert per_worker.calls_per_cpu_s == round(1e6 / worker_us, 1)
    page = (out / "report.html").read_text()
    assert 'id="saturation"' in page and "http://" not in page and "https://" not in page
    if have_matplotlib():
        for name in ("throughput", "latency", "cpu"):
            marker = f'<img id="plot-{name}" alt="{name}" src="data:image/png;base64,'
            assert marker in page
            data = page.split(marker, 1)[1].split('"', 1)[0]
            png = base64.b64decode(data)
            assert png.startswith(b"\x89PNG") and png == (out / f"{name}.png").read_bytes()
    else:
        assert "pip install 'prism-gateway[report]'" in done.stderr
    assert not _listening(run.server.target), "the server the bench started is still serving"


def test_wrong_records_fail_the_run_with_exit_1(server: PrismServer, tmp_path: Path) -> None:
    seed_and_learn(
        "127.0.0.1", server.port, msgspec.structs.replace(spec("kv", get=1), records=1, value_bytes=50)
    )
    scenario = tmp_path / "s.toml"
    scenario.write_text(MEMORY_KV.read_text().replace('name = "bench"', 'name = "kv"'))
    out = tmp_path / "out"
    done = bench(
        str(scenario), "--quick", "--target", server.target, "--no-seed", "--out", str(out), cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr
    run = results.read(out / "results.json")
    assert run.outcome == "failed" and "GetItems of record 0" in (run.failure or "")
    assert "prism bench: failed:" in done.stderr


def test_ctrl_c_keeps_what_was_measured_and_stops_the_server(tmp_path: Path) -> None:
    scenario = tmp_path / "long.toml"
    text = (
        MEMORY_KV.read_text()
        .replace("duration_s = 10", "duration_s = 30")
        .replace("warmup_s = 2", "warmup_s = 0.5")
    )
    scenario.write_text(text)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism.cli", "bench", str(scenario), "--out", str(out),
         "--load-generator", "builtin"],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("step 1/"):
                break
        time.sleep(3.0)  # past the start delay and the warm-up: inside the measured window
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    run = results.read(out / "results.json")
    assert run.outcome == "interrupted"
    assert len(run.steps) == 1 and not run.steps[0].complete and run.steps[0].calls > 0
    assert run.steps[0].duration_s < 30
    assert not _listening(run.server.target), "Ctrl-C left the server running"


def _listening(target: str) -> bool:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False
