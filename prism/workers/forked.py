"""The supervisor's side of the worker template (``prism.workers.zygote``).

A worker exec'd as ``python -m prism.workers.worker`` imports trio, h2,
protobuf, msgspec and the App's modules on its own: those modules' objects
are most of an idle worker's memory (about 27 of its 29 MB of PSS). Forked
from one process that has imported them, every worker shares those pages
(copy on write) with it and with each other, and its proportional set size
is its own pages plus its share of the common ones.

``Zygote`` starts the template once (``python -m prism.workers.zygote``, with
the descriptors every worker inherits) and asks it for each worker over a
Unix socket, sending the worker's spec memfd and its tenant's namespace
table with the request (SCM_RIGHTS). The template forks twice and the middle
process exits at once, so the worker is re-parented to the supervisor, a
child subreaper (``become_subreaper``): ``ForkedChild`` waits for it,
signals it and reaps it as ``subprocess.Popen`` does for an exec'd child.

Any failure of the template (it died, it does not answer) makes the caller
exec the worker instead (``Resources.start_worker``): slower to start and
larger, but the same worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import subprocess
import time
from typing import Final

log = logging.getLogger("prism.supervisor")

__all__ = ["ForkedChild", "Zygote", "become_subreaper"]

_PR_SET_CHILD_SUBREAPER: Final = 36
_PID: Final = struct.Struct("<i")
# The first answer waits for the template's imports (a second or two on a
# busy machine); later ones for two forks.
ANSWER_TIMEOUT_S: Final = 30.0
_POLL_S: Final = 0.005


def become_subreaper() -> bool:
    """Make this process the parent of its orphaned descendants (Linux); False if it cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class ForkedChild:
    """A worker the template forked and the kernel re-parented to us: the
    part of ``subprocess.Popen``'s interface the supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the worker has exited (and is reaped), else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Not (or no longer) our child: reaped elsewhere. Gone either way.
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout or 0.0)
            time.sleep(_POLL_S)
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # never a reaped (maybe reused) pid
            os.kill(self.pid, signum)


class Zygote:
    """The running template and the socket to ask it for workers."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self._sock = sock

    def fork(self, spec_fd: int, namespaces_fd: int, label: str) -> ForkedChild:
        """A new worker with this spec and tenant table; OSError if the template cannot make one."""
        if self.proc.poll() is not None:
            raise OSError(f"the worker template exited with {self.proc.returncode}")
        socket.send_fds(self._sock, [label.encode()], [spec_fd, namespaces_fd])
        answer = self._sock.recv(_PID.size)
        if len(answer) != _PID.size:
            raise OSError("the worker template closed its socket")
        (pid,) = _PID.unpack(answer)
        if pid <= 0:
            raise OSError("the worker template could not fork")
        return ForkedChild(pid)

    def close(self) -> None:
        """Stop the template: it exits when its socket closes (its workers live on)."""
        self._sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()

    @staticmethod
    def socket_pair() -> tuple[socket.socket, socket.socket]:
        """Ours (blocking, with the answer timeout) and the template's (inheritable)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.settimeout(ANSWER_TIMEOUT_S)
        theirs.set_inheritable(True)
        return ours, theirs


def reply_pid(sock: socket.socket, pid: int) -> None:
    """The template's answer to a request: the worker's pid, 0 if none."""
    sock.send(_PID.pack(pid))
