"""Compressed messages as a client sees them on the wire (gRPC's doc/compression.md).

An App on a memory namespace, a raw h2 client: what grpcio hides (the
compressed flag of each answer, its ``grpc-encoding``) and what it never
sends (an unknown encoding, a flag without one, a bomb) are visible here.
Stock grpcio clients are in ``tests/integration/test_compression_grpc.py``.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h2.config
import h2.connection
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from prism.config import NamespaceConfig, ServerConfig
from prism.errors import StatusCode
from prism.proto import kv_pb2
from prism.rpc.budget import ConnectionBudget, WorkerBudget
from prism.rpc.compression import MessageError, frame, inflate
from prism.rpc.protocol import CALL_END, GrpcProtocol
from prism.workers.app import App

from .apps import serving_app
from .h2client import H2Client, Response

PUT = "/prism.kv.v1.KeyValue/PutItems"
GET = "/prism.kv.v1.KeyValue/GetItems"
WBITS = {"gzip": 31, "deflate": 15}
ACCEPTED = "identity,deflate,gzip"
RAW_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/s/M"),
    (":authority", "x"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("grpc-encoding", "gzip"),
]
# Compressible, and larger than compression_min_bytes (1 KiB by default).
VALUE = b"the same words again and again; " * 4096


def deflated(encoding: str, data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, WBITS[encoding])
    return packer.compress(data) + packer.flush()


def message(payload: bytes, *, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


def put_request(value: bytes = VALUE) -> bytes:
    return kv_pb2.PutItemsRequest(
        namespace="m", id="r", items=[kv_pb2.Item(key=b"k", value=value)]
    ).SerializeToString()


def get_request() -> bytes:
    return kv_pb2.GetItemsRequest(namespace="m", id="r").SerializeToString()


def answer(r: Response) -> tuple[int, bytes]:
    """The one answer message's flag and its body, inflated if flagged."""
    data = bytes(r.data)
    flag, n = data[0], int.from_bytes(data[1:5], "big")
    assert len(data) == 5 + n
    body = data[5:]
    if flag:
        body = zlib.decompress(body, WBITS[r.headers["grpc-encoding"]])
    return flag, body


