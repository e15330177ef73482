"""Start, pin, probe, meter and stop the servers under test.

Each server runs in its own process group (session), pinned to its CPUs
before it executes, so that every thread and child process it starts
inherits the pinning, its CPU time can be read from ``/proc`` without
counting the load generator, and stopping it also stops everything it started.

``prism serve`` is a process tree: a supervisor, one admin process (HTTP on
``admin_listen``) and worker processes (which pin themselves to CPUs). CPU
time is therefore always summed over the whole tree, found through the ppid in
``/proc/*/stat``; :func:`cpu_ticks_by_process` also breaks it down by role.

Moved from ``bench/bench_servers.py`` (which re-exports it): ``prism bench``
and the scripts under ``bench/`` start and meter servers with one copy.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from prism.benchmark.grpc_client import GET_ITEMS, GrpcAccess, open_channel
from prism.benchmark.metrics_text import Sample, metric_sum, parse_metrics
from prism.benchmark.procstat import (
    ServerFailed,
    process_role,
    process_tree,
    signal_group,
    stat_fields,
    tasks,
)
from prism.proto import kv_pb2

STOP_TIMEOUT_S = 5.0
LOG_ISSUE_WORDS = ("error", "warning", "traceback", "exception", "critical")


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """One server under test, running as a subprocess.

    ``cpus`` (empty: unpinned) is applied with ``sched_setaffinity`` in the
    child before it executes the server, so every thread and process the
    server starts inherits it (Prism workers then narrow it further).
    ``probe_namespace`` is the namespace the readiness probe asks for.
    """

    name: str
    argv: list[str]
    port: int
    log_path: Path
    cpus: tuple[int, ...] = ()
    probe_namespace: str = "bench"
    # How a grpcio client reaches it: None is plaintext; else TLS credentials
    # (and the metadata every call carries, a token say).
    access: GrpcAccess | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def target(self) -> str:
        """The gRPC target for grpcio clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's pid; only valid once started."""
        if self.proc is None:
            raise ServerFailed(f"{self.name}: not started")
        return self.proc.pid

    def start(self) -> None:
        """Start the server in a new session, pinned, its output going to a log file."""
        cpus = set(self.cpus)

        def pin() -> None:  # runs in the child, between fork and exec
            if cpus:
                os.sched_setaffinity(0, cpus)

        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pin,  # the benchmark runs no threads, so this is safe
            )

    def affinities(self) -> set[frozenset[int]]:
        """The distinct CPU sets of all threads in the tree, to verify pinning."""
        found: set[frozenset[int]] = set()
        for pid in process_tree(self.pid):
            for tid in tasks(pid):
                try:
                    found.add(frozenset(os.sched_getaffinity(tid)))
                except OSError:
                    pass
        return found

    def wait_ready(self, timeout_s: float) -> None:
        """Block until a GetItems call is answered, or raise ServerFailed.

        Any answer proves the server speaks gRPC on the port; whether it is
        the right answer is checked separately.
        """
        deadline = time.monotonic() + timeout_s
        request = kv_pb2.GetItemsRequest(namespace=self.probe_namespace, id="ready").SerializeToString()
        with open_channel(self.target, None, self.access) as channel:
            call = channel.unary_unary(GET_ITEMS)
            metadata = self.access.metadata if self.access else ()
            while True:
                self.check_alive()
                try:
                    call(request, timeout=1.0, metadata=metadata)
                    return
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        return  # an error status is still an answer
                if time.monotonic() > deadline:
                    raise ServerFailed(
                        f"{self.name}: no gRPC answer within {timeout_s:.0f}s\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def check_alive(self) -> None:
        """Raise ServerFailed if the server process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerFailed(f"{self.name}: exited with {self.proc.returncode}\n{self.log_tail()}")

    def cpu_ticks(self) -> int:
        """User + system clock ticks of the server and all its descendants."""
        return sum(self.cpu_ticks_by_process().values())

    def cpu_ticks_by_process(self) -> dict[str, int]:
        """User + system clock ticks of each process of the tree, keyed by a role label.

        The root also counts its reaped children (cutime/cstime): a worker that
        exited during a phase still has its time counted.
        """
        self.check_alive()
        root = self.pid
        ticks: dict[str, int] = {}
        for pid in process_tree(root):
            fields = stat_fields(pid)
            if fields is None:
                continue
            total = int(fields[11]) + int(fields[12])  # utime, stime
            if pid == root:
                total += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
            label = process_role(pid, root)
            ticks[label] = ticks.get(label, 0) + total
        return ticks

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers, then SIGKILL any straggler."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        # Children the root left behind (they are still in its process group).
        signal_group(self.proc.pid, signal.SIGKILL)

    def log_tail(self, max_lines: int = 30) -> str:
        """The end of the server's output, for error reports."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-max_lines:])

    def log_issues(self, limit: int = 20) -> list[str]:
        """Server output lines that look like errors or warnings (first ``limit``)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if any(w in line.lower() for w in LOG_ISSUE_WORDS)][:limit]


# ---------------------------------------------------------------- Prism


def prism_command() -> list[str]:
    """The ``prism`` of this interpreter's environment, else PATH's, else ``-m``."""
    beside = Path(sys.executable).parent / "prism"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("prism")
    return [found] if found else [sys.executable, "-m", "prism.cli"]


@dataclass
class PrismServer(ServerProcess):
    """``prism serve``: a supervisor, its admin process and its workers.

    ``admin_port`` is the admin HTTP port (``/readyz``, ``/metrics``).
    """

    admin_port: int = 0

    @property
    def admin_url(self) -> str:
        """Base URL of the admin HTTP server."""
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout_s: float) -> None:
        """Block until ``/readyz`` says every worker serves, then until gRPC answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.admin_url}/readyz", timeout=1.0) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 (not every worker serves yet)
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.name}: /readyz not 200 within {timeout_s:.0f}s\n{self.log_tail()}")
            time.sleep(0.1)
        super().wait_ready(max(1.0, deadline - time.monotonic()))

    def metrics(self) -> list[Sample]:
        """The samples of ``/metrics`` (all workers merged by the admin process)."""
        try:
            with urllib.request.urlopen(f"{self.admin_url}/metrics", timeout=10) as answer:
                text = answer.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            raise ServerFailed(f"{self.name}: cannot read {self.admin_url}/metrics: {exc}") from exc
        return parse_metrics(text)

    def settled_metrics(self, timeout_s: float = 5.0, interval_s: float = 0.1) -> list[Sample]:
        """``metrics()`` once the call counter stopped moving (or after ``timeout_s``).

        A timed load run (the warm-up) ends with calls still in flight, which
        the server finishes after the load generator has gone; and a call is
        counted just after its answer is sent. Reading the counters before
        that tail has settled would credit its calls (and CPU) to the next run.
        """
        deadline = time.monotonic() + timeout_s
        samples = self.metrics()
        while True:
            time.sleep(interval_s)
            again = self.metrics()
            if metric_sum(again, "prism_requests_total") == metric_sum(samples, "prism_requests_total"):
                return again
            if time.monotonic() > deadline:
                return again
            samples = again


def make_prism(
    name: str,
    workdir: Path,
    config_body: str,
    cpus: Sequence[int],
    probe_namespace: str,
    access: GrpcAccess | None = None,
) -> PrismServer:
    """A not-yet-started ``prism serve`` with free gRPC and admin ports and its own data dir.

    ``config_body`` is the TOML of the namespaces/tenants/workers; the admin
    port and a short drain (so stopping takes ~1 s, not 10) are prepended.
    """
    port, admin_port = free_port(), free_port()
    while admin_port == port:
        admin_port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(f'admin_listen = "127.0.0.1:{admin_port}"\ngraceful_timeout_s = 1.0\n{config_body}')
    argv = [*prism_command(), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(workdir / "data")]
    argv += ["--config", str(config)]
    return PrismServer(
        name, argv, port, workdir / f"{name}.log", tuple(cpus), probe_namespace, access, admin_port=admin_port
    )
