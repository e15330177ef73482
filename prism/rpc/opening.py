"""A connection's opening and closing, before and after its protocol state.

A plaintext connection is read up to the client preface's 24 bytes
(``client_magic``) before anything else is built for it: a peer that
connects and sends nothing, or half a preface, holds a socket and one small
task until the handshake timeout, not a protocol state (~17 KB, and ~250 us
of CPU to build and drop). Measured with ``bench/abuse.py``'s
``half_prefaces`` (2,000 such peers and 2,000 idle after a whole preface):
the worker grew by 56 MB at the peak, was 87.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from prism import metrics
from prism.rpc.call import Call
from prism.rpc.keepalive import PREFACE, Preface
from prism.rpc.protocol import GrpcProtocol
from prism.rpc.settings import ServerSettings
from prism.rpc.sniff import sniff

log = logging.getLogger("prism.rpc")

_READ_SIZE: Final = 65536  # a read here takes what came with it


async def client_magic(stream: trio.abc.ReceiveStream, deadline: float) -> bytes | None:
    """Read until the client's first 24 bytes are in, or they cannot be
    the preface (what follows them in the same reads is kept); None: the
    peer left first, or ``deadline`` came. Bytes that are not the preface are
    returned as they are, for the protocol to refuse as it would anyway."""
    received = b""
    with trio.move_on_at(deadline):
        while len(received) < len(PREFACE) and PREFACE.startswith(received):
            try:
                data = await stream.receive_some(_READ_SIZE)
            except trio.BrokenResourceError:
                return None  # reset by the peer
            if not data:
                return None
            received += data
        return received
    return None


async def opening_events(
    stream: trio.abc.Stream,
    proto: GrpcProtocol,
    preface: Preface,
    settings: ServerSettings,
    handed_in: tuple[bytes, int] | None,
    received: bytes,
) -> list[tuple[int, Call | None]] | None:
    """The protocol's events for what was read before the connection's reader
    starts: the bytes a worker that accepted the connection handed in with
    it (and how many of them it answered), or ``received`` (its preface)
    and, when another tenant's workers may take it, what ``prism.rpc.sniff``
    reads up to its first request. None: handed to another worker, which
    now owns the socket."""
    if handed_in is not None:
        # That worker sent our preface (the same bytes) and the answers to
        # the head of what it read (a SETTINGS ACK, say): made again here,
        # from the same bytes, and dropped, they are not sent twice.
        received, answered = handed_in
        proto.data_to_send()
        if answered:
            preface.feed(received[:answered])
            events = proto.receive_data(received[:answered])
            proto.data_to_send()
            received = received[answered:]
            if received:
                preface.feed(received)
                events += proto.receive_data(received)
            return events
    elif (
        settings.handoff is not None
        and isinstance(stream, trio.SocketStream)
        and settings.handoff.elsewhere()
    ):
        # (TLS is not sniffed: its ClientHello placed it, prism.rpc.handshake.)
        return await sniff(stream, proto, preface, settings.handoff, received)
    if not received:
        return []
    preface.feed(received)
    return proto.receive_data(received)


# What a connection ended by a connection error may still read, and drop.
LINGER_BYTES: Final = 4 * 1024 * 1024


async def linger(stream: trio.abc.Stream) -> None:
    """After our GOAWAY (a connection error's, or a drain's once the last
    call is answered): end our side where the stream can (a socket; TLS has
    no half-close, and its peer ends once it has read the GOAWAY), and read
    and drop what the peer sends meanwhile,
    up to ``LINGER_BYTES``, until it ends its side too or the caller's
    deadline (the GOAWAY's grace) comes. Closing with its bytes unread made
    the kernel reset the connection, and a reset makes the peer's kernel drop
    what the peer had not read yet: often the GOAWAY, and with it the reason
    (and which of its requests were never taken, to be sent again elsewhere:
    gRPC clients failed them UNAVAILABLE instead)."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        drained = 0
        while drained < LINGER_BYTES:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                return
            drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def close(stream: trio.abc.Stream) -> None:
    """Close ``stream`` now, cancelled or not. A socket is closed as
    ``SocketStream.aclose`` would, without its checkpoint (and the cancel
    scopes around it: ~10% of what a short connection cost)."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
    else:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


def closed_by_server(peer: str, reason: str) -> None:
    """A connection the server closes for ``reason``: a debug line and a count."""
    log.debug("connection from %s closed by the server: %s", peer or "a client", reason)
    metrics.connection_closed(reason)
