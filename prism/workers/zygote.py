"""The worker template: imports a worker's modules once and forks every worker from them.

Started by the supervisor as ``python -m prism.workers.zygote`` (see
``prism.workers.forked`` for why and for the supervisor's side). It imports
``prism.workers.worker`` (trio, h2, protobuf, the App, ...), collects and
freezes the garbage collector's view of those objects (``gc.freeze``: the
collector then never writes to their pages, which stay shared), and serves
requests on its socket: each is a label and two descriptors (the worker's
spec memfd and its tenant's namespace table).

For each it forks twice: the middle process forks the worker, tells the
template its pid and exits, so the worker is re-parented to the supervisor
(a child subreaper) and the template is nobody's parent. The template runs
no event loop and starts no thread: trio's loop and nng's threads start in
the worker, after the fork. Backends and drivers are imported by the worker
for its own namespaces only, as when it is exec'd.

It exits when its socket closes (the supervisor stopped or gave up on it),
and with the supervisor (PR_SET_PDEATHSIG); its workers do not depend on it.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import struct
import sys

import msgspec

from prism.workers.forked import reply_pid
from prism.workers.lifeline import die_with_parent, name_process
from prism.workers.spec import SPEC_FD_ENV, WORKER_LABEL_ENV, WorkerSpec, ZygoteSpec, read_spec

_PID = struct.Struct("<i")
# This process's name in /proc/PID/comm (its workers show their labels).
TEMPLATE_NAME = "prism-template"


def main() -> None:
    spec = read_spec(ZygoteSpec)
    die_with_parent(spec.supervisor_pid)
    name_process(TEMPLATE_NAME)
    # Ctrl-C and a hangup reach the whole process group: the supervisor
    # decides what stops, and stops us by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from prism.workers import worker  # what every worker shares with us

    gc.collect()
    gc.freeze()
    sock = socket.socket(fileno=spec.socket_fd)
    label, spec_fd, namespaces_fd = _serve(sock)  # returns in a new worker only
    sock.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ[SPEC_FD_ENV] = str(spec_fd)
    os.environ[WORKER_LABEL_ENV] = label
    try:
        worker_spec = read_spec(WorkerSpec)
    except (KeyError, ValueError, OSError, msgspec.DecodeError) as exc:
        print(f"prism: forked worker cannot read its spec: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    # The table's descriptor number here, not the supervisor's.
    worker.serve(msgspec.structs.replace(worker_spec, namespaces_fd=namespaces_fd), forked=True)


def _serve(sock: socket.socket) -> tuple[str, int, int]:
    """Fork a worker for every request until the socket closes; in a new worker, its request."""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 4096, 2)
        except InterruptedError:
            continue
        if not data:
            sys.exit(0)  # the supervisor closed our socket
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            reply_pid(sock, 0)
            continue
        if _fork_worker(sock):
            return data.decode(), fds[0], fds[1]
        for fd in fds:
            os.close(fd)  # the worker has its own


def _fork_worker(sock: socket.socket) -> bool:
    """Fork twice; True in the worker, False here once the supervisor has its pid."""
    r, w = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        reply_pid(sock, 0)
        return False
    if middle == 0:
        os.close(r)
        try:
            pid = os.fork()
        except OSError:
            os._exit(1)
        if pid == 0:
            os.close(w)
            return True
        os.write(w, _PID.pack(pid))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        answer = pipe.read(_PID.size)
    os.waitpid(middle, 0)  # exited: the worker is the supervisor's child now
    reply_pid(sock, _PID.unpack(answer)[0] if len(answer) == _PID.size else 0)
    return False


if __name__ == "__main__":
    main()
