"""Real ``prism serve`` process trees for the end-to-end tier.

``prism_tree`` gives a test a factory: ``start(body)`` writes a config (the
test's tenants, plus a free admin port and short timeouts), runs
``prism serve`` on a free gRPC port with a fresh data dir, waits until
``/readyz`` says ready and every worker serves, and returns a ``PrismTree``. Every tree
started is stopped when the test ends, whatever happened (stopped workers are
continued first, stragglers are SIGKILLed), and its stderr is kept in a file
the test can read.

Clients are grpcio stubs in threads, as users' programs are. Each channel gets
its own subchannel pool, so that N channels are N TCP connections (grpcio
would otherwise share one connection between channels with equal arguments).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from prism.proto import kv_pb2, kv_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]

HEADER = """
admin_listen = "127.0.0.1:{admin_port}"
graceful_timeout_s = {graceful}
heartbeat_timeout_s = {heartbeat}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tenant_toml(name: str, namespaces: list[str], *, workers: int = 1, cpus: list[int] | None = None) -> str:
    """One ``[[tenants]]`` table; ``namespaces`` are inline-table TOML strings."""
    lines = ["[[tenants]]", f'name = "{name}"', f"workers = {workers}"]
    if cpus is not None:
        lines.append(f"cpus = {cpus!r}")
    lines.append(f"namespaces = [{', '.join(namespaces)}]")
    return "\n".join(lines) + "\n"


def sqlite_ns(name: str, *, cache: bool = False, extra: str = "") -> str:
    cache_part = ", cache = { enabled = true, ttl_s = 30 }" if cache else ""
    return f'{{ name = "{name}", backend = "sqlite"{cache_part}{extra} }}'


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _is_prism_child(pid: int) -> bool:
    """Whether ``pid`` is (still) a prism worker or admin process, not a reused pid."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(m in cmdline for m in (b"prism.workers.worker", b"prism.workers.zygote", b"prism.admin.main"))


def cpus_allowed(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for pid {pid}")


def last_cpu(pid: int) -> int:
    """``/proc/PID/stat`` field 39: the CPU the process last ran on."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[39 - 3])  # ``rest`` starts at field 3 (state)


