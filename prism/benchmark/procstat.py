"""What ``/proc`` says about a server under test: its process tree, each
process's role and CPU time, and what else ran on its CPUs.

Moved from ``bench/bench_servers.py`` (which re-exports it) so that
``prism bench`` and the scripts under ``bench/`` measure with one copy.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServerFailed(RuntimeError):
    """The server exited, never answered, or answered wrongly."""


def cpu_list(cpus: Iterable[int]) -> str:
    """``0,1``: the form taskset and the JSON use."""
    return ",".join(str(cpu) for cpu in sorted(cpus))


def signal_group(pid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def stat_fields(pid: int) -> list[str] | None:
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


def tasks(pid: int) -> list[int]:
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
        fields = stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


_WORKER_LABEL = "PRISM_WORKER="


def process_role(pid: int, root: int) -> str:
    """A stable label for one process of a server tree.

    ``root`` (the supervisor, or a single-process server), ``admin``,
    ``template`` (the worker template), ``worker<ID>:<TENANT>@cpu<CPU>`` for
    a Prism worker (the label in its environment if it was exec'd, else its
    ``/proc/PID/comm``, which holds the label's first 15 characters), else
    ``pid<PID>``.
    """
    if pid == root:
        return "root"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid{pid}"
    if b"prism.admin.main" in argv:
        return "admin"
    if b"prism.workers.zygote" in argv:  # the template, or a worker it forked
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return f"pid{pid}"
        return "template" if comm == "prism-template" else f"worker{comm}"
    if b"prism.workers.worker" in argv:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            raw = next(v for v in environ if v.startswith(_WORKER_LABEL.encode()))
            return f"worker{raw[len(_WORKER_LABEL) :].decode()}"
        except (OSError, StopIteration, UnicodeDecodeError):
            return f"worker-pid{pid}"
    return f"pid{pid}"


def ticks_to_us(ticks: float) -> float:
    """Clock ticks to microseconds."""
    return ticks * 1_000_000 / CLK_TCK


def cpu_counters(cpus: Iterable[int]) -> tuple[int, int]:
    """(busy, steal) clock ticks of the given CPUs since boot, from ``/proc/stat``.

    Busy minus the server's own ticks over a phase is what else ran on the
    server's CPUs (other processes, interrupts): the way to tell a clean run
    from one on a shared, busy machine.
    """
    wanted = {f"cpu{cpu}" for cpu in cpus}
    busy = steal = 0
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, cpu_steal = map(int, fields[1:9])
            busy += user + nice + system + irq + softirq
            steal += cpu_steal
            wanted.discard(fields[0])
    if wanted:
        raise ServerFailed(f"{', '.join(sorted(wanted))} not in /proc/stat")
    return busy, steal


def pin_benchmark(needed: set[int], load_cpu: int) -> bool:
    """Move this process (and so the load generator, its child) to ``load_cpu``.

    False, with a warning, when the CPUs in ``needed`` (server and load) are
    not all available: numbers are then taken unpinned.
    """
    if not needed | {load_cpu} <= os.sched_getaffinity(0):
        print(
            f"warning: CPUs {cpu_list(needed | {load_cpu})} not all available; not pinning", file=sys.stderr
        )
        return False
    os.sched_setaffinity(0, {load_cpu})
    return True
