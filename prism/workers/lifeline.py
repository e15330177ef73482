"""Children of the supervisor do not outlive it.

If the supervisor dies without stopping its workers (kill -9, a crash), an
orphaned worker would keep the gRPC port bound and answer with a stale
routing table, and a restarted supervisor could not bind. Linux's
PR_SET_PDEATHSIG makes the kernel send us SIGTERM (a normal drain) the moment
the parent exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_COMM_BYTES = 15  # what /proc/PID/comm keeps of a name


def name_process(name: str) -> None:
    """Show ``name`` (its first 15 bytes) as this process's name in
    ``/proc/PID/comm``, ``top`` and ``ps -o comm``: forked workers share the
    template's command line, so this is what tells them apart there."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:_COMM_BYTES]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def wait_for_parent(parent_pid: int, timeout_s: float = 5.0) -> None:
    """Wait until ``parent_pid`` is our parent: a worker forked by the worker
    template (``prism.workers.zygote``) is re-parented to the supervisor once
    the middle process has exited. Asking for the death signal before that
    would deliver it when the middle process exits."""
    deadline = time.monotonic() + timeout_s
    while os.getppid() != parent_pid and time.monotonic() < deadline:
        time.sleep(0.001)


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Ask for ``signum`` when the parent exits; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the heartbeat timeout on the supervisor side still applies
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)
