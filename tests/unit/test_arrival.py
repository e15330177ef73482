"""How long a read's bytes waited in the kernel (prism.rpc.arrival), and
what a worker does with it: a call that waited past its deadline before the
worker read it is answered DEADLINE_EXCEEDED without running its handler,
and the wait reaches the shedder. Over real TCP (the kernel stamps packets;
in-memory streams have no stamps and no lag)."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from prism.errors import StatusCode
from prism.limits import shed
from prism.rpc import arrival
from prism.rpc.server import Connection

from .h2client import H2Client, Response
from .test_call_admission import Server
from .test_rpc_server import CHECK, SERVING, req, status_of


def _stamp(seconds_ago: float) -> list[tuple[int, int, bytes]]:
    at = time.time() - seconds_ago
    data = struct.pack("@qq", int(at), int((at % 1) * 1e9))
    return [(socket.SOL_SOCKET, 35, data)]


def test_lag_is_the_age_of_the_stamp_within_bounds() -> None:
    assert 0.29 < arrival.lag(_stamp(0.3)) < 0.5
    assert arrival.lag(_stamp(-5.0)) == 0.0  # the wall clock stepped back: no lag
    assert arrival.lag(_stamp(3600.0)) == arrival.MAX_LAG_S  # stepped forward: at most this
    assert arrival.lag([]) == 0.0  # no stamp
    assert arrival.lag([(socket.SOL_SOCKET, 35, b"\x00" * 4)]) == 0.0  # a short one
    assert arrival.lag([(socket.IPPROTO_IP, 35, _stamp(1.0)[0][2])]) == 0.0  # another level's


def test_only_a_standard_socket_is_stamped() -> None:
    assert arrival.stamp(object()) is None
    with socket.socket() as raw:
        holder = type("Trio", (), {"_sock": raw})()
        assert arrival.stamp(holder) is raw


@asynccontextmanager
async def over_tcp(server: Server) -> AsyncIterator[H2Client]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:

            async def serve_one() -> None:
                await Connection(await listener.accept(), server.settings).serve()

            nursery.start_soon(serve_one)
            client = H2Client(stream)
            await client.start()
            yield client
            nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()
        await listener.aclose()


async def test_a_call_that_waited_past_its_deadline_in_the_kernel_runs_no_handler() -> None:
    server = Server()
    async with over_tcp(server) as client:
        r = await client.call(CHECK, req(""), extra=[("grpc-timeout", "200m")])
        assert r.status == 0 and status_of(r).status == SERVING  # read at once: served
        assert server.health.checked == 1
        before = shed.SHEDDER._sojourns
        # Sent with no checkpoint after it, then this thread (the worker's too)
        # sleeps: the request waits 0.3 s in the kernel, unread.
        sid = client.conn.get_next_available_stream_id()
        client.responses[sid] = Response()
        client.conn.send_headers(sid, client.headers(CHECK, extra=[("grpc-timeout", "200m")]))
        client.conn.send_data(sid, req(""), end_stream=True)
        assert isinstance(client.stream, trio.SocketStream)
        os.write(client.stream.socket.fileno(), client.conn.data_to_send())
        time.sleep(0.3)
        r = await client.wait(sid)
        assert (r.status, r.message) == (StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        assert server.health.checked == 1  # its handler never ran
        assert shed.SHEDDER._sojourns > before  # the reads' waits went to the shedder
