"""The README's demo: `prism serve` and `prism kv ...` as a user types them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import PrismProcess, free_port


def prism(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prism.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=cwd,
    )


def test_readme_demo(prism_server: PrismProcess) -> None:
    ep = ["--endpoint", prism_server.endpoint]
    r = prism("kv", "put", "default", "user:1", "name", "Alice", *ep)
    assert r.returncode == 0, r.stderr
    r = prism("kv", "get", "default", "user:1", *ep)
    assert r.returncode == 0 and r.stdout == "name = Alice\n"
    r = prism("kv", "scan", "default", *ep)
    assert r.returncode == 0 and r.stdout == "user:1: name = Alice\n"
    r = prism("kv", "get", "default", "user:1", "--json", *ep)
    doc = json.loads(r.stdout)
    assert doc["items"][0]["key"] == "name" and doc["items"][0]["value"] == "Alice"
    r = prism("kv", "delete", "default", "user:1", *ep)
    assert r.returncode == 0
    assert prism("kv", "get", "default", "user:1", *ep).stdout == ""


def test_cli_errors_are_one_line(prism_server: PrismProcess) -> None:
    r = prism("kv", "get", "nope", "x", "--endpoint", prism_server.endpoint)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr
    r = prism("kv", "get", "default", "x", "--endpoint", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert r.returncode == 1 and r.stderr.startswith("prism: cannot reach") and r.stderr.count("\n") == 1


def test_unknown_backend_stops_startup_with_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "prism.toml"
    cfg.write_text('[[namespaces]]\nname = "x"\nbackend = "cassandra"\n')
    r = prism(
        "serve", "--config", str(cfg), "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path)
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "cassandra" in r.stderr, r.stderr


def test_serve_on_embedded_defaults_then_sigterm(tmp_path: Path) -> None:
    """No config file, no flags but the port: namespace default on SQLite in ./.prism."""
    port = free_port()
    env = {
        **os.environ,
        "PRISM_LISTEN": f"127.0.0.1:{port}",
        "PRISM_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism.cli", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 15
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service="default"), timeout=0.5).status
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.SERVING
        r = prism("kv", "put", "default", "k", "a", "b", "--endpoint", f"127.0.0.1:{port}")
        assert r.returncode == 0
        assert (tmp_path / ".prism" / "default.sqlite3").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _serve_briefly(tmp_path: Path, listen_host: str, config: str = "") -> str:
    """Start prism serve listening on ``listen_host``, wait for its first answer, stop it: its stderr."""
    port = free_port()
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "prism.toml").write_text(config)
    env = {
        **os.environ,
        "PRISM_LISTEN": f"{listen_host}:{port}",
        "PRISM_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "PRISM_WORKERS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism.cli", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 15
            while True:
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    return err


OPEN_WARNING = "is open to any caller that reaches it"


def test_an_open_server_on_a_non_loopback_address_warns_once(tmp_path: Path) -> None:
    err = _serve_briefly(tmp_path, "0.0.0.0")
    assert err.count(OPEN_WARNING) == 1, err


def test_no_warning_on_loopback_or_with_access_control(tmp_path: Path) -> None:
    assert OPEN_WARNING not in _serve_briefly(tmp_path / "a", "127.0.0.1")
    jwks = tmp_path / "b" / "jwks.json"
    jwks.parent.mkdir()
    jwks.write_text('{"keys": []}')
    secured = f'[auth]\njwt = {{ jwks_file = "{jwks}", issuer = "i", audience = "a" }}\n'
    assert OPEN_WARNING not in _serve_briefly(tmp_path / "b", "0.0.0.0", secured)


def test_prism_reload_applies_a_new_namespace(prism_server: PrismProcess) -> None:
    cfg = prism_server.data_dir.parent / f"{prism_server.data_dir.name}.toml"
    cfg.write_text(prism_server.config + '\n[[namespaces]]\nname = "added"\nbackend = "sqlite"\n')
    r = prism("reload", "--data-dir", str(prism_server.data_dir), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    ep = ["--endpoint", prism_server.endpoint]
    deadline = time.monotonic() + 5
    while prism("kv", "put", "added", "r", "k", "v", *ep).returncode != 0:
        assert time.monotonic() < deadline, "the reloaded namespace never answered"
        time.sleep(0.1)
    assert prism("kv", "get", "added", "r", *ep).stdout == "k = v\n"


def test_prism_reload_without_a_server(tmp_path: Path) -> None:
    r = prism("reload", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("prism: no running server") and r.stderr.count("\n") == 1
