"""The gRPC server core driven by a real h2 client over in-memory streams.

The service under test is grpc.health.v1.Health with a fake implementation
whose behaviour each test picks through the request's ``service`` field.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from grpc_health.v1 import health_pb2
from h2.connection import ConnectionState

from prism.errors import NotFound, StatusCode
from prism.rpc.methods import MethodTable
from prism.rpc.server import Connection, ServerSettings

from .h2client import H2Client, Response, frame

CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def req(service: str = "") -> bytes:
    return frame(health_pb2.HealthCheckRequest(service=service).SerializeToString())


class FakeHealth:
    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.checked = 0  # calls that reached the async handler
        self.in_flight = trio.lowlevel.ParkingLot()

    def CheckNow(self, request: health_pb2.HealthCheckRequest, call: object) -> bytes | None:
        if request.service == "now":
            return health_pb2.HealthCheckResponse(status=NOT_SERVING).SerializeToString()
        if request.service == "now-boom":
            raise RuntimeError("not now")
        return None

    async def Check(
        self, request: health_pb2.HealthCheckRequest, call: object
    ) -> health_pb2.HealthCheckResponse:
        self.checked += 1
        s = request.service
        if s == "slow":
            self.started += 1
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled += 1
                raise
        if s == "boom":
            raise RuntimeError("a bug")
        if s == "missing":
            raise NotFound("no such thing")
        if s == "meta":
            md = dict(call.metadata)  # type: ignore[attr-defined]
            ok = md.get("x-user") == "alice" and md.get("x-raw-bin") == b"\x00\xff"
            return health_pb2.HealthCheckResponse(status=SERVING if ok else NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=SERVING)

    async def List(self, request: object, call: object) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse()

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, call: object
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        for _ in range(int(request.service or "3")):
            yield health_pb2.HealthCheckResponse(status=SERVING)


@asynccontextmanager
async def connected(**kw: int) -> AsyncIterator[tuple[H2Client, FakeHealth, ServerSettings]]:
    impl = FakeHealth()
    methods = MethodTable()
    methods.add_service(health_pb2.DESCRIPTOR.services_by_name["Health"], impl)
    settings = ServerSettings(methods, **kw)
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Connection(server_stream, settings).serve)
        client = H2Client(client_stream)
        await client.start()
        yield client, impl, settings
        nursery.cancel_scope.cancel()


def status_of(r: object) -> health_pb2.HealthCheckResponse:
    msgs = r.messages()  # type: ignore[attr-defined]
    assert len(msgs) == 1
    return health_pb2.HealthCheckResponse.FromString(msgs[0])


async def test_unary_ok() -> None:
    async with connected() as (client, _, _):
        r = await client.call(CHECK, req())
        assert r.headers[":status"] == "200"
        assert r.headers["content-type"] == "application/grpc"
        assert r.status == 0
        assert status_of(r).status == SERVING
        # A second call on the same connection uses the cached header blocks.
        r2 = await client.call(CHECK, req())
        assert r2.status == 0 and r2.headers["content-type"] == "application/grpc"


async def test_an_answer_that_needs_no_waiting_skips_the_handler() -> None:
    seen: list[tuple[str, StatusCode]] = []

    def observe(call: object, method: object, status: StatusCode, seconds: float) -> None:
        seen.append((method.name, status))  # type: ignore[attr-defined]

    async with connected() as (client, impl, settings):
        settings.observer = observe
        r = await client.call(CHECK, req("now"))
        assert r.status == 0 and status_of(r).status == NOT_SERVING
        assert impl.checked == 0  # answered by CheckNow alone
        # None, or an error, from CheckNow: the handler answers as usual.
        r = await client.call(CHECK, req(""))
        assert r.status == 0 and status_of(r).status == SERVING
        r = await client.call(CHECK, req("now-boom"))
        assert r.status == 0 and status_of(r).status == SERVING
        r = await client.call(CHECK, req("missing"))
        assert r.status == StatusCode.NOT_FOUND
        assert impl.checked == 3
    assert seen == [("Health/Check", StatusCode.OK)] * 3 + [("Health/Check", StatusCode.NOT_FOUND)]


async def test_metadata_reaches_handler() -> None:
    async with connected() as (client, _, _):
        r = await client.call(CHECK, req("meta"), extra=[("x-user", "alice"), ("x-raw-bin", "AP8")])
        assert status_of(r).status == SERVING


async def test_prism_error_maps_to_status() -> None:
    async with connected() as (client, _, _):
        r = await client.call(CHECK, req("missing"))
        assert r.status == StatusCode.NOT_FOUND
        assert r.message == "no such thing"


async def test_bug_is_internal_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="prism.rpc")
    async with connected() as (client, _, _):
        r = await client.call(CHECK, req("boom"))
        assert r.status == StatusCode.INTERNAL
        assert "a bug" not in r.message
        assert [rec.exc_info is not None for rec in caplog.records] == [True]
        assert (await client.call(CHECK, req())).status == 0


async def test_unknown_method_and_service() -> None:
    async with connected() as (client, _, _):
        assert (await client.call("/grpc.health.v1.Health/Nope", req())).status == StatusCode.UNIMPLEMENTED
        r = await client.call("/no.Such/Thing", req())
        assert r.status == StatusCode.UNIMPLEMENTED and "/no.Such/Thing" in r.message


async def test_wrong_content_type_is_415() -> None:
    async with connected() as (client, _, _):
        r = await client.call(CHECK, req(), content_type="application/json")
        assert r.headers[":status"] == "415"
        assert (await client.call(CHECK, req())).status == 0


async def test_malformed_protobuf() -> None:
    async with connected() as (client, _, _):
        r = await client.call(CHECK, frame(b"\xff\xff\xff"))
        assert r.status == StatusCode.INVALID_ARGUMENT


async def test_oversized_and_lying_length_prefix() -> None:
    async with connected(max_message_bytes=1024) as (client, _, _):
        r = await client.call(CHECK, frame(b"x" * 2000))
        assert r.status == StatusCode.RESOURCE_EXHAUSTED
        # Claims 2 GiB but sends 10 bytes: refused on the prefix alone.
        r = await client.call(CHECK, frame(b"0123456789", length=2**31 - 1))
        assert r.status == StatusCode.RESOURCE_EXHAUSTED and "2147483647" in r.message
        assert (await client.call(CHECK, req())).status == 0


async def test_truncated_message() -> None:
    async with connected() as (client, _, _):
        r = await client.call(CHECK, frame(b"abc", length=10))
        assert r.status == StatusCode.INVALID_ARGUMENT


async def test_unary_needs_exactly_one_message() -> None:
    async with connected() as (client, _, _):
        r = await client.call(CHECK, None)
        assert r.status == StatusCode.INVALID_ARGUMENT
        r = await client.call(CHECK, req() + req())
        assert r.status == StatusCode.INVALID_ARGUMENT
        assert (await client.call(CHECK, req())).status == 0


async def test_bad_grpc_timeout() -> None:
    async with connected() as (client, _, _):
        r = await client.call(CHECK, req(), extra=[("grpc-timeout", "soon")])
        assert r.status == StatusCode.INVALID_ARGUMENT and "grpc-timeout" in r.message


async def test_deadline_cancels_handler(autojump_clock: trio.testing.MockClock) -> None:
    async with connected() as (client, impl, _):
        start = trio.current_time()
        r = await client.call(CHECK, req("slow"), extra=[("grpc-timeout", "250m")])
        assert r.status == StatusCode.DEADLINE_EXCEEDED
        assert impl.cancelled == 1
        assert 0.25 <= trio.current_time() - start < 0.3


async def test_client_reset_cancels_handler() -> None:
    async with connected() as (client, impl, settings):
        sid = await client.start_call(CHECK, req("slow"))
        while impl.started == 0:
            await trio.sleep(0)
        client.conn.reset_stream(sid)
        await client.flush()
        with trio.fail_after(1):
            while impl.cancelled == 0:
                await trio.sleep(0)
        assert settings.active_calls == 0
        assert (await client.call(CHECK, req())).status == 0


async def test_streams_over_limit_are_refused_one_by_one() -> None:
    async with connected(max_concurrent_streams=2) as (client, _, settings):
        # The client has not read our SETTINGS yet, so it does not know the limit.
        a = await client.start_call(CHECK, req("slow"))
        b = await client.start_call(CHECK, req("slow"))
        c = await client.start_call(CHECK, req())
        r = await client.wait(c)
        assert r.reset_code == 7  # REFUSED_STREAM
        assert not client.responses[a].ended and not client.responses[b].ended
        assert settings.active_calls == 2
        client.conn.reset_stream(a)
        await client.flush()
        while settings.active_calls != 1:
            await trio.sleep(0)
        assert (await client.call(CHECK, req())).status == 0


async def test_server_streaming() -> None:
    async with connected() as (client, _, _):
        r = await client.call(WATCH, req("5"))
        assert r.status == 0
        assert len(r.messages()) == 5


async def test_goaway_with_last_requests_in_same_read() -> None:
    async with connected() as (client, _, _):
        sid = client.conn.get_next_available_stream_id()
        client.responses[sid] = Response()
        client.conn.send_headers(sid, client.headers(CHECK))
        client.conn.send_data(sid, req(), end_stream=True)
        client.conn.close_connection()
        await client.flush()  # one write: request + GOAWAY
        # h2 refuses input after its own GOAWAY; a real client (grpcio) reads on.
        client.conn.state_machine.state = ConnectionState.CLIENT_OPEN
        r = await client.wait(sid)
        assert r.status == 0 and status_of(r).status == SERVING


async def test_protocol_garbage_closes_only_that_connection() -> None:
    impl = FakeHealth()
    methods = MethodTable()
    methods.add_service(health_pb2.DESCRIPTOR.services_by_name["Health"], impl)
    settings = ServerSettings(methods)
    s1, c1 = trio.testing.memory_stream_pair()
    s2, c2 = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Connection(s1, settings).serve)
        nursery.start_soon(Connection(s2, settings).serve)
        await c1.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(1):
            while await c1.receive_some(65536):
                pass  # the server answers GOAWAY and closes
        client = H2Client(c2)
        await client.start()
        assert (await client.call(CHECK, req())).status == 0
        nursery.cancel_scope.cancel()
