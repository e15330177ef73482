"""The admin process as the supervisor runs it: inherited socket and memfd routing table, real HTTP."""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from prism.router.table import NamespaceEntry, Routes, RoutingTableWriter, WorkerEntry

REPO_ROOT = Path(__file__).resolve().parents[2]
ROUTES_BYTES = 64 * 1024


def table(generation: int, serving: bool) -> Routes:
    return Routes(
        generation=generation,
        namespaces={
            "default": NamespaceEntry(
                name="default",
                tenant="default",
                abstraction="keyvalue",
                backend="postgres",
                options={"dsn": "postgresql://prism:s3cret@localhost/prism"},
                cache={"enabled": False},
            )
        },
        workers={
            1: WorkerEntry(1, "default", 111, "ipc:///tmp/w1.fwd", "/tmp/w1.sock", True),
            2: WorkerEntry(2, "default", 222, "ipc:///tmp/w2.fwd", "/tmp/w2.sock", serving),
        },
    )


@dataclass
class Admin:
    proc: subprocess.Popen[bytes]
    writer: RoutingTableWriter
    base_url: str

    def fetch(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()


def wait_until_live(admin: Admin, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if admin.proc.poll() is not None:
            _, err = admin.proc.communicate()
            raise RuntimeError(f"admin process exited {admin.proc.returncode}: {err.decode()[-2000:]}")
        try:
            with urllib.request.urlopen(admin.base_url + "/healthz", timeout=0.5):
                return
        except (urllib.error.URLError, TimeoutError):
            if time.monotonic() > deadline:
                raise TimeoutError("admin process did not answer /healthz") from None
            time.sleep(0.05)


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    routes_fd = os.memfd_create("prism-routes")
    os.ftruncate(routes_fd, ROUTES_BYTES)
    writer = RoutingTableWriter(mmap.mmap(routes_fd, ROUTES_BYTES))
    writer.publish(table(1, serving=False))
    spec = {
        "listen_fd": listener.fileno(),
        "routes_fd": routes_fd,
        "routes_bytes": ROUTES_BYTES,
        "log_level": "info",
    }
    env = {**os.environ, "PRISM_ADMIN_SPEC": json.dumps(spec), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism.admin.main"],
        env=env,
        cwd=REPO_ROOT,
        pass_fds=(listener.fileno(), routes_fd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    port = listener.getsockname()[1]
    try:
        yield Admin(proc, writer, f"http://127.0.0.1:{port}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        writer.close()
        os.close(routes_fd)
        listener.close()


def test_serves_probes_and_namespaces_from_the_shared_table(admin: Admin) -> None:
    wait_until_live(admin)

    assert admin.fetch("/healthz") == (200, b"ok\n")
    assert admin.fetch("/readyz") == (503, b"1 of 2 workers serving\n")

    admin.writer.publish(table(2, serving=True))
    assert admin.fetch("/readyz") == (200, b"ready\n")

    status, body = admin.fetch("/v1/namespaces")
    assert status == 200
    page = json.loads(body)
    assert page["generation"] == 2
    assert [ns["name"] for ns in page["namespaces"]] == ["default"]
    assert page["namespaces"][0]["owners"] == [
        {"id": 1, "pid": 111, "serving": True},
        {"id": 2, "pid": 222, "serving": True},
    ]
    assert b"s3cret" not in body

    assert admin.fetch("/metrics")[0] == 200
    assert admin.fetch("/nope")[0] == 404


def test_sigterm_stops_it_cleanly(admin: Admin) -> None:
    wait_until_live(admin)

    admin.proc.send_signal(signal.SIGTERM)

    assert admin.proc.wait(timeout=5) == 0
    _, err = admin.proc.communicate()
    logs = [json.loads(line) for line in err.decode().splitlines()]
    assert any(entry["msg"] == "admin process stopping on SIGTERM" for entry in logs)
    # No access log: probes are not logged.
    assert not any("/healthz" in entry["msg"] for entry in logs)


def test_missing_spec_is_a_boot_failure() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PRISM_ADMIN_SPEC"}
    done = subprocess.run(
        [sys.executable, "-m", "prism.admin.main"], env=env, cwd=REPO_ROOT, capture_output=True, timeout=30
    )

    assert done.returncode == 3
    assert b"PRISM_ADMIN_SPEC" in done.stderr
