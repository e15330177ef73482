"""Reading a plaintext connection up to its first request, to hand it to its tenant.

A connection whose first request names another tenant (``prism-tenant``
metadata or an ``:authority`` of ``<tenant>.*``) is handed to a worker of that
tenant (``prism.router.handoff``), with the bytes read so far. TLS connections
are not sniffed: their ClientHello placed them (``prism.rpc.handshake``).
"""

from __future__ import annotations

import trio

from prism.rpc.call import Call
from prism.rpc.keepalive import Preface
from prism.rpc.protocol import CALL_START, GrpcProtocol
from prism.rpc.settings import Handoff

# The first request is looked at within these bounds; past them the
# connection is served where it landed.
SNIFF_TIMEOUT_S = 1.0
SNIFF_LIMIT_BYTES = 64 * 1024
_READ_SIZE = 65536


async def sniff(
    stream: trio.abc.Stream, proto: GrpcProtocol, preface: Preface, handoff: Handoff, received: bytes = b""
) -> list[tuple[int, Call | None]] | None:
    """Read up to the first request, and hand the connection to another
    worker if that request names another tenant. Returns the events read
    (to serve here), or None once handed off (or closed). ``received``: read already
    (the preface, and what came with it).

    Our SETTINGS preface goes out at once (grpcio waits for it before
    sending a request), and so do the answers to what comes before the first
    request (the ACK of the client's SETTINGS, RFC 9113 section 6.5.3:
    "immediately"; a client or pool that waits for it before its first call
    waited out ``SNIFF_TIMEOUT_S``). The hand-off says how many bytes were
    answered, and the receiving worker, which replays them all, does not
    answer them again.
    """
    assert isinstance(stream, trio.SocketStream)
    await stream.send_all(proto.data_to_send())
    buffered = bytearray()
    events: list[tuple[int, Call | None]] = []
    data = received
    answered = 0
    sending = False
    with trio.move_on_after(SNIFF_TIMEOUT_S):
        while len(buffered) < SNIFF_LIMIT_BYTES:
            if not data:
                data = await stream.receive_some(_READ_SIZE)
                if not data:
                    break
            buffered += data
            preface.feed(data)
            events += proto.receive_data(data)
            first = next((c for k, c in events if k == CALL_START), None)
            if first is not None:
                if await handoff.hand_off(first, stream, bytes(buffered), answered):
                    return None
                break
            if proto.broken:
                break
            answer = proto.data_to_send()
            if answer:
                sending = True
                await stream.send_all(answer)
                sending = False
            answered = len(buffered)
            data = b""
    if sending:
        return None  # cut off mid-frame by the timeout (a peer that does not read): closed
    return events
