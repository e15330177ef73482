"""Compressed calls through stock grpcio clients against a real ``prism serve``.

grpcio compresses requests with ``compression=`` (on the channel or the
call) and inflates answers itself, so what these show is that every kind of
call works compressed both ways; the bytes on the wire (flags, headers) are
checked in ``tests/unit/test_compression.py``. The bomb is sent raw, to the
real worker, whose peak RSS is read from /proc.
"""

from __future__ import annotations

import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from prism.proto import kv_pb2, kv_pb2_grpc, pubsub_pb2, pubsub_pb2_grpc

from .conftest import PrismProcess

CONFIG = """
max_message_bytes = 2097152

[[namespaces]]
name = "kv"
backend = "memory"

[[namespaces]]
name = "topics"
abstraction = "pubsub"
backend = "memory"
"""
COMPRESSIONS = [grpc.Compression.Gzip, grpc.Compression.Deflate]
# 1.5 MiB that deflates to a few KiB: over grpcio's and the server's frame
# and window sizes as it is, one frame compressed.
VALUE = b"".join(b"item %07d of a long and repetitive value; " % i for i in range(36_000))[: 3 << 19]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrismProcess]:
    proc = PrismProcess(tmp_path / "data", CONFIG)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def put_and_get(stub: kv_pb2_grpc.KeyValueStub, **call: object) -> list[bytes]:
    stub.PutItems(
        kv_pb2.PutItemsRequest(namespace="kv", id="big", items=[kv_pb2.Item(key=b"k", value=VALUE)]),
        timeout=10,
        **call,
    )
    answer = stub.GetItems(kv_pb2.GetItemsRequest(namespace="kv", id="big"), timeout=10, **call)
    return [i.value for i in answer.items]


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=["gzip", "deflate"])
def test_unary_calls_compressed_both_ways_on_the_channel_or_the_call(
    server: PrismProcess, compression: grpc.Compression
) -> None:
    with grpc.insecure_channel(server.endpoint, compression=compression) as channel:
        assert put_and_get(kv_pb2_grpc.KeyValueStub(channel)) == [VALUE]
    with grpc.insecure_channel(server.endpoint) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        assert put_and_get(stub, compression=compression) == [VALUE]
        assert put_and_get(stub) == [VALUE]  # and uncompressed beside them


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=["gzip", "deflate"])
def test_a_server_stream_and_a_bidi_stream_compressed(
    server: PrismProcess, compression: grpc.Compression
) -> None:
    with grpc.insecure_channel(server.endpoint, compression=compression) as channel:
        stub = pubsub_pb2_grpc.PubSubStub(channel)
        for n in range(3):
            stub.Publish(
                pubsub_pb2.PublishRequest(namespace="topics", topic="t", payload=VALUE[n:]), timeout=10
            )
        stream = stub.Subscribe(
            pubsub_pb2.SubscribeRequest(
                namespace="topics",
                topic="t",
                group="g",
                start=pubsub_pb2.StartPosition(kind=pubsub_pb2.StartPosition.Kind.EARLIEST),
            ),
            timeout=10,
        )
        got = [next(stream).payload for _ in range(3)]
        stream.cancel()
        assert got == [VALUE, VALUE[1:], VALUE[2:]]

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        asks = [reflection_pb2.ServerReflectionRequest(list_services="") for _ in range(3)]
        answers = list(reflection.ServerReflectionInfo(iter(asks), timeout=10))
        assert len(answers) == 3
        assert all(
            "prism.kv.v1.KeyValue" in [s.name for s in a.list_services_response.service] for a in answers
        )


def test_answers_compressed_for_every_accepting_client_as_configured(tmp_path: Path) -> None:
    # A stock client that compresses nothing still lists gzip in its
    # grpc-accept-encoding: with "accepting_clients" its answers come gzipped
    # (the bytes: tests/unit/test_compression.py) and it reads them as ever.
    proc = PrismProcess(tmp_path / "data", 'compress_answers = "accepting_clients"\n' + CONFIG)
    proc.start()
    try:
        with grpc.insecure_channel(proc.endpoint) as channel:
            assert put_and_get(kv_pb2_grpc.KeyValueStub(channel)) == [VALUE]
    finally:
        proc.stop()


def gzip_bomb(total: int = 1 << 30) -> bytes:
    """``total`` zero bytes gzipped in ~1 KiB a MiB (see tests/unit/test_compression.py)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + block * (total >> 20) + b"\x03\x00" + bytes(8)


def raw_call(endpoint: str, headers: list[tuple[str, str]], body: bytes) -> dict[str, str]:
    """One call on a plain h2 connection; its trailers (or trailers-only headers)."""
    host, port = endpoint.rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/prism.kv.v1.KeyValue/PutItems"),
                (":authority", endpoint),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *headers,
            ],
        )
        sock.sendall(conn.data_to_send())
        pos, result = 0, {}
        while not result:
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(body) - pos)
            if room > 0:
                conn.send_data(sid, body[pos : pos + room], end_stream=pos + room == len(body))
                pos += room
            else:
                data = sock.recv(65536)
                assert data, "the server closed the connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                        fields = dict(event.headers)  # type: ignore[arg-type]
                        if "grpc-status" in fields:
                            result = fields
            sock.sendall(conn.data_to_send())
        return result


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_gzip_bomb_is_refused_and_the_worker_does_not_grow(server: PrismProcess) -> None:
    bomb = gzip_bomb()  # 1 GiB of zeros
    assert len(bomb) < 1 << 20 + 1
    with grpc.insecure_channel(server.endpoint) as channel:
        kv_pb2_grpc.KeyValueStub(channel).PutItems(
            kv_pb2.PutItemsRequest(namespace="kv", id="warm", items=[kv_pb2.Item(key=b"k", value=VALUE)]),
            timeout=10,
        )
    assert server.proc is not None
    processes = children(server.proc.pid)  # the worker, the admin process
    before = {pid: peak_rss_kib(pid) for pid in processes}
    message = b"\x01" + len(bomb).to_bytes(4, "big") + bomb
    started = time.monotonic()
    answer = raw_call(server.endpoint, [("grpc-encoding", "gzip")], message)
    assert answer["grpc-status"] == "8", answer  # RESOURCE_EXHAUSTED
    assert answer["grpc-message"] == "gzip message inflates past the maximum of 2097152 bytes"
    assert time.monotonic() - started < 10
    grown = {pid: peak_rss_kib(pid) - kib for pid, kib in before.items()}
    # The compressed message (1 MiB) and at most the limit (2 MiB) inflated,
    # and its copy: a few MiB, where inflating it all would be 1 GiB.
    assert max(grown.values()) < 12 * 1024, grown
    # The worker serves on.
    with grpc.insecure_channel(server.endpoint, compression=grpc.Compression.Gzip) as channel:
        assert put_and_get(kv_pb2_grpc.KeyValueStub(channel)) == [VALUE]