def gzip_bomb(total: int = 1 << 30) -> bytes:
    """A gzip member of ``total`` zero bytes (~1 KiB per MiB): the same
    full-flushed deflate block over and over (its CRC is left wrong: nothing
    that honours the limit reads that far)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + block * (total >> 20) + b"\x03\x00" + bytes(8)


async def send_body(client: H2Client, sid: int, body: bytes) -> None:
    """Send ``body`` on ``sid`` as flow control allows, then end the stream
    (or stop early, once the server has answered)."""
    conn, pos = client.conn, 0
    while pos < len(body) and not client.responses[sid].ended:
        room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(body) - pos)
        if room <= 0:
            await client.pump()
            continue
        conn.send_data(sid, body[pos : pos + room], end_stream=pos + room == len(body))
        pos += room
        await client.flush()


@asynccontextmanager
async def served(tmp_path: Path, **config: int | str) -> AsyncIterator[H2Client]:
    app = App(ServerConfig(data_dir=str(tmp_path / "data"), **config))  # type: ignore[arg-type]
    await app.apply([NamespaceConfig("m", backend="memory")])
    async with serving_app(app) as client:
        yield client


async def call(client: H2Client, path: str, body: bytes, headers: list[tuple[str, str]]) -> Response:
    sid = await client.start_call(path, None, end=False, extra=headers)
    await send_body(client, sid, body)
    return await client.wait(sid)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_request_is_taken_and_a_large_answer_comes_back_compressed_the_same_way(
    tmp_path: Path, encoding: str
) -> None:
    headers = [("grpc-encoding", encoding), ("grpc-accept-encoding", ACCEPTED)]
    async with served(tmp_path) as client:
        body = deflated(encoding, put_request())
        assert len(body) < 16_384 < len(put_request())  # one frame carries it
        r = await call(client, PUT, message(body, flag=1), headers)
        assert (r.status, r.message) == (0, "")
        r = await call(client, GET, message(deflated(encoding, get_request()), flag=1), headers)
        assert r.status == 0
        assert r.headers["grpc-encoding"] == encoding
        assert r.headers["grpc-accept-encoding"] == ACCEPTED
        flag, body = answer(r)
        assert flag == 1 and len(r.data) < len(VALUE) // 10
        assert [i.value for i in kv_pb2.GetItemsResponse.FromString(body).items] == [VALUE]


async def test_an_answer_under_the_threshold_goes_uncompressed(tmp_path: Path) -> None:
    headers = [("grpc-encoding", "gzip"), ("grpc-accept-encoding", ACCEPTED)]
    async with served(tmp_path, compression_min_bytes=len(VALUE) * 2) as client:
        r = await call(client, PUT, message(deflated("gzip", put_request()), flag=1), headers)
        assert r.status == 0
        r = await call(client, GET, message(deflated("gzip", get_request()), flag=1), headers)
        assert r.status == 0
        flag, body = answer(r)
        assert flag == 0
        assert [i.value for i in kv_pb2.GetItemsResponse.FromString(body).items] == [VALUE]


@pytest.mark.parametrize(
    "headers",
    [
        [("grpc-accept-encoding", ACCEPTED)],  # a stock client that does not compress: identity
        [("grpc-encoding", "identity"), ("grpc-accept-encoding", ACCEPTED)],
        [("grpc-encoding", "gzip"), ("grpc-accept-encoding", "identity,deflate")],  # gzip not accepted
        [("grpc-encoding", "gzip")],  # nothing accepted
    ],
)
async def test_an_answer_is_compressed_only_for_a_compressed_call_whose_client_accepts_it(
    tmp_path: Path, headers: list[tuple[str, str]]
) -> None:
    compressed = dict(headers).get("grpc-encoding") == "gzip"

    def body(raw: bytes) -> bytes:
        return message(deflated("gzip", raw), flag=1) if compressed else message(raw)

    async with served(tmp_path) as client:
        assert (await call(client, PUT, body(put_request()), headers)).status == 0
        r = await call(client, GET, body(get_request()), headers)
        assert r.status == 0
        assert "grpc-encoding" not in r.headers
        assert r.headers["grpc-accept-encoding"] == ACCEPTED
        flag, raw = answer(r)
        assert flag == 0
        assert [i.value for i in kv_pb2.GetItemsResponse.FromString(raw).items] == [VALUE]


@pytest.mark.parametrize(
    ("accept", "expected"),
    [(ACCEPTED, "gzip"), ("identity, deflate", "deflate"), ("identity", None), (None, None)],
)
async def test_with_compress_answers_accepting_clients_an_uncompressed_call_is_answered_compressed(
    tmp_path: Path, accept: str | None, expected: str | None
) -> None:
    headers = [] if accept is None else [("grpc-accept-encoding", accept)]
    async with served(tmp_path, compress_answers="accepting_clients") as client:
        r = await call(client, PUT, message(put_request()), headers)
        assert r.status == 0
        assert "grpc-encoding" not in r.headers  # its answer is a few bytes: under the threshold
        r = await call(client, GET, message(get_request()), headers)
        assert r.status == 0
        assert r.headers.get("grpc-encoding") == expected
        flag, body = answer(r)
        assert flag == (expected is not None)
        assert [i.value for i in kv_pb2.GetItemsResponse.FromString(body).items] == [VALUE]


async def test_an_unknown_encoding_is_unimplemented_naming_ours(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        r = await call(client, PUT, message(put_request(b"v"), flag=1), [("grpc-encoding", "snappy")])
        assert r.status == StatusCode.UNIMPLEMENTED
        assert "snappy" in r.message
        assert r.headers["grpc-accept-encoding"] == ACCEPTED  # (trailers-only: in its one HEADERS)


@pytest.mark.parametrize(
    ("headers", "flag", "why"),
    [
        ([], 1, "compressed message without grpc-encoding"),
        ([("grpc-encoding", "identity")], 1, "compressed message without grpc-encoding"),
        ([("grpc-encoding", "gzip")], 2, "message flag 2 is neither 0 nor 1 (compressed)"),
    ],
)
async def test_a_compressed_flag_without_an_encoding_is_internal(
    tmp_path: Path, headers: list[tuple[str, str]], flag: int, why: str
) -> None:
    async with served(tmp_path) as client:
        r = await call(client, PUT, message(deflated("gzip", put_request(b"v")), flag=flag), headers)
        assert (r.status, r.message) == (StatusCode.INTERNAL, why)


async def test_a_message_that_does_not_inflate_is_internal(tmp_path: Path) -> None:
    async with served(tmp_path) as client:
        cut = deflated("gzip", put_request())[:-12]
        r = await call(client, PUT, message(cut, flag=1), [("grpc-encoding", "gzip")])
        assert (r.status, r.message) == (StatusCode.INTERNAL, "gzip message is cut short")
        r = await call(client, PUT, message(b"not gzip at all", flag=1), [("grpc-encoding", "gzip")])
        assert r.status == StatusCode.INTERNAL
        assert r.message.startswith("gzip message does not inflate")
        # The connection serves on.
        r = await call(
            client,
            PUT,
            message(deflated("deflate", put_request(b"v")), flag=1),
            [("grpc-encoding", "deflate")],
        )
        assert r.status == 0


async def test_a_gzip_bomb_is_resource_exhausted_without_inflating_past_the_limit(tmp_path: Path) -> None:
    bomb = gzip_bomb()  # 1 GiB of zeros in ~1 MiB
    assert len(bomb) < 2 << 20
    limit = 4 << 20
    async with served(tmp_path, max_message_bytes=limit) as client:
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            sid = await client.start_call(PUT, None, end=False, extra=[("grpc-encoding", "gzip")])
            await send_body(client, sid, message(bomb, flag=1))
            r = await client.wait(sid)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert r.status == StatusCode.RESOURCE_EXHAUSTED
        assert r.message == f"gzip message inflates past the maximum of {limit} bytes"
        # Everything this process allocated meanwhile (the client's copy of
        # the bomb and its frames too): a few times the limit at most, where
        # inflating it all would have been 1 GiB.
        assert peak < 4 * limit, peak
        # The connection serves on.
        r = await call(client, PUT, message(put_request(b"v")), [])
        assert r.status == 0


REFLECT = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def messages(r: Response) -> list[tuple[int, bytes]]:
    """Each answer message's flag, and its body inflated if flagged."""
    out, data = [], bytes(r.data)
    while data:
        flag, n = data[0], int.from_bytes(data[1:5], "big")
        body = data[5 : 5 + n]
        out.append((flag, zlib.decompress(body, WBITS[r.headers["grpc-encoding"]]) if flag else body))
        data = data[5 + n :]
    return out


