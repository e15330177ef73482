"""DATA a client keeps sending on streams the server has ended must not eat
the connection's receive window.

A stream refused (over max_concurrent_streams: REFUSED_STREAM), reset as
malformed (PROTOCOL_ERROR) or already answered is over for the server, but
the client may have DATA in flight on it, or keep sending it. Every byte of
that DATA counts against the connection's window (RFC 9113 6.9), so unless
the server hands it back, a client could be left with no window for its
next call on that connection, or be cut with FLOW_CONTROL_ERROR. Here a
client sends more than the whole connection window (~4 MiB + 64 KiB) on
such streams, as a raw client would, then calls again on the same
connection: it must be answered.
"""

from __future__ import annotations

import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from grpc_health.v1 import health_pb2
from hyperframe.frame import DataFrame

from prism.rpc.methods import MethodTable
from prism.rpc.server import Connection, ServerSettings

from .h2client import H2Client, Response
from .test_rpc_server import CHECK, FakeHealth, req

FRAME = 16_384
PER_STREAM = 65_530  # a stream's initial window (prism.rpc.budget), less a message prefix
STREAMS = 70  # 4.4 MiB in all: more than the connection window of 4 MiB


async def connected(nursery: trio.Nursery, settings: ServerSettings) -> tuple[Connection, H2Client]:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    conn = Connection(server_stream, settings)
    nursery.start_soon(conn.serve)
    client = H2Client(client_stream, lenient=True)
    await client.start()
    await client.pump()  # the server's SETTINGS and window
    return conn, client


async def flood_data(client: H2Client, sid: int) -> None:
    """A stream window of DATA on ``sid``, raw (the client's h2 knows the
    stream is over and would send nothing), reading what the server sends
    meanwhile as a client does (its WINDOW_UPDATEs, its resets)."""
    sent = 0
    while sent < PER_STREAM:
        n = min(FRAME, PER_STREAM - sent)
        await client.stream.send_all(DataFrame(sid, data=b"\x00" * n).serialize())
        sent += n
        with trio.move_on_after(0):
            await client.pump()


async def drain(client: H2Client) -> None:
    with trio.move_on_after(0.5):
        while await client.pump():
            pass


@pytest.mark.parametrize("ended_by", ["refused", "malformed", "answered"])
async def test_data_on_ended_streams_leaves_the_connection_window_whole(
    ended_by: str, autojump_clock: trio.testing.MockClock
) -> None:
    methods = MethodTable()
    health = FakeHealth()
    methods.add_service(health_pb2.DESCRIPTOR.services_by_name["Health"], health)
    settings = ServerSettings(methods, max_message_bytes=1024)
    async with trio.open_nursery() as nursery:
        conn, client = await connected(nursery, settings)
        if ended_by == "refused":
            # One call at a time from now on; 100 advertised, so that the
            # client's h2 sends the streams the server is to refuse.
            conn.proto.max_concurrent_streams = 1
        hold = await client.start_call(CHECK, req("slow"))  # the one stream allowed
        for _ in range(STREAMS):
            sid = client.conn.get_next_available_stream_id()
            client.responses[sid] = Response()
            if ended_by == "refused":
                client.conn.send_headers(sid, client.headers(CHECK))
            elif ended_by == "malformed":
                client.conn.send_headers(sid, [*client.headers(CHECK), ("connection", "close")])
            else:  # answered at once: RESOURCE_EXHAUSTED for a message over the limit
                client.conn.send_headers(sid, client.headers(CHECK))
                client.conn.send_data(sid, b"\x00" + (10 * 1024).to_bytes(4, "big"))
            await client.flush()
            await drain(client)
            r = client.responses[sid]
            if ended_by == "refused":
                assert r.reset_code == h2.errors.ErrorCodes.REFUSED_STREAM
            elif ended_by == "malformed":
                assert r.reset_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
            else:
                # RESOURCE_EXHAUSTED; the client's half of the stream is
                # still open, and its body goes on.
                assert r.status == 8 and r.ended
            await flood_data(client, sid)
            await drain(client)
        assert not client.goaway, client.goaway_code
        # The stream held open is answered once its slot's call ends; a new
        # call on the same connection is served.
        client.conn.reset_stream(hold)
        await client.flush()
        await drain(client)
        r = await client.call(CHECK, req())
        assert r.status == 0 and not client.goaway
        nursery.cancel_scope.cancel()
