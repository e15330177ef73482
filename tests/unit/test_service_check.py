"""A run whose tests need a service that is down stops at once with one line
naming it and how to start it (tests/conftest.py), instead of failing every
test that needs it with connection errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_missing_service_stops_the_run_with_one_line() -> None:
    done = _pytest(
        "tests/integration/test_postgres_grpc.py",
        PRISM_TEST_PG_DSN="postgresql://127.0.0.1:1/test",  # nothing listens on port 1
    )
    assert done.returncode == 4
    lines = [line for line in done.stdout.splitlines() if "PostgreSQL" in line]
    assert len(lines) == 1
    assert "does not answer on 127.0.0.1:1" in lines[0]
    assert "scripts/services.sh" in lines[0]
    assert "passed" not in done.stdout and "failed" not in done.stdout  # no test ran


def test_tests_that_need_no_service_run_without_them() -> None:
    done = _pytest(
        "tests/unit/test_pins.py",
        PRISM_TEST_NATS_URL="nats://127.0.0.1:1",
        PRISM_TEST_PG_DSN="postgresql://127.0.0.1:1/test",
        PRISM_TEST_REDIS_URL="redis://127.0.0.1:1/0",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
