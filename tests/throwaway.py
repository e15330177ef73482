"""Throwaway servers a test starts and always stops: Redis and NATS over TLS,
a PostgreSQL cluster with ``ssl = on``, all with certificates made by trustme.

Each is a context manager: the server runs inside the ``with`` and is
stopped (and its files removed) when it ends, whatever the test did. Start
them from synchronous fixtures, never from inside a running trio loop.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Certs:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost, as PEM files."""

    ca: trustme.CA
    ca_file: str
    cert_file: str  # the certificate, then its chain
    key_file: str

    @classmethod
    def make(cls, directory: Path, *names: str) -> Certs:
        ca = trustme.CA()
        cert = ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
        directory.mkdir(parents=True, exist_ok=True)
        ca.cert_pem.write_to_path(str(directory / "ca.pem"))
        cert.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(directory / "server.pem"), append=True)
        cert.private_key_pem.write_to_path(str(directory / "server.key"))
        return cls(
            ca, str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "server.key")
        )


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    return path


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise RuntimeError(f"{what} exited {proc.returncode}: {err.decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not listen on {port}") from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.communicate()


@contextmanager
def redis_tls(certs: Certs, *, password: str = "") -> Iterator[int]:
    """A redis-server serving TLS only (no plaintext port) on the port it yields."""
    port = free_port()
    args = [
        _need("redis-server"),
        "--port", "0",
        "--tls-port", str(port),
        "--bind", "127.0.0.1",
        "--tls-cert-file", certs.cert_file,
        "--tls-key-file", certs.key_file,
        "--tls-ca-cert-file", certs.ca_file,
        "--tls-auth-clients", "no",
        "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip
    if password:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_port(proc, port, "redis-server")
        yield port
    finally:
        _stop(proc)


@contextmanager
def nats_tls(certs: Certs, store_dir: Path) -> Iterator[int]:
    """A nats-server with JetStream that requires TLS, on the port it yields."""
    port = free_port()
    args = [
        _need("nats-server"),
        "-a", "127.0.0.1",
        "-p", str(port),
        "-js", "-sd", str(store_dir),
        "--tls", "--tlscert", certs.cert_file, "--tlskey", certs.key_file,
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_port(proc, port, "nats-server")
        yield port
    finally:
        _stop(proc)


@contextmanager
def postgres_ssl() -> Iterator[tuple[int, Certs]]:
    """A PostgreSQL cluster of its own with ``ssl = on`` (trust authentication),
    run as the ``postgres`` user; yields its port and the certificates."""
    initdb = PG_BIN / "initdb"
    if not initdb.exists():
        pytest.skip(f"{initdb} is not installed")
    try:
        postgres = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user to run a cluster as")
    if os.getuid() != 0:
        pytest.skip("starting a cluster as the postgres user needs root")
    # Not under pytest's tmp_path: the postgres user must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="prism-pgssl-"))
    port = free_port()
    try:
        certs = Certs.make(root / "certs")
        for path in (root, root / "certs", *(root / "certs").iterdir()):
            os.chown(path, postgres.pw_uid, postgres.pw_gid)
        os.chmod(certs.key_file, 0o600)  # the server refuses a key others can read
        data = root / "data"
        options = (
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c ssl=on "
            f"-c ssl_cert_file={certs.cert_file} -c ssl_key_file={certs.key_file} -c fsync=off"
        )
        _as_postgres(f"{initdb} -D {data} --auth=trust -U postgres")
        _as_postgres(f"{PG_BIN / 'pg_ctl'} -D {data} -o '{options}' -l {root / 'log'} -w -t 30 start")
        try:
            yield port, certs
        finally:
            _as_postgres(f"{PG_BIN / 'pg_ctl'} -D {data} -m immediate -w stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _as_postgres(command: str) -> None:
    subprocess.run(["su", "postgres", "-c", command], check=True, capture_output=True, timeout=60)


@contextmanager
def redis_plain(directory: Path, *settings: str) -> Iterator[int]:
    """A throwaway redis-server on 127.0.0.1 (working in ``directory``, with
    extra ``settings`` such as ``"--appendonly", "yes"``) on the port it yields."""
    port = free_port()
    args = [_need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    proc = subprocess.Popen([*args, *settings], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_port(proc, port, "redis-server")
        yield port
    finally:
        _stop(proc)
