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

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Ask for ``signum`` when the parent exits; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the heartbeat timeout on the supervisor side still applies
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)
