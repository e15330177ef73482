"""What a run was measured on: the machine, the software, and the backends' server versions.

Backend versions are asked of the servers a scenario's namespaces name,
each with a short timeout, and are null when a server does not answer: a
missing version never stops a benchmark.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prism.benchmark.h2load import h2load_path
from prism.benchmark.results import Machine
from prism.config.namespaces import NamespaceConfig

TIMEOUT_S = 2.0
PACKAGES = ("grpcio", "protobuf", "h2", "hpack", "trio", "msgspec", "psycopg", "hiredis", "matplotlib")


def machine(namespaces: tuple[NamespaceConfig, ...]) -> Machine:
    from google.protobuf.internal import api_implementation

    h2load = h2load_path()
    return Machine(
        cpu_model=cpu_model(),
        cpus=os.cpu_count(),
        kernel=platform.release(),
        python=platform.python_version(),
        prism_version=_version("prism-gateway"),
        protobuf_backend=api_implementation.Type(),
        versions={name: _version(name) for name in PACKAGES},
        h2load=_h2load_version(h2load) if h2load else None,
        backend_versions=backend_versions(namespaces),
    )


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _h2load_version(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def backend_versions(namespaces: tuple[NamespaceConfig, ...]) -> dict[str, str | None]:
    """The server version of each backend used: ``{"postgres": "16.4", "redis": "7.2.4"}``."""
    found: dict[str, str | None] = {}
    for ns in namespaces:
        options: dict[str, Any] = ns.options
        if ns.backend == "postgres":
            found["postgres"] = _postgres(str(options.get("dsn", "postgresql://127.0.0.1/test")))
        elif ns.backend == "redis":
            found["redis"] = _redis(str(options.get("url", "redis://127.0.0.1:6379/0")))
        elif ns.backend == "nats":
            found["nats"] = _nats(str(options.get("url", "nats://127.0.0.1:4222")))
        elif ns.backend == "sqlite":
            import sqlite3

            found["sqlite"] = sqlite3.sqlite_version
        elif ns.backend == "memory":
            found["memory"] = None  # in the worker: no server of its own
        if ns.cache.tier == "redis":
            found["redis"] = _redis(ns.cache.url)
    return found


def _postgres(dsn: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=int(TIMEOUT_S)) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else None
    except Exception:
        return None


def _redis(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme != "redis":
        return None  # TLS or unknown: not worth a TLS client for a version string
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), TIMEOUT_S) as sock:
            if parts.password:
                user = parts.username or "default"
                sock.sendall(_resp("AUTH", user, parts.password))
                sock.recv(1024)
            sock.sendall(_resp("INFO", "server"))
            data = b""
            while b"redis_version:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    return None


def _resp(*words: str) -> bytes:
    out = f"*{len(words)}\r\n"
    for word in words:
        out += f"${len(word.encode())}\r\n{word}\r\n"
    return out.encode()


def _nats(url: str) -> str | None:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), TIMEOUT_S) as sock:
            line = sock.recv(4096).decode(errors="replace")
    except OSError:
        return None
    if not line.startswith("INFO "):
        return None
    try:
        version = json.loads(line[5:].strip()).get("version")
    except ValueError:
        return None
    return str(version) if version else None
