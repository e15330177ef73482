"""Writing a list of buffers to a connection's stream, with as few copies as the stream allows.

The protocol queues a large answer as views of its serialized message between
small frame headers (``prism.rpc.h2send``). On a plain TCP stream those go to
the kernel as they are, in ``sendmsg`` calls of up to ``IOV_MAX`` buffers
(a vectored write, like ``writev``): no copy is made in this process. Any other
stream (TLS encrypts a copy anyway) gets them joined, in one ``send_all``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Final

import trio

from prism.rpc.h2send import Chunk

# Buffers per sendmsg (Linux: 1024).
_IOV_MAX: Final = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024)
# What trio's SocketStream turns into ClosedResourceError rather than BrokenResourceError.
_CLOSED: Final = frozenset((errno.EBADF, errno.ENOTSOCK))


def _ignore(_sent: int) -> None:
    pass


def write_now(fd: int, buffers: list[Chunk]) -> int:
    """Hand ``buffers`` to the kernel without waiting, in one ``writev``: how
    many bytes it took (0 when the socket is full, or failed: the awaited
    path that goes on from there meets the failure and reports it as
    ``send_buffers`` does). Not through trio's socket, whose send is a
    schedule point even when the kernel takes everything at once: on a
    connection with one call at a time, a pass of the scheduler per answer."""
    try:
        return os.writev(fd, buffers[:_IOV_MAX])
    except OSError:
        return 0


def rest_of(buffers: list[Chunk], sent: int) -> list[Chunk]:
    """What is left of ``buffers`` once their first ``sent`` bytes went."""
    for i, chunk in enumerate(buffers):
        n = len(chunk)
        if sent < n:
            return [memoryview(chunk)[sent:], *buffers[i + 1 :]]
        sent -= n
    return []


async def send_buffers(
    stream: trio.abc.Stream, buffers: list[Chunk], progress: Callable[[int], None] = _ignore
) -> None:
    """Write ``buffers`` to ``stream``, in order, all of them (as ``send_all``
    does for one buffer, with the same errors); ``progress(n)`` as each ``n``
    bytes of them are handed to the kernel (on the vectored path)."""
    if len(buffers) == 1:
        await stream.send_all(buffers[0])
        return
    if not isinstance(stream, trio.SocketStream):
        await stream.send_all(b"".join(buffers))
        return
    sock = stream.socket
    pending = [memoryview(b) for b in buffers]
    first = 0
    try:
        while first < len(pending):
            sent = await sock.sendmsg(pending[first : first + _IOV_MAX])
            progress(sent)
            while sent:  # drop what went, trim what went in part
                n = len(pending[first])
                if sent >= n:
                    sent -= n
                    first += 1
                else:
                    pending[first] = pending[first][sent:]
                    sent = 0
            while first < len(pending) and not pending[first]:
                first += 1
    except OSError as exc:
        if exc.errno in _CLOSED:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
