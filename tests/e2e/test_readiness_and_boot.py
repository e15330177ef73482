"""Readiness that is true, and a boot with a remote backend down, as an
operator sees them: ``prism serve`` processes, a grpcio client, /readyz.

- ``Check("")`` is SERVING once every namespace has a serving worker, and
  stays so while one tenant's worker restarts; /readyz says the same; a
  call for a tenant whose worker is (re)starting waits for it instead of
  failing.
- PostgreSQL unreachable at start: the gateway serves everything else, the
  namespace is NOT_SERVING, and serves by itself once PostgreSQL answers
  (here: once a relay to the real server starts listening on its port).
- A local fault at boot still halts with exit code 3 and one line.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prism.proto import kv_pb2_grpc
from tests.e2e.conftest import PrismTree, free_port, get, put, sqlite_ns, tenant_toml, wait_until
from tests.pg import DSN

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


# -- readiness ----------------------------------------------------------------------------------


def test_check_of_the_server_is_serving_once_every_tenant_has_a_serving_worker(prism_tree) -> None:
    body = tenant_toml("a", [sqlite_ns("profiles")]) + tenant_toml("b", [sqlite_ns("ledger")])
    tree: PrismTree = prism_tree(body, start=False, heartbeat_timeout_s=1.0)
    tree.spawn()
    channel = tree.channel("a.prism", warm=False)
    grpc.channel_ready_future(channel).result(timeout=20)

    # The first SERVING: calls for both tenants' namespaces, at once, are answered.
    wait_until(lambda: check(channel) == SERVING, 20, what='Check("") SERVING')
    assert tree.fetch("/readyz")[0] == 200
    # A connection made now is on tenant a's worker (one made before a's
    # worker served may have stayed on b's, and ends with it below).
    channel.close()
    channel = tree.channel("a.prism", warm=False)
    stub = kv_pb2_grpc.KeyValueStub(channel)
    with ThreadPoolExecutor(8) as pool:
        calls = [
            pool.submit(put, stub, ns, f"r{i}", b"k", b"v") for i in range(4) for ns in ("profiles", "ledger")
        ]
        for call in calls:
            call.result()  # raises on any non-OK status
    tree.remember_pids()

    # Tenant b's only worker stops answering: it is killed and restarted.
    # The gateway booted: it stays ready (tenant a serves on), while the
    # table says b has no serving worker.
    [b_pid] = tree.worker_pids()["b"]
    tree.stop_worker(b_pid)
    wait_until(
        lambda: not any(o["serving"] for o in tree.owners("ledger")),
        10,
        what="b's worker listed as not serving",
    )
    assert check(channel) == SERVING
    assert tree.fetch("/readyz")[0] == 200
    # Meanwhile a call for b's namespace waits for b's new worker.
    started = time.monotonic()
    assert get(stub, "ledger", "r0", timeout=15) == {b"k": b"v"}
    waited = time.monotonic() - started
    wait_until(lambda: check(channel) == SERVING, 15, what='Check("") SERVING again')
    assert tree.fetch("/readyz")[0] == 200
    print(f"call for the restarting tenant answered after {waited:.2f}s")
    assert tree.worker_pids()["b"] != {b_pid}
    assert tree.proc is not None and tree.proc.poll() is None


def test_ready_1_readyz_and_check_flip_together(prism_tree, tmp_path) -> None:
    """systemd's READY=1, /readyz and Check("") read one published table: none
    says ready before the others (give or take one supervisor turn)."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        body = tenant_toml("a", [sqlite_ns("profiles")]) + tenant_toml("b", [sqlite_ns("ledger")], workers=2)
        tree: PrismTree = prism_tree(body, start=False, env={"NOTIFY_SOCKET": str(path)})
        tree.spawn()
        channel = tree.channel(warm=False)
        ready_at = readyz_at = check_at = None
        deadline = time.monotonic() + 30
        while None in (ready_at, readyz_at, check_at) and time.monotonic() < deadline:
            try:
                if "READY=1" in sock.recv(4096).decode().splitlines() and ready_at is None:
                    ready_at = time.monotonic()
            except BlockingIOError:
                pass
            if readyz_at is None and tree.fetch("/readyz", timeout_s=0.5)[0] == 200:
                readyz_at = time.monotonic()
            try:
                if check_at is None and check(channel) == SERVING:
                    check_at = time.monotonic()
            except grpc.RpcError:
                # Not listening yet: a new channel, not grpcio's reconnect backoff.
                channel = tree.channel(warm=False)
            time.sleep(0.01)
        assert None not in (ready_at, readyz_at, check_at), (ready_at, readyz_at, check_at)
        first = min(ready_at, readyz_at, check_at)  # type: ignore[type-var]
        last = max(ready_at, readyz_at, check_at)  # type: ignore[type-var]
        # One poll round (three requests on a loaded machine) apart at most.
        assert last - first < 0.5, (ready_at, readyz_at, check_at)
    finally:
        sock.close()


