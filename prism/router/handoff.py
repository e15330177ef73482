"""Connection hand-off: a connection that names its tenant goes to that tenant.

A plaintext client says which tenant it is for with ``:authority``
``TENANT.anything`` or ``prism-tenant`` metadata on its first request; a TLS
client with the server name of its ClientHello (SNI), ``TENANT.anything``,
read before the handshake (``prism.rpc.handshake``). The worker that accepted
the connection (all workers accept on the one port) passes the socket to a
serving worker of that tenant over a Unix socket (SCM_RIGHTS), so that the
connection's calls take no forwarding hop:

- plaintext: together with the bytes it has read (after it sent its server
  preface); the receiving worker replays them and serves the connection;
- TLS: with no bytes, nothing having been read or sent; the receiving worker
  serves it as a connection it accepted itself (handshake included), but
  never passes it on again.

Message on the Unix socket: the 4-byte big-endian length of the bytes read,
the 4-byte length of their head already answered (the frames the accepting
worker acknowledged while it waited for the first request: SETTINGS, PING),
then the bytes read, with the client socket's fd attached to the first chunk.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
from collections.abc import Callable

import trio

from prism import metrics
from prism.router.table import Routes
from prism.rpc.call import Call
from prism.rpc.listen import peer_address, serve_accepted
from prism.rpc.server import Connection, ServerSettings

log = logging.getLogger("prism.handoff")

_MAX_BUFFERED = 1024 * 1024
_HEAD = 8  # the message's two lengths


def tenant_of(call: Call) -> str:
    """The tenant a first request names ("" for none)."""
    for name, value in call.metadata:
        if name == "prism-tenant" and isinstance(value, str):
            return value
    return tenant_of_host(call.authority.decode("latin-1"))


def tenant_of_host(host: str) -> str:
    """The tenant a host name (``:authority``, SNI) names: ``TENANT.anything`` ("" for none)."""
    head, dot, _ = host.partition(".")
    return head if dot else ""


class TenantHandoff:
    """The ``Handoff`` a worker installs in its server settings."""

    def __init__(self, tenant: str, routes: Callable[[], Routes]) -> None:
        self._tenant = tenant
        self._routes = routes
        self._next = 0

    async def hand_off(self, first: Call, stream: trio.SocketStream, buffered: bytes, answered: int) -> bool:
        return await self._to(tenant_of(first), stream, buffered, answered)

    def elsewhere(self) -> bool:
        return any(w.tenant != self._tenant for w in self._routes().workers.values())

    async def hand_off_tls(self, server_name: str, stream: trio.SocketStream) -> bool:
        return await self._to(tenant_of_host(server_name), stream, b"", 0)

    async def _to(self, tenant: str, stream: trio.SocketStream, buffered: bytes, answered: int) -> bool:
        if not tenant or tenant == self._tenant:
            return False
        workers = [w for w in self._routes().tenant_workers(tenant) if w.serving]
        if not workers:
            return False  # unknown tenant, or none serving: serve (and forward) here
        self._next += 1
        target = workers[self._next % len(workers)]
        try:
            await send_connection(target.handoff_address, stream.socket.fileno(), buffered, answered)
        except OSError as exc:
            log.warning("hand-off to worker %d failed (%s); serving here", target.id, exc)
            return False
        metrics.HANDOFFS.labels(tenant).inc()
        return True


async def send_connection(address: str, fd: int, buffered: bytes, answered: int = 0) -> None:
    """Pass ``fd`` and the bytes already read from it to the worker at
    ``address``; the first ``answered`` of them were answered already."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(address)
        message = len(buffered).to_bytes(4, "big") + answered.to_bytes(4, "big") + buffered
        fds = array.array("i", [fd])
        sent = await sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        while sent < len(message):
            sent += await sock.send(message[sent:])


async def serve_handoffs(
    address: str,
    settings: ServerSettings,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Take over connections other workers pass to ``address``, until cancelled."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)  # left by the worker this one replaces
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(address)
        listener.listen(128)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_take_over, conn, settings)


async def _take_over(conn: trio.socket.SocketType, settings: ServerSettings) -> None:
    with conn:
        try:
            fd, buffered, answered = await _receive(conn)
        except (OSError, ValueError) as exc:
            log.warning("bad hand-off message: %s", exc)
            return
    try:
        client = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    except OSError as exc:
        os.close(fd)
        log.warning("bad hand-off message: the descriptor passed is not a socket (%s)", exc.strerror)
        return
    stream = trio.SocketStream(client)
    try:
        if buffered:
            await Connection(
                stream, settings, handed_in=(buffered, answered), peer=peer_address(client)
            ).serve()
        else:  # TLS, untouched: as if accepted here, under this worker's TLS context
            security = settings.security
            await serve_accepted(
                stream, settings, security.tls, security.handshake_timeout_s, may_hand_off=False
            )
    except Exception:
        log.exception("handed-off connection failed")


async def _receive(conn: trio.socket.SocketType) -> tuple[int, bytes, int]:
    data, ancdata, _, _ = await conn.recvmsg(65536, socket.CMSG_SPACE(4))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(fds) != 1:
        for extra in fds:
            socket.close(extra)
        raise ValueError(f"expected one file descriptor, got {len(fds)}")
    if len(data) < _HEAD:
        socket.close(fds[0])
        raise ValueError("short hand-off message")
    length = int.from_bytes(data[:4], "big")
    answered = int.from_bytes(data[4:_HEAD], "big")
    if length > _MAX_BUFFERED:
        socket.close(fds[0])
        raise ValueError(f"hand-off of {length} bytes is too large")
    if answered > length:
        socket.close(fds[0])
        raise ValueError(f"hand-off says {answered} of its {length} bytes were answered")
    buffered = bytearray(data[_HEAD:])
    while len(buffered) < length:
        more = await conn.recv(length - len(buffered))
        if not more:
            socket.close(fds[0])
            raise ValueError("hand-off message cut short")
        buffered += more
    return fds[0], bytes(buffered), answered