async def test_a_streaming_call_takes_compressed_messages_and_answers_each_compressed(tmp_path: Path) -> None:
    ask = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    headers = [("grpc-encoding", "deflate"), ("grpc-accept-encoding", "deflate")]
    async with served(tmp_path, compression_min_bytes=0) as client:
        body = (
            message(deflated("deflate", ask), flag=1)
            + message(ask)
            + message(deflated("deflate", ask), flag=1)
        )
        r = await call(client, REFLECT, body, headers)
        assert r.status == 0
        assert r.headers["grpc-encoding"] == "deflate"
        answers = messages(r)
        assert [flag for flag, _ in answers] == [1, 1, 1]
        for _, raw in answers:
            names = [
                s.name
                for s in reflection_pb2.ServerReflectionResponse.FromString(
                    raw
                ).list_services_response.service
            ]
            assert "prism.kv.v1.KeyValue" in names


@pytest.mark.parametrize(
    ("headers", "body", "status", "why"),
    [
        ([("grpc-encoding", "gzip")], message(gzip_bomb(16 << 20), flag=1), 8, "inflates past the maximum"),
        ([], message(b"x", flag=1), 13, "compressed message without grpc-encoding"),
        (
            [("grpc-encoding", "gzip")],
            message(b"not gzip at all", flag=1),
            13,
            "gzip message does not inflate",
        ),
    ],
)
async def test_a_streaming_call_refuses_a_message_as_a_unary_one_does(
    tmp_path: Path, headers: list[tuple[str, str]], body: bytes, status: int, why: str
) -> None:
    ask = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    async with served(tmp_path, max_message_bytes=4 << 20) as client:
        r = await call(client, REFLECT, message(ask) + body, headers)
        assert r.status == status
        assert why in r.message
        assert len(messages(r)) == 1  # the message before it was answered


def test_an_inflated_message_is_held_against_the_budget_until_it_is_answered() -> None:
    budget = ConnectionBudget(16 << 20, WorkerBudget(512 << 20))
    server = GrpcProtocol(budget=budget)
    server.initiate()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(k.encode(), v.encode()) for k, v in RAW_HEADERS])
    payload = bytes(1 << 20)
    client.send_data(sid, message(deflated("gzip", payload), flag=1), end_stream=True)
    ended = [c for kind, c in server.receive_data(client.data_to_send()) if kind == CALL_END]
    assert [c.messages for c in ended if c is not None] == [[payload]]
    assert budget.held == len(payload) + 5  # as if it had come uncompressed
    server.send_unary(ended[0], b"ok")  # type: ignore[arg-type]
    client.receive_data(server.data_to_send())
    assert budget.held == 0 and budget.worker.held == 0


def test_inflate_stops_at_the_limit_and_tells_over_from_exactly() -> None:
    data = deflated("gzip", bytes(1000))
    assert inflate(b"gzip", data, 1000) == bytes(1000)
    with pytest.raises(MessageError) as caught:
        inflate(b"gzip", data, 999)
    assert caught.value.grpc_status == StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(MessageError) as caught:
        inflate(b"gzip", data + b"more", 1000)
    assert caught.value.grpc_status == StatusCode.INTERNAL


def test_an_answer_that_does_not_shrink_goes_as_it_is() -> None:
    # Small, random, or (over 16 KiB) random at its start: the probe gives up there.
    for payload in (b"x", os.urandom(4096), os.urandom(1 << 20), os.urandom(65536) + VALUE):
        prefix, body = frame(b"gzip", payload, 0)
        assert (prefix, body) == (len(payload).to_bytes(5, "big"), payload)
    for payload in (VALUE, VALUE * 8, VALUE[:65536] + os.urandom(65536)):
        prefix, body = frame(b"gzip", payload, 0)
        assert prefix == b"\x01" + len(body).to_bytes(4, "big")
        assert zlib.decompress(body, 31) == payload
