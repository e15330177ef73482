"""Accepting connections: one loop per listening socket, a task per connection.

Workers all accept on the same inherited socket and the kernel wakes every
one waiting; where a tenant has several, a worker takes a connection only
while it holds no more than its siblings (``ServerSettings.accept_share``,
``prism.rpc.accept_share``), so that a burst is spread over them.

A connection is accepted under the TLS context in effect at that moment
(``settings.security``: None is plaintext) and keeps it; its handshake runs in
its own task (``prism.rpc.handshake``).

What accepting may take: a connection past ``http2.max_connections`` held by
this process is closed as soon as it is accepted (and counted); when the
process is out of descriptors (EMFILE, ENFILE...) the loop waits, longer each
time up to a second, logs once per ``ACCEPT_LOG_INTERVAL_S`` with the count
since, and the connections already held are served meanwhile.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

from prism import metrics
from prism.rpc.accept_share import LEAVE_S, LOOK_AGAIN_S, AcceptShare
from prism.rpc.handshake import serve_tls
from prism.rpc.held import Held
from prism.rpc.keepalive import TimerHeap
from prism.rpc.opening import client_magic, close, closed_by_server
from prism.rpc.server import Connection, ServerSettings

log = logging.getLogger("prism.rpc")


async def serve_listeners(
    listeners: list[trio.SocketListener],
    settings: ServerSettings,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept and serve connections; a failing connection affects no other.

    ``settings.start_drain()`` stops accepting (other processes on the same
    socket take new connections) and GOAWAYs every connection; this returns
    once the last of them has closed.
    """

    async def handle(
        stream: trio.SocketStream, tls: ssl.SSLContext | None, handshake_timeout_s: float
    ) -> None:
        try:
            await serve_accepted(stream, settings, tls, handshake_timeout_s)
        except Exception:
            log.exception("connection failed")
        finally:
            settings.accepted -= 1
            if settings.accept_share is not None:
                settings.accept_share.publish(settings.accepted)

    async with trio.open_nursery() as timers:
        # One task runs every connection's timers (prism.rpc.keepalive.TimerHeap).
        heap = settings.timer_heap = TimerHeap()
        timers.start_soon(heap.run)
        # And one writes every connection's held refusals (prism.rpc.held).
        held = settings.held = Held()
        timers.start_soon(held.run)
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as accepting:
                settings.accept_scope = accepting
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(_accept_loop, listener, connections, handle, settings)
                    task_status.started()
            for listener in listeners:
                await listener.aclose()
        settings.timer_heap = settings.held = None
        timers.cancel_scope.cancel()


# Errors from accept() that mean "out of resources, try again soon" (as in
# trio.serve_listeners): we pause rather than die.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# Errors from accept() that concern that connection alone (it went before it
# was taken): trio's SocketListener.accept() skips them, so does _next.
_GONE_BEFORE_ACCEPT_ERRNOS = {
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
}  # fmt: skip
_ACCEPT_PAUSE_S = 0.01  # the first wait; it doubles up to _ACCEPT_PAUSE_MAX_S
_ACCEPT_PAUSE_MAX_S = 1.0
ACCEPT_LOG_INTERVAL_S = 10.0
# Connections taken per pass of the scheduler (_accept_more); where sibling
# workers accept on the same socket, only while it is this one's turn.
_ACCEPT_BATCH = 1024  # the listen backlog (prism.workers.resources)


async def serve_accepted(
    stream: trio.SocketStream,
    settings: ServerSettings,
    tls: ssl.SSLContext | None,
    handshake_timeout_s: float,
    *,
    may_hand_off: bool = True,
) -> None:
    """Serve a connection accepted here (or handed here before any byte was
    read: ``may_hand_off`` False) until it ends: over TLS with ``tls``, else plaintext."""
    peer = peer_address(stream.socket)
    if tls is None:
        # Nothing is built for a connection until its preface is in
        # (prism.rpc.keepalive.client_magic): ~17 KB less held per half-open one.
        handshake_by = trio.current_time() + settings.http2.handshake_timeout_s
        received = await client_magic(stream, handshake_by)
        if received is None:
            if trio.current_time() >= handshake_by:
                closed_by_server(peer, "handshake_timeout")
            await close(stream)
            return
        await Connection(stream, settings, received=received, handshake_by=handshake_by, peer=peer).serve()
    else:
        await serve_tls(stream, settings, tls, handshake_timeout_s, peer, may_hand_off=may_hand_off)


def peer_address(sock: trio.socket.SocketType) -> str:
    """``host:port`` (``[host]:port`` for IPv6) of the socket's peer; "" if it has gone already."""
    try:
        address = sock.getpeername()
    except OSError:
        return ""
    if not isinstance(address, tuple):
        return str(address)
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _accept_loop(
    listener: trio.SocketListener,
    connections: trio.Nursery,
    handle: Callable[[trio.SocketStream, ssl.SSLContext | None, float], Awaitable[None]],
    settings: ServerSettings,
) -> None:
    # The same listening socket, for accepting without a checkpoint (see _accept_more).
    raw = None
    if isinstance(listener, trio.SocketListener):
        raw = socket.socket(fileno=os.dup(listener.socket.fileno()))
    if settings.accept_share is not None:
        settings.accept_share.join(settings.accepted)  # siblings leave us our share from now on
    try:
        await _accept(listener, raw, connections, handle, settings)
    finally:
        if settings.accept_share is not None:
            settings.accept_share.leave()  # siblings stop leaving connections to us
        if raw is not None:
            raw.close()