def parse_cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m["name"] != name:
            continue
        have = dict(_LABEL.findall(m["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m["value"])
    return total


@dataclass
class PrismTree:
    """One ``prism serve`` supervisor and everything it started."""

    root: Path
    body: str
    graceful_timeout_s: float = 5.0
    heartbeat_timeout_s: float = 1.0
    env: dict[str, str | None] = field(default_factory=dict)  # None: removed from the environment
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    known_pids: set[int] = field(default_factory=set)
    stopped_pids: set[int] = field(default_factory=set)
    _channels: list[grpc.Channel] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.root / "data"
        self.config_path = self.root / "prism.toml"
        self.stderr_path = self.root / "stderr.log"
        self.write_config(self.body)

    # -- process ---------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def config_text(self, body: str) -> str:
        header = HEADER.format(
            admin_port=self.admin_port, graceful=self.graceful_timeout_s, heartbeat=self.heartbeat_timeout_s
        )
        return header + body

    def write_config(self, body: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.config_text(body))
        tmp.replace(self.config_path)  # atomic: a reload never reads half a file

    def spawn(self) -> None:
        self._stderr = open(self.stderr_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prism.cli",
                "serve",
                "--listen",
                self.endpoint,
                "--data-dir",
                str(self.data_dir),
                "--config",
                str(self.config_path),
            ],
            cwd=REPO_ROOT,
            env={k: v for k, v in {**os.environ, **self.env}.items() if v is not None},
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def start(self, timeout_s: float = 20.0) -> PrismTree:
        self.spawn()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"prism serve exited {self.proc.returncode}: {self.stderr()[-3000:]}")
            status, _ = self.fetch("/readyz", timeout_s=0.5)
            # Ready is "every namespace has a serving worker"; tests also want
            # every worker up (pids, pinning, kills), so wait for that too.
            if status == 200 and self._all_owners_serving():
                self.remember_pids()
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"prism serve not ready in {timeout_s}s: {self.stderr()[-3000:]}")
            time.sleep(0.05)

    def _all_owners_serving(self) -> bool:
        status, body = self.fetch("/v1/namespaces", timeout_s=0.5)
        if status != 200:
            return status == 401  # behind an admin token: /readyz alone
        return all(o["serving"] for ns in json.loads(body)["namespaces"] for o in ns["owners"])

    def remember_pids(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.known_pids.update(children_of(self.proc.pid))

    def tree_pids(self) -> list[int]:
        """The supervisor's live children (workers and the admin process)."""
        assert self.proc is not None
        return children_of(self.proc.pid)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.remember_pids()
        self.proc.send_signal(sig)

    def stop_worker(self, pid: int) -> None:
        """SIGSTOP a worker; ``stop()`` continues it if it is still there."""
        self.stopped_pids.add(pid)
        os.kill(pid, signal.SIGSTOP)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        for pid in self.stopped_pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.remember_pids()
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        for pid in self.known_pids:
            if pid_alive(pid) and _is_prism_child(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None
        return code

    # -- admin -----------------------------------------------------------

    def fetch(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def namespaces(self) -> dict[str, Any]:
        status, body = self.fetch("/v1/namespaces")
        assert status == 200, (status, body)
        return {ns["name"]: ns for ns in json.loads(body)["namespaces"]}

    def owners(self, namespace: str) -> list[dict[str, Any]]:
        return list(self.namespaces()[namespace]["owners"])

    def worker_pids(self) -> dict[str, set[int]]:
        """tenant -> pids of its workers, from /v1/namespaces."""
        out: dict[str, set[int]] = {}
        for ns in self.namespaces().values():
            out.setdefault(ns["tenant"], set()).update(o["pid"] for o in ns["owners"])
        self.known_pids.update(pid for pids in out.values() for pid in pids)
        return out

    def metrics(self) -> str:
        status, body = self.fetch("/metrics")
        assert status == 200, (status, body)
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

    # -- clients ---------------------------------------------------------

    def channel(self, authority: str | None = None, *, warm: bool = True) -> grpc.Channel:
        """A channel on its own TCP connection; ``authority`` like ``"a.prism"``."""
        options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
        if authority is not None:
            options.append(("grpc.default_authority", authority))
        channel = grpc.insecure_channel(self.endpoint, options=options)
        self._channels.append(channel)
        if warm:
            grpc.channel_ready_future(channel).result(timeout=10)
        return channel

    def kv(self, authority: str | None = None) -> kv_pb2_grpc.KeyValueStub:
        return kv_pb2_grpc.KeyValueStub(self.channel(authority))


@pytest.fixture
def prism_tree(tmp_path: Path) -> Iterator[Callable[..., PrismTree]]:
    """``prism_tree(body, **fields)`` starts a tree (``start=False``: only builds it)."""
    trees: list[PrismTree] = []

    def make(body: str, *, start: bool = True, name: str = "", **kwargs: Any) -> PrismTree:
        tree = PrismTree(tmp_path / (name or f"tree{len(trees)}"), body, **kwargs)
        trees.append(tree)
        if start:
            tree.start()
        return tree

    try:
        yield make
    finally:
        for tree in trees:
            tree.stop()


# -- helpers for load --------------------------------------------------------


def put(
    stub: kv_pb2_grpc.KeyValueStub, namespace: str, id: str, key: bytes, value: bytes, timeout: float = 10
) -> None:
    stub.PutItems(
        kv_pb2.PutItemsRequest(namespace=namespace, id=id, items=[kv_pb2.Item(key=key, value=value)]),
        timeout=timeout,
    )


def get(stub: kv_pb2_grpc.KeyValueStub, namespace: str, id: str, timeout: float = 10) -> dict[bytes, bytes]:
    response = stub.GetItems(kv_pb2.GetItemsRequest(namespace=namespace, id=id), timeout=timeout)
    return {item.key: item.value for item in response.items}


class Load:
    """Threads calling ``work(thread_index, n)`` in a loop until stopped.

    Every call's outcome is recorded: OK, or the grpc status code with its
    details. A call that raises something other than ``grpc.RpcError`` is a
    test bug and is recorded as such.
    """

    def __init__(self, threads: int, work: Callable[[int, int], None]) -> None:
        self._work = work
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.ok = 0
        self.errors: list[tuple[float, str, str]] = []
        self.statuses: dict[str, int] = {}
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _record(self, status: str, details: str = "") -> None:
        with self._lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == "OK":
                self.ok += 1
            else:
                self.errors.append((time.monotonic(), status, details))

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                self._work(index, n)
            except grpc.RpcError as exc:
                self._record(exc.code().name, exc.details() or "")
            except Exception as exc:
                self._record("TEST-BUG", repr(exc))
            else:
                self._record("OK")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not hung, f"load threads still running after {timeout_s}s: {hung}"

    def wait_for_calls(self, n: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ok + len(self.errors) < n:
            assert time.monotonic() < deadline, f"load made only {self.ok} calls in {timeout_s}s"
            time.sleep(0.01)


def wait_until(predicate: Callable[[], Any], timeout_s: float, step_s: float = 0.02, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(step_s)


def neighbour(tree: PrismTree, threads: int = 1) -> Load:
    """A well-behaved client beside an abusive one: ``threads`` loops of
    GetItems on the tree's default namespace, each call's latency in
    ``load.latencies`` (see ``p99``)."""
    stub = tree.kv()
    put(stub, "default", "n", b"k", b"v")
    latencies: list[float] = []

    def work(index: int, n: int) -> None:
        t0 = time.perf_counter()
        get(stub, "default", "n", timeout=5)
        latencies.append(time.perf_counter() - t0)

    load = Load(threads, work)
    load.latencies = latencies  # type: ignore[attr-defined]
    return load


def p99(load: Load) -> float:
    """The 99th percentile of a ``neighbour``'s call latencies, seconds."""
    latencies = sorted(load.latencies)  # type: ignore[attr-defined]
    return latencies[int(len(latencies) * 0.99)]
