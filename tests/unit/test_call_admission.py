"""Which calls a worker runs: a deadline already passed is DEADLINE_EXCEEDED
without running the handler, on every path (the answer-without-waiting path,
a unary task, server and client streaming; a call forwarded from another
worker in test_forwarding.py), and past ``max_inflight`` a call is RESOURCE_EXHAUSTED at once.

Driven through a real h2 client over in-memory streams, as a client sees it.
``grpc-timeout: 1n`` is tested on the real clock: the nanosecond has passed by
the time the request is complete; on trio's fake clock no time passes within
a step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from prism.api import reflection
from prism.config import ServerConfig
from prism.config.limits import Http2Config
from prism.errors import StatusCode
from prism.rpc.methods import MethodTable
from prism.rpc.server import Connection, ServerSettings
from prism.workers.app import App

from .h2client import H2Client
from .test_rpc_server import CHECK, SERVING, WATCH, FakeHealth, req, status_of

REFLECT = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
EXPIRED = [("grpc-timeout", "1n")]


class FakeReflection:
    """A client-streaming (bidi) method that records whether it ran."""

    def __init__(self) -> None:
        self.ran = 0

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[object], call: object
    ) -> AsyncIterator[object]:
        self.ran += 1
        async for _ in requests:
            pass
        return
        yield


class Server:
    def __init__(self, **kw: int) -> None:
        self.health = FakeHealth()
        self.reflection = FakeReflection()
        methods = MethodTable()
        methods.add_service(health_pb2.DESCRIPTOR.services_by_name["Health"], self.health)
        methods.add_service(reflection.SERVICE, self.reflection)
        self.settings = ServerSettings(methods, **kw)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[H2Client]:
        server_stream, client_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(server_stream, self.settings).serve)
            client = H2Client(client_stream)
            await client.start()
            yield client
            nursery.cancel_scope.cancel()


def refused_calls() -> float:
    return REGISTRY.get_sample_value("prism_calls_refused_total", {"reason": "max_inflight"}) or 0.0


async def test_a_deadline_passed_on_arrival_runs_no_handler_on_any_path() -> None:
    server = Server()
    async with server.client() as client:
        # The answer-without-waiting path (a shared-cache hit): answered OK before.
        r = await client.call(CHECK, req("now"), extra=EXPIRED)
        assert (r.status, r.message) == (StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        # The unary task path.
        r = await client.call(CHECK, req(""), extra=EXPIRED)
        assert (r.status, r.message) == (StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        assert server.health.checked == 0
        # Server streaming: no message, only the status.
        r = await client.call(WATCH, req("5"), extra=EXPIRED)
        assert (r.status, r.messages()) == (StatusCode.DEADLINE_EXCEEDED, [])
        # Client (bidi) streaming: refused on its HEADERS, before the handler starts.
        sid = await client.start_call(REFLECT, None, end=False, extra=EXPIRED)
        r = await client.wait(sid)
        assert r.status == StatusCode.DEADLINE_EXCEEDED
        assert server.reflection.ran == 0
        # A deadline that has not passed: served as ever.
        r = await client.call(CHECK, req(""), extra=[("grpc-timeout", "10S")])
        assert r.status == 0 and status_of(r).status == SERVING
        assert server.settings.inflight == 0


async def test_a_deadline_that_passes_while_the_request_arrives_runs_no_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server()
    async with server.client() as client:
        for service in ("now", ""):
            sid = await client.start_call(CHECK, None, end=False, extra=[("grpc-timeout", "1S")])
            await trio.sleep(1.5)  # the body comes after the deadline
            client.conn.send_data(sid, req(service), end_stream=True)
            await client.flush()
            r = await client.wait(sid)
            assert (r.status, r.message) == (StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        assert server.health.checked == 0


async def test_past_max_inflight_a_call_is_refused_at_once_and_counted() -> None:
    server = Server(max_inflight=2)
    before = refused_calls()
    async with server.client() as one, server.client() as two:
        await one.start_call(CHECK, req("slow"))
        slow = await two.start_call(CHECK, req("slow"))
        while server.health.started < 2:
            await trio.sleep(0)
        assert server.settings.active_calls == 2  # what the heartbeat reports
        # The limit is the worker's: a third call on either connection is refused.
        for client in (one, two):
            r = await client.call(CHECK, req(""))
            assert (r.status, r.message) == (
                StatusCode.RESOURCE_EXHAUSTED,
                "too many calls in flight on this worker",
            )
        assert refused_calls() == before + 2
        # An answer that needs no waiting holds nothing: still served.
        r = await one.call(CHECK, req("now"))
        assert r.status == 0
        # One call ends: the next is served.
        two.conn.reset_stream(slow)
        await two.flush()
        while server.settings.inflight != 1:
            await trio.sleep(0)
        r = await two.call(CHECK, req(""))
        assert r.status == 0 and status_of(r).status == SERVING
    assert server.health.checked == 3


async def test_a_streaming_call_counts_in_flight_while_it_is_open() -> None:
    server = Server(max_inflight=1)
    async with server.client() as client:
        sid = await client.start_call(REFLECT, None, end=False)
        while server.reflection.ran == 0:
            await trio.sleep(0)
        r = await client.call(CHECK, req(""))
        assert r.status == StatusCode.RESOURCE_EXHAUSTED
        client.conn.end_stream(sid)
        await client.flush()
        assert (await client.wait(sid)).status == 0
        while server.settings.inflight:
            await trio.sleep(0)
        assert (await client.call(CHECK, req(""))).status == 0


async def test_a_worker_takes_its_limits_from_the_server_config(tmp_path: Path) -> None:
    http2 = Http2Config(idle_timeout_s=9.0, max_connections=3)
    config = ServerConfig(data_dir=str(tmp_path), max_inflight=7, http2=http2, graceful_timeout_s=2.5)
    app = App(config)
    settings = app.settings
    assert (settings.max_inflight, settings.http2, settings.drain_timeout_s) == (7, http2, 2.5)
    await app.aclose()
