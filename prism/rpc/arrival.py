"""How long a read's bytes waited in the kernel before the worker read them.

A worker busy on its CPU reads its sockets late: requests wait in the
kernel's receive buffers, where neither the shedder's queues nor a call's
deadline see them. Under twice the load a worker could serve, that wait
grew to most of the clients' 1 s deadlines (``bench/overload.py``): the
worker answered calls its clients had already given up on, and their
deadline cancels (RST_STREAM), read soon after the request itself, looked
to the rapid-reset rule like a client resetting what it had just opened.

Linux stamps every packet it receives (``SO_TIMESTAMPNS``); ``recvmsg``
hands back the stamp of the last packet a read took. ``lag`` is then how
long ago the newest bytes of the read arrived: a lower bound on how long its
requests waited. The reader (``prism.rpc.server``) reports it to the
shedder as a queue wait (``prism.limits.shed``: CoDel sees the standing
queue in the sockets) and to the protocol, which dates a call's arrival
back by it (``Call.opened``: its deadline and the rapid-reset rule then
count from when the request reached the machine). The stamp is the
system's wall clock: a step of that clock between the packet and the read
is taken as lag, at most ``MAX_LAG_S``; a step back as none.
"""

from __future__ import annotations

import platform
import socket
import struct
import sys
import time
from collections.abc import Iterable
from typing import Final

MAX_LAG_S: Final = 10.0
_TIMESPEC: Final = struct.Struct("@qq")  # struct timespec on 64-bit Linux: tv_sec, tv_nsec
SPACE: Final = socket.CMSG_SPACE(_TIMESPEC.size)  # the ancillary buffer recvmsg needs
# Python's socket module does not name it: Linux's SO_TIMESTAMPNS (also the
# control message's type) in asm-generic/socket.h, which x86-64 and arm64 use.
_SO_TIMESTAMPNS: Final = (
    35 if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") else None
)
_SCM_TIMESTAMPNS: Final = _SO_TIMESTAMPNS


def stamp(sock: object) -> socket.socket | None:
    """Turn on receive timestamps for ``sock`` (a trio socket); the
    standard-library socket to ``recvmsg`` from, or None where the system
    or the socket does not have them (the caller then reads plainly)."""
    raw = getattr(sock, "_sock", None)  # trio's socket wraps the standard one
    if not isinstance(raw, socket.socket) or _SO_TIMESTAMPNS is None:
        return None
    try:
        raw.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return None
    return raw


def lag(ancillary: Iterable[tuple[int, int, bytes]]) -> float:
    """Seconds since the newest packet of a read arrived (its timestamp in
    ``ancillary``, recvmsg's), 0.0 without one."""
    for level, kind, data in ancillary:
        if kind == _SCM_TIMESTAMPNS and level == socket.SOL_SOCKET and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            waited = time.time() - (seconds + nanoseconds * 1e-9)
            return min(waited, MAX_LAG_S) if waited > 0.0 else 0.0
    return 0.0
