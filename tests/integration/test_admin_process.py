"""The admin process as the supervisor runs it: inherited socket and memfd routing table, real HTTP."""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

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
                cache={"enabled": False},
            )
        },
        workers={
            1: WorkerEntry(1, "default", 111, "ipc:///tmp/w1.fwd", "/tmp/w1.sock", serving),
            2: WorkerEntry(2, "default", 222, "ipc:///tmp/w2.fwd", "/tmp/w2.sock", serving),
        },
    )


@dataclass
class Admin:
    proc: subprocess.Popen[bytes]
    writer: RoutingTableWriter
    base_url: str
    ssl_context: ssl.SSLContext | None = None

    def fetch(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base_url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5, context=self.ssl_context) as response:
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
            with urllib.request.urlopen(admin.base_url + "/healthz", timeout=0.5, context=admin.ssl_context):
                return
        except (urllib.error.URLError, TimeoutError):
            if time.monotonic() > deadline:
                raise TimeoutError("admin process did not answer /healthz") from None
            time.sleep(0.05)


StartAdmin = Callable[..., Admin]


@pytest.fixture
def start_admin(tmp_path: Path) -> Iterator[StartAdmin]:
    """Start admin processes as the supervisor would, with extra spec fields; stops every one."""
    started: list[tuple[subprocess.Popen[bytes], RoutingTableWriter, int, socket.socket]] = []

    def start(ssl_context: ssl.SSLContext | None = None, **spec_fields: object) -> Admin:
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
            **spec_fields,
        }
        spec_fd = os.memfd_create("prism-spec")
        os.write(spec_fd, json.dumps(spec).encode())
        env = {**os.environ, "PRISM_SPEC_FD": str(spec_fd), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prism.admin.main"],
                env=env,
                cwd=REPO_ROOT,
                pass_fds=(listener.fileno(), routes_fd, spec_fd),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        finally:
            os.close(spec_fd)
        started.append((proc, writer, routes_fd, listener))
        scheme = "https" if ssl_context is not None else "http"
        return Admin(proc, writer, f"{scheme}://127.0.0.1:{listener.getsockname()[1]}", ssl_context)

    try:
        yield start
    finally:
        for proc, writer, routes_fd, listener in started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
            writer.close()
            os.close(routes_fd)
            listener.close()


@pytest.fixture
def admin(start_admin: StartAdmin) -> Admin:
    return start_admin()


def test_serves_probes_and_namespaces_from_the_shared_table(admin: Admin) -> None:
    wait_until_live(admin)

    assert admin.fetch("/healthz") == (200, b"ok\n")
    assert admin.fetch("/readyz") == (503, b"0 of 2 workers serving\n")

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
    env = {k: v for k, v in os.environ.items() if k != "PRISM_SPEC_FD"}
    done = subprocess.run(
        [sys.executable, "-m", "prism.admin.main"], env=env, cwd=REPO_ROOT, capture_output=True, timeout=30
    )

    assert done.returncode == 3
    assert b"PRISM_SPEC_FD" in done.stderr


def test_v1_routes_need_the_token_from_the_file_over_tls(start_admin: StartAdmin, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "admin.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "admin.key"))
    (tmp_path / "admin.token").write_text("t0ken-from-the-file\n")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    admin = start_admin(
        ssl_context=client,
        token_file=str(tmp_path / "admin.token"),
        tls={"cert_file": str(tmp_path / "admin.pem"), "key_file": str(tmp_path / "admin.key")},
    )
    wait_until_live(admin)

    assert admin.fetch("/healthz") == (200, b"ok\n")
    assert admin.fetch("/metrics")[0] == 200
    assert admin.fetch("/v1/namespaces")[0] == 401
    assert admin.fetch("/v1/namespaces", {"Authorization": "Bearer wrong"})[0] == 401
    status, body = admin.fetch("/v1/namespaces", {"Authorization": "Bearer t0ken-from-the-file"})
    assert status == 200
    assert [ns["name"] for ns in json.loads(body)["namespaces"]] == ["default"]
    # Plain HTTP to the TLS port gets no answer from the app.
    plain = Admin(admin.proc, admin.writer, admin.base_url.replace("https", "http"))
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        plain.fetch("/healthz")


def test_an_unreadable_token_file_is_a_boot_failure(start_admin: StartAdmin, tmp_path: Path) -> None:
    admin = start_admin(token_file=str(tmp_path / "missing.token"))

    assert admin.proc.wait(timeout=30) == 3
    _, err = admin.proc.communicate()
    assert err.decode().strip().splitlines() == [
        f"prism: admin process cannot boot: admin_token_file: cannot read {tmp_path / 'missing.token'}: "
        "No such file or directory"
    ]