async def _accept(
    listener: trio.SocketListener,
    raw: socket.socket | None,
    connections: trio.Nursery,
    handle: Callable[[trio.SocketStream, ssl.SSLContext | None, float], Awaitable[None]],
    settings: ServerSettings,
) -> None:
    pause = _ACCEPT_PAUSE_S
    failed = 0  # accept() failures since the last line logged
    log_after = -math.inf
    late = 0  # connections in a row the siblings were late for (see _next)
    while True:
        try:
            stream, siblings_late = await _next(listener, raw, settings)
        except OSError as exc:
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            failed += 1
            if trio.current_time() >= log_after:
                log.error(
                    "accept failed (%s), %d time(s) since the last such line: accepting waits, "
                    "connections held are served",
                    exc.strerror,
                    failed,
                )
                failed, log_after = 0, trio.current_time() + ACCEPT_LOG_INTERVAL_S
            await trio.sleep(pause)
            pause = min(pause * 2, _ACCEPT_PAUSE_MAX_S)
            continue
        pause = _ACCEPT_PAUSE_S
        late = late + 1 if siblings_late else 0
        if stream is None:
            continue  # a sibling took it
        _start(stream, connections, handle, settings)
        if raw is not None:
            # Siblings late for k connections in a row: take up to 2**k - 1
            # more out of turn, so a stalled sibling costs a storm a few
            # LEAVE_S in all (1,000 connections: 10), not LEAVE_S each, and
            # one merely slow to wake loses its turn for one connection only.
            _accept_more(raw, connections, handle, settings, out_of_turn=(1 << min(late, 10)) - 1)


async def _next(
    listener: trio.SocketListener, raw: socket.socket | None, settings: ServerSettings
) -> tuple[trio.SocketStream | None, bool]:
    """The next connection (None: the one that woke us went to a sibling), and
    whether the siblings were late for it.

    With siblings (``settings.accept_share``), a worker that holds more than
    its share waits for a connection, then leaves it to them for up to
    ``LEAVE_S`` (see ``prism.rpc.accept_share``). Still there then, the
    siblings are late (busy, slow to wake, stalled): it takes it.
    """
    share = settings.accept_share
    if raw is None or share is None or not share.siblings:
        return await listener.accept(), False
    await trio.lowlevel.wait_readable(listener.socket)
    late = not share.may_take(settings.accepted) and await _left_to_siblings(raw, share, settings)
    try:
        sock, _address = raw.accept()
    except BlockingIOError:
        return None, False
    except OSError as exc:
        if exc.errno in _GONE_BEFORE_ACCEPT_ERRNOS:
            return None, False  # as trio's accept() skips it
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock)), late


async def _left_to_siblings(raw: socket.socket, share: AcceptShare, settings: ServerSettings) -> bool:
    """Wait while a sibling holds fewer connections and one waits, for up to
    ``LEAVE_S``; True if it is still waiting and still not our turn then."""
    until = trio.current_time() + LEAVE_S
    while trio.current_time() < until:
        await trio.sleep(LOOK_AGAIN_S)
        if share.may_take(settings.accepted) or not _waiting(raw):
            return False
    return True


def _waiting(raw: socket.socket) -> bool:
    """Whether a connection waits to be accepted on ``raw``."""
    readable, _, _ = select.select([raw], [], [], 0)
    return bool(readable)


def _accept_more(
    raw: socket.socket,
    connections: trio.Nursery,
    handle: Callable[[trio.SocketStream, ssl.SSLContext | None, float], Awaitable[None]],
    settings: ServerSettings,
    *,
    out_of_turn: int = 0,
) -> None:
    """Take the connections already waiting to be accepted, up to a batch;
    with siblings, ``out_of_turn`` of them whatever the counts, the rest
    only while it is this worker's turn (see ``_next``).

    ``listener.accept()`` takes one connection per pass of the scheduler, and
    a pass runs every connection with something to do: with 1,000 clients
    connecting at once, the last one waited 1,000 passes, each longer than
    the one before as the served connections grew (a first answer after up
    to 5 s, where grpc.aio answered all within 0.4 s). A batch per pass makes
    that wait grow with the count, not its square.
    """
    share = settings.accept_share
    for taken in range(_ACCEPT_BATCH - 1):
        if (
            share is not None
            and share.siblings
            and taken >= out_of_turn
            and not share.may_take(settings.accepted)
        ):
            return  # the siblings' turn
        try:
            sock, _address = raw.accept()
        except OSError:
            return  # none waiting (or a failure the next accept() meets and reports)
        _start(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), connections, handle, settings)


def _start(
    stream: trio.SocketStream,
    connections: trio.Nursery,
    handle: Callable[[trio.SocketStream, ssl.SSLContext | None, float], Awaitable[None]],
    settings: ServerSettings,
) -> None:
    if settings.accepted >= settings.http2.max_connections:
        # Closed before any byte: the client sees the connection end and
        # may try another server; nothing of this one is held for it.
        metrics.connection_refused("max_connections")
        stream.socket.close()
        return
    settings.accepted += 1
    if settings.accept_share is not None:
        settings.accept_share.publish(settings.accepted)
    security = settings.security
    connections.start_soon(handle, stream, security.tls, security.handshake_timeout_s)