# -- boot with PostgreSQL down --------------------------------------------------------------------


class Relay:
    """Listens on ``port`` once started and pipes each connection to the real
    PostgreSQL; until then nothing listens there (connection refused)."""

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        self.port = port
        self.upstream = upstream
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def start(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while chunk := a.recv(65536):
                b.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def pg_relay() -> Iterator[Relay]:
    info = psycopg.conninfo.conninfo_to_dict(DSN)
    relay = Relay(free_port(), (str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)))
    yield relay
    relay.stop()


@pytest.mark.services("postgres")
def test_boot_with_postgres_down_serves_the_rest_and_the_namespace_once_it_answers(
    prism_tree, pg_relay: Relay
) -> None:
    remote = f"pgdown_{uuid.uuid4().hex[:8]}"
    dbname = psycopg.conninfo.conninfo_to_dict(DSN).get("dbname") or "test"
    dsn = f"postgresql://127.0.0.1:{pg_relay.port}/{dbname}"
    pg = (
        f'{{ name = "{remote}", backend = "postgres", options = {{ dsn = "{dsn}", connect_timeout_s = 1 }} }}'
    )
    tree: PrismTree = prism_tree(tenant_toml("t", [sqlite_ns("local"), pg]), start=False)
    tree.spawn()
    tree.wait_ready(20)  # ready: every namespace has a serving worker
    channel = tree.channel()
    stub = kv_pb2_grpc.KeyValueStub(channel)

    assert check(channel) == SERVING
    assert check(channel, "local") == SERVING
    assert check(channel, remote) == NOT_SERVING
    put(stub, "local", "r", b"k", b"v")
    assert get(stub, "local", "r") == {b"k": b"v"}
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        get(stub, remote, "r")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "backend unreachable, retrying" in (failed.value.details() or "")
    assert time.monotonic() - started < 2.0  # at once, not after a wait
    pids = tree.worker_pids()

    pg_relay.start()
    wait_until(
        lambda: check(channel, remote) == SERVING, 30, step_s=0.1, what="namespace serving once PG answers"
    )
    put(stub, remote, "r", b"k", b"pg")
    assert get(stub, remote, "r") == {b"k": b"pg"}
    assert tree.worker_pids() == pids  # no restart
    assert tree.proc is not None and tree.proc.poll() is None
    assert tree.stop() == 0
    with psycopg.connect(DSN, autocommit=True) as conn:
        for table in conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (f"%{remote}%",)
        ).fetchall():
            conn.execute(f'DROP TABLE IF EXISTS "{table[0]}"'.encode())


def test_a_local_fault_halts_with_exit_3_even_beside_a_remote_backend_down(prism_tree) -> None:
    broken = sqlite_ns("broken", extra=', options = { path = "/proc/nope/x.sqlite3" }')
    url = f"redis://127.0.0.1:{free_port()}/0"
    down = f'{{ name = "down", backend = "redis", options = {{ url = "{url}", connect_timeout_s = 1 }} }}'
    tree: PrismTree = prism_tree(tenant_toml("t", [down, broken]), start=False)
    tree.spawn()
    assert tree.proc is not None
    try:
        code = tree.proc.wait(20)
    except subprocess.TimeoutExpired:
        code = None
    err = tree.stderr()
    assert code == 3, err[-2000:]
    lines = [line for line in err.splitlines() if "cannot boot" in line]
    assert len(lines) >= 1 and "/proc/nope" in lines[0], err[-2000:]
