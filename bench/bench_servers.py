"""Start, pin, probe, meter and stop the servers under test.

Each server runs in its own process group, pinned to one CPU, so that its CPU
time can be read from ``/proc`` without counting the load generator, and so
that stopping it also stops anything it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from prism.proto import kv_pb2, kv_pb2_grpc

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT_S = 5.0


class ServerFailed(RuntimeError):
    """The server exited, never answered, or answered wrongly."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """``argv`` prefixed with ``taskset`` so every thread starts on ``cpu``.

    Pinning the command before it runs, rather than calling
    ``sched_setaffinity`` on a pid afterwards, also covers threads and child
    processes the server starts, since they inherit the affinity.
    """
    if cpu is None:
        return list(argv)
    taskset = shutil.which("taskset")
    if taskset is None:
        return list(argv)  # ServerProcess.pin_tree() pins the live threads instead
    return [taskset, "-c", str(cpu), *argv]


@dataclass
class ServerProcess:
    """One server under test, running as a subprocess."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    cpu: int | None
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
        """Start the server in a new session, its output going to a log file."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                pinned(self.argv, self.cpu),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pin_tree()

    def pin_tree(self) -> None:
        """Pin every thread of the server's process tree to ``self.cpu``.

        Redundant when ``taskset`` pinned the command; needed without it.
        """
        if self.cpu is None:
            return
        for pid in process_tree(self.pid):
            for tid in _tasks(pid):
                try:
                    os.sched_setaffinity(tid, {self.cpu})
                except OSError:
                    pass  # the thread ended meanwhile

    def affinities(self) -> set[frozenset[int]]:
        """The distinct CPU sets of all threads in the tree, to verify pinning."""
        found: set[frozenset[int]] = set()
        for pid in process_tree(self.pid):
            for tid in _tasks(pid):
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
        with grpc.insecure_channel(self.target) as channel:
            stub = kv_pb2_grpc.KeyValueStub(channel)
            while True:
                self._check_alive()
                try:
                    stub.GetItems(kv_pb2.GetItemsRequest(namespace="bench", id="ready"), timeout=1.0)
                    return
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        return  # an error status is still an answer
                if time.monotonic() > deadline:
                    raise ServerFailed(
                        f"{self.name}: no gRPC answer within {timeout_s:.0f}s\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerFailed(f"{self.name}: exited with {self.proc.returncode}\n{self.log_tail()}")

    def cpu_ticks(self) -> int:
        """User + system clock ticks of the server and all its descendants."""
        self._check_alive()
        root = self.pid
        total = 0
        for pid in process_tree(root):
            fields = _stat_fields(pid)
            if fields is None:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
            if pid == root:
                total += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
        return total

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def log_tail(self, max_lines: int = 30) -> str:
        """The end of the server's output, for error reports."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-max_lines:])


def _signal_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (from state on).

    The command name is in parentheses and may contain spaces, so split
    after the last ``)``. Index 0 is the state, 1 the ppid, 11/12
    utime/stime, 13/14 cutime/cstime.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _tasks(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant, found through the ppid in ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def ticks_to_us(ticks: int) -> float:
    """Clock ticks to microseconds."""
    return ticks * 1_000_000 / CLK_TCK


def cpu_counters(cpu: int) -> tuple[int, int]:
    """(busy, steal) clock ticks of one CPU since boot, from ``/proc/stat``.

    Busy minus the server's own ticks over a phase is what else ran on the
    server's CPU (other processes, interrupts): the way to tell a clean run
    from one on a shared, busy machine.
    """
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return user + nice + system + irq + softirq, steal
    raise ServerFailed(f"cpu{cpu} not in /proc/stat")
