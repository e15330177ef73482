"""Malformed requests (RFC 9113 8.2-8.3) and the header list size limit, on the wire.

A lenient h2 client sends header lists that break HTTP/2's rules, as grpcio
never would; the server must reset that stream with PROTOCOL_ERROR and go on
serving the connection. A header block over the advertised
SETTINGS_MAX_HEADER_LIST_SIZE ends the connection (GOAWAY ENHANCE_YOUR_CALM),
and no other.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from grpc_health.v1 import health_pb2
from hpack import Encoder
from hyperframe.frame import HeadersFrame

from prism.config import ServerConfig
from prism.config.limits import Http2Config
from prism.rpc.methods import MethodTable
from prism.rpc.protocol import CALL_END, CALL_RESET, CALL_START, GrpcProtocol
from prism.rpc.server import Connection, ServerSettings
from prism.workers.app import App

from .h2client import H2Client
from .h2client import Response as H2Response
from .test_rpc_server import CHECK, FakeHealth, req

Headers = list[tuple[bytes, bytes]]

BASE: Headers = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", CHECK.encode()),
    (b":authority", b"test"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def replace(name: bytes, value: bytes) -> Callable[[Headers], Headers]:
    return lambda h: [(n, value if n == name else v) for n, v in h]


def without(name: bytes) -> Callable[[Headers], Headers]:
    return lambda h: [(n, v) for n, v in h if n != name]


def adding(*fields: tuple[bytes, bytes]) -> Callable[[Headers], Headers]:
    return lambda h: h + list(fields)


def pseudo_adding(*fields: tuple[bytes, bytes]) -> Callable[[Headers], Headers]:
    return lambda h: list(fields) + h


MALFORMED: dict[str, Callable[[Headers], Headers]] = {
    "duplicate :path (the last would win)": adding((b":path", b"/grpc.health.v1.Health/Watch")),
    "pseudo-header after a regular one": lambda h: h[:2] + h[3:] + h[2:3],
    ":status in a request": pseudo_adding((b":status", b"200")),
    "uppercase name": adding((b"X-User", b"alice")),
    "connection": adding((b"connection", b"close")),
    "transfer-encoding": adding((b"transfer-encoding", b"chunked")),
    "keep-alive": adding((b"keep-alive", b"timeout=5")),
    "proxy-connection": adding((b"proxy-connection", b"keep-alive")),
    "upgrade": adding((b"upgrade", b"h2c")),
    "te gzip": replace(b"te", b"gzip"),
    "CR in a value": adding((b"x-user", b"al\rice")),
    "LF in a value": adding((b"x-user", b"al\nice")),
    "NUL in a value": adding((b"x-user", b"al\x00ice")),
    "CR in a name": adding((b"x-us\rer", b"alice")),
    "LF in a name": adding((b"x-us\ner", b"alice")),
    "NUL in a name": adding((b"x-us\x00er", b"alice")),
    "space in a name": adding((b"x user", b"alice")),
    "colon in a name": adding((b"x:user", b"alice")),
    "empty name": adding((b"", b"alice")),
    "leading space in a value": adding((b"x-user", b" alice")),
    "trailing space in a value": adding((b"x-user", b"alice ")),
    "leading tab in a value": adding((b"x-user", b"\talice")),
    "trailing tab in a value": adding((b"x-user", b"alice\t")),
    "whitespace in :path's value": replace(b":path", CHECK.encode() + b" "),
    "no :scheme": without(b":scheme"),
    "no :method": without(b":method"),
    "no :path": without(b":path"),
    "empty :path": replace(b":path", b""),
    "unknown pseudo-header": pseudo_adding((b":foo", b"bar")),
    ":protocol (never enabled)": pseudo_adding((b":protocol", b"websocket")),
    ":authority and host disagree": adding((b"host", b"other")),
    "host twice": lambda h: [*without(b":authority")(h), (b"host", b"test"), (b"host", b"test")],
    ":authority with userinfo": replace(b":authority", b"user@test"),
    "CONNECT with :path": replace(b":method", b"CONNECT"),
}


Connect = Callable[[], Awaitable[H2Client]]


@asynccontextmanager
async def serving(**kw: int) -> AsyncIterator[tuple[ServerSettings, Connect]]:
    """A server, and a function that opens a lenient client connection to it."""
    methods = MethodTable()
    methods.add_service(health_pb2.DESCRIPTOR.services_by_name["Health"], FakeHealth())
    settings = ServerSettings(methods, **kw)
    async with trio.open_nursery() as nursery:

        async def connect() -> H2Client:
            server_stream, client_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(Connection(server_stream, settings).serve)
            client = H2Client(client_stream, lenient=True)
            await client.start()
            return client

        yield settings, connect
        nursery.cancel_scope.cancel()


async def served(client: H2Client) -> bool:
    sid = await client.send_raw_headers(BASE, req())
    r = await client.wait(sid)
    return r.status == 0 and r.headers.get(":status") == "200"


@pytest.mark.parametrize("case", MALFORMED)
async def test_a_malformed_request_is_reset_and_the_connection_goes_on(case: str) -> None:
    headers = MALFORMED[case](list(BASE))
    async with serving() as (settings, connect):
        client = await connect()
        # Three times: the client's HPACK encoder sends the block first with
        # new table entries, then as the same repeated bytes, which the
        # server answers from its decoded-block cache.
        for _ in range(3):
            sid = await client.send_raw_headers(headers, req())
            r = await client.wait(sid)
            assert r.reset_code == h2.errors.ErrorCodes.PROTOCOL_ERROR, case
            assert not r.headers and not r.data
            assert await served(client)
        assert not client.goaway
        assert settings.active_calls == 0


@pytest.mark.parametrize(
    "case, change",
    [
        ("host equal to :authority", adding((b"host", b"test"))),
        ("host equal but for case and the default port", adding((b"host", b"TEST:80"))),
        ("neither :authority nor host", without(b":authority")),
        ("te Trailers", replace(b"te", b"Trailers")),
        ("no te", without(b"te")),
        ("empty value", adding((b"x-user", b""))),
        ("inner whitespace and visible bytes in a value", adding((b"x-user", b"a b\tc\x7f\xff"))),
        ("token characters in a name", adding((b"x-!#$%&'*+-.^_`|~09", b"v"))),
    ],
)
async def test_well_formed_variants_are_served(case: str, change: Callable[[Headers], Headers]) -> None:
    async with serving() as (_, connect):
        client = await connect()
        sid = await client.send_raw_headers(change(list(BASE)), req())
        r = await client.wait(sid)
        assert r.reset_code is None and r.status == 0, case


async def test_a_well_formed_connect_is_not_reset_but_not_served() -> None:
    async with serving() as (_, connect):
        client = await connect()
        headers = [(b":method", b"CONNECT"), (b":authority", b"test:443")]
        r = await client.wait(await client.send_raw_headers(headers, None))
        assert r.reset_code is None and r.headers[":status"] == "405"
        assert await served(client)


async def test_the_header_list_limit_is_advertised() -> None:
    async with serving() as (_, connect):
        client = await connect()
        await client.pump()
        assert client.conn.remote_settings.max_header_list_size == 16 * 1024
    async with serving(max_header_list_bytes=2048) as (_, connect):
        client = await connect()
        await client.pump()
        assert client.conn.remote_settings.max_header_list_size == 2048


async def test_the_configured_limit_reaches_the_workers_connections(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=str(tmp_path), http2=Http2Config(max_header_list_bytes=4096))
    settings = App(config).settings
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Connection(server_stream, settings).serve)
        client = H2Client(client_stream)
        await client.start()
        await client.pump()
        assert client.conn.remote_settings.max_header_list_size == 4096
        nursery.cancel_scope.cancel()


def metadata_of_size(decoded: int) -> Headers:
    """BASE plus one field making the list ``decoded`` bytes as HPACK counts
    them (RFC 9113 6.5.2: name + value + 32 per field)."""
    size = sum(len(n) + len(v) + 32 for n, v in BASE)
    return [*BASE, (b"x-big", b"v" * (decoded - size - len(b"x-big") - 32))]


@pytest.mark.parametrize("acknowledged", [False, True])
async def test_a_header_list_over_the_limit_ends_that_connection_only(acknowledged: bool) -> None:
    async with serving() as (_, connect):
        client = await connect()
        other = await connect()
        if acknowledged:  # the client has seen and acknowledged our SETTINGS
            await client.pump()
            assert await served(client)
        sid = await client.send_raw_headers(metadata_of_size(16 * 1024), req())
        assert (await client.wait(sid)).status == 0  # at the limit: served
        await client.send_raw_headers(metadata_of_size(16 * 1024 + 1), req())
        with trio.fail_after(5):
            await client.read_to_eof()
        assert client.goaway_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert await served(other)


def test_an_hpack_bomb_is_refused_before_it_is_decoded() -> None:
    # One 4 KiB table entry, then a block that refers to it 10,000 times:
    # 40 MB if it were decoded in full. The decoder stops at the limit.
    server = GrpcProtocol()
    server.initiate()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    encoder = Encoder()
    big = [(b"x-big", b"v" * 4000)]
    first = HeadersFrame(1, data=encoder.encode(BASE + big), flags=["END_HEADERS", "END_STREAM"])
    assert [kind for kind, _ in server.receive_data(first.serialize())] == [CALL_START, CALL_END]
    reference = encoder.encode(big)  # now one byte: the entry's index
    assert len(reference) == 1
    bomb = HeadersFrame(3, data=encoder.encode(BASE) + reference * 10_000, flags=["END_HEADERS"])
    tracemalloc.start()
    try:
        server.receive_data(bomb.serialize())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert server.broken
    assert peak < 1024 * 1024
    goaway = [
        e for e in client.receive_data(server.data_to_send()) if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert [e.error_code for e in goaway] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]


# -- trailers (RFC 9113 8.1: no pseudo-header; fields as in a request) ----------

MALFORMED_TRAILERS: dict[str, Headers] = {
    "a pseudo-header": [(b":path", CHECK.encode())],
    ":status": [(b":status", b"200")],
    "connection": [(b"connection", b"close")],
    "transfer-encoding": [(b"transfer-encoding", b"chunked")],
    "te gzip": [(b"te", b"gzip")],
    "uppercase name": [(b"X-Checksum", b"abc")],
    "CR in a value": [(b"x-checksum", b"a\rbc")],
    "LF in a value": [(b"x-checksum", b"a\nbc")],
    "NUL in a value": [(b"x-checksum", b"a\x00bc")],
    "NUL in a name": [(b"x-check\x00sum", b"abc")],
    "a good field, then a bad one": [(b"x-checksum", b"abc"), (b"Upgrade", b"h2c")],
}


async def send_with_trailers(client: H2Client, trailers: Headers) -> int:
    """A whole request, then trailers with END_STREAM (a lenient client's)."""
    sid = client.conn.get_next_available_stream_id()
    client.responses[sid] = H2Response()
    client.conn.send_headers(sid, BASE)
    client.conn.send_data(sid, req())
    client.conn.send_headers(sid, trailers, end_stream=True)
    await client.flush()
    return sid


@pytest.mark.parametrize("case", MALFORMED_TRAILERS)
async def test_malformed_trailers_reset_the_stream_and_the_connection_goes_on(case: str) -> None:
    async with serving() as (settings, connect):
        client = await connect()
        for _ in range(2):  # a new header block, then the same bytes again
            r = await client.wait(await send_with_trailers(client, MALFORMED_TRAILERS[case]))
            assert r.reset_code == h2.errors.ErrorCodes.PROTOCOL_ERROR, case
            assert not r.headers and not r.data
            assert await served(client)
        assert not client.goaway
        assert settings.active_calls == 0


async def test_well_formed_trailers_are_served() -> None:
    async with serving() as (_, connect):
        client = await connect()
        trailers = [(b"x-checksum", b"abc"), (b"te", b"trailers"), (b"x-empty", b"")]
        r = await client.wait(await send_with_trailers(client, trailers))
        assert r.reset_code is None and r.status == 0


def test_malformed_trailers_cancel_a_call_already_started() -> None:
    proto = GrpcProtocol()
    proto.initiate()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, BASE)
    events = proto.receive_data(client.data_to_send())
    (call,) = (c for k, c in events if k == CALL_START)
    client.send_headers(1, [(b"x-checksum", b"a\nb")], end_stream=True)
    assert proto.receive_data(client.data_to_send()) == [(CALL_RESET, call)]
    assert call.done and proto.idle
    client.receive_data(proto.data_to_send())
    assert client.streams[1].closed
