"""A TLS connection's start: its tenant, its handshake, its protocol.

Runs in the connection's own task (never in the accept loop, so that a slow
or silent client holds up no other connection), within the handshake timeout
the connection was accepted under:

1. The ClientHello is read with MSG_PEEK, so nothing is consumed: when its
   server name (SNI) is ``T.<anything>`` for a tenant ``T`` served by other
   workers, the socket goes to one of them untouched (``Handoff.hand_off_tls``)
   and that worker does the handshake. A TLS session cannot move between
   processes once its keys are agreed; this is the only point where the
   connection can still go. Otherwise it is served here, and calls for
   another tenant's namespaces are forwarded as on any connection.
2. The handshake (``trio.SSLStream``), with the certificate and client CA of
   the context taken at accept: a rotation changes new connections only.
3. ALPN: the context offers ``h2`` alone, and a client that did not select it
   is closed right after the handshake.

A handshake that fails (plaintext bytes, an unknown, expired or missing
client certificate, a timeout) ends that connection with one debug line and
nothing else: it is the client's error, not the server's. A drain gives the
handshakes under way ``DRAIN_HANDSHAKE_GRACE_S`` more, not their whole timeout.
"""

from __future__ import annotations

import logging
import socket
import ssl

import trio

from prism.rpc.server import Connection, ServerSettings
from prism.security.clienthello import read_client_hello
from prism.security.tls import peer_principal

log = logging.getLogger("prism.rpc")

# A ClientHello larger than this is not read for its server name (the
# connection is served where it landed); real ones are under 2 KiB.
HELLO_LIMIT_BYTES = 16 * 1024
# Once a drain starts, how long a handshake under way may still take.
DRAIN_HANDSHAKE_GRACE_S = 1.0


async def serve_tls(
    stream: trio.SocketStream,
    settings: ServerSettings,
    context: ssl.SSLContext,
    handshake_timeout_s: float,
    peer: str,
    *,
    may_hand_off: bool = True,
) -> None:
    """Serve one accepted TLS connection until it ends, or hand it off.

    ``may_hand_off`` is False for a connection another worker handed here:
    it is never passed on twice.
    """
    try:
        tls_stream = await _start(stream, settings, context, handshake_timeout_s, peer, may_hand_off)
    except BaseException:
        await _close(stream)
        raise
    if tls_stream is None:  # refused, or handed off (this closes our copy only)
        await _close(stream)
        return
    principal = peer_principal(tls_stream.getpeercert())
    await Connection(tls_stream, settings, peer=peer, peer_principal=principal).serve()


async def _start(
    stream: trio.SocketStream,
    settings: ServerSettings,
    context: ssl.SSLContext,
    handshake_timeout_s: float,
    peer: str,
    may_hand_off: bool,
) -> trio.SSLStream[trio.SocketStream] | None:
    """The handshaken stream, or None when the connection is not to be served here."""
    # https_compatible: a client that closes without close_notify has ended
    # the connection as a plaintext one does (HTTP/2 frames its own end).
    tls_stream = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    with trio.move_on_after(handshake_timeout_s) as handshake:

        def hurry() -> None:
            # A drain waits for calls in flight, not for a client that may
            # never handshake: the handshakes under way get a moment more.
            handshake.deadline = min(handshake.deadline, trio.current_time() + DRAIN_HANDSHAKE_GRACE_S)

        if settings.draining:
            hurry()
        settings.on_drain.append(hurry)
        try:
            if may_hand_off and settings.handoff is not None:
                server_name = await peek_server_name(stream.socket)
                if server_name is not None and await settings.handoff.hand_off_tls(server_name, stream):
                    return None
            await tls_stream.do_handshake()
        except (trio.BrokenResourceError, OSError) as exc:
            log.debug("tls: handshake with %s failed: %s", peer, _reason(exc))
            return None
        finally:
            settings.on_drain.remove(hurry)
        # Python's ssl cannot fail a handshake for want of a protocol: when the
        # client offers no ALPN, or none we offer, OpenSSL's selection callback
        # answers "no ack" and the handshake completes without one. So the
        # check is here, right after it.
        if tls_stream.selected_alpn_protocol() != "h2":
            log.debug("tls: %s did not select ALPN h2: closed", peer)
            return None
        return tls_stream
    if settings.draining:
        log.debug("tls: no handshake from %s before the drain: closed", peer)
    else:
        log.debug("tls: no handshake from %s within %gs: closed", peer, handshake_timeout_s)
    return None


async def peek_server_name(sock: trio.socket.SocketType) -> str | None:
    """The server name of the ClientHello waiting on ``sock``, read with
    MSG_PEEK (nothing consumed); None without one, or past HELLO_LIMIT_BYTES."""
    data = await sock.recv(HELLO_LIMIT_BYTES, socket.MSG_PEEK)
    hello = read_client_hello(data)
    if not hello.missing:
        return hello.server_name
    try:
        while True:
            wanted = len(data) + hello.missing
            if wanted > HELLO_LIMIT_BYTES:
                return None
            # A ClientHello split over TCP segments: a peek returns at once
            # while any byte is queued, so wait in the kernel instead, until
            # the bytes still missing have come (or EOF, or an error).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
            await trio.lowlevel.wait_readable(sock)
            more = await sock.recv(HELLO_LIMIT_BYTES, socket.MSG_PEEK)
            if len(more) <= len(data):
                return None  # the peer closed (or broke) mid-hello
            data = more
            hello = read_client_hello(data)
            if not hello.missing:
                return hello.server_name
    finally:
        # The handshake's reads, here or in the worker it goes to, must wake
        # on any byte again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


async def _close(stream: trio.SocketStream) -> None:
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return " ".join(str(cause).split()) or type(cause).__name__
