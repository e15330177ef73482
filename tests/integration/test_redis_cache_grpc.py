"""The Redis cache tier through a real ``prism serve``: a SQLite namespace with
``cache = { tier = "redis", ... }``, called with grpcio stubs; hits are read
from Prism's own /metrics (admin port) and from the keys in Redis."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from prism.drivers import resp
from prism.proto import kv_pb2, kv_pb2_grpc
from tests.rd import URL, delete_keys, new_prefix

from .conftest import PrismProcess, free_port

pytestmark = pytest.mark.services("redis")

NS = "profiles"


class Server:
    def __init__(self, process: PrismProcess, admin_port: int, prefix: str) -> None:
        self.process = process
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.prefix = prefix

    def counter(self, name: str) -> float:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels.get("namespace") == NS:
                    total += sample.value
        return total

    def entry_keys(self) -> list[bytes]:
        async def scan() -> list[bytes]:
            conn = await resp.connect(resp.Address(URL), timeout_s=5)
            try:
                keys: list[bytes] = []
                cursor = b"0"
                while True:
                    cursor, found = await conn.call("SCAN", cursor, "MATCH", f"{self.prefix}{NS}:e:*")
                    keys += found
                    if cursor == b"0":
                        return keys
            finally:
                conn.close()

        return trio.run(scan)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    prefix = new_prefix()
    admin_port = free_port()
    config = f"""
admin_listen = "127.0.0.1:{admin_port}"
workers = 2

[[namespaces]]
name = "{NS}"
backend = "sqlite"
cache = {{ tier = "redis", url = "{URL}", ttl_s = 30, key_prefix = "{prefix}" }}
"""
    process = PrismProcess(tmp_path / "data", config)
    process.start()
    try:
        yield Server(process, admin_port, prefix)
    finally:
        process.stop()
        trio.run(delete_keys, prefix)


def get(stub: kv_pb2_grpc.KeyValueStub, id: str) -> list[tuple[bytes, bytes]]:
    answer = stub.GetItems(kv_pb2.GetItemsRequest(namespace=NS, id=id), timeout=5)
    return [(i.key, i.value) for i in answer.items]


def test_get_is_cached_in_redis_and_writes_invalidate(server: Server) -> None:
    with grpc.insecure_channel(server.process.endpoint) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        stub.PutItems(
            kv_pb2.PutItemsRequest(namespace=NS, id="u1", items=[kv_pb2.Item(key=b"name", value=b"ada")]),
            timeout=5,
        )
        hits = server.counter("prism_cache_hits_total")
        misses = server.counter("prism_cache_misses_total")

        assert get(stub, "u1") == [(b"name", b"ada")]
        assert get(stub, "u1") == [(b"name", b"ada")]
        assert server.counter("prism_cache_misses_total") == misses + 1
        assert server.counter("prism_cache_hits_total") == hits + 1
        assert len(server.entry_keys()) == 1

        stub.PutItems(
            kv_pb2.PutItemsRequest(namespace=NS, id="u1", items=[kv_pb2.Item(key=b"name", value=b"grace")]),
            timeout=5,
        )
        assert get(stub, "u1") == [(b"name", b"grace")]
        assert get(stub, "u1") == [(b"name", b"grace")]

        stub.MutateItems(
            kv_pb2.MutateItemsRequest(
                namespace=NS,
                id="u1",
                mutations=[kv_pb2.Mutation(put=kv_pb2.Item(key=b"city", value=b"london"))],
            ),
            timeout=5,
        )
        assert get(stub, "u1") == [(b"city", b"london"), (b"name", b"grace")]

        stub.DeleteItems(kv_pb2.DeleteItemsRequest(namespace=NS, id="u1"), timeout=5)
        assert get(stub, "u1") == []
        assert get(stub, "u1") == []
        assert server.counter("prism_cache_hits_total") == hits + 3
        assert server.counter("prism_cache_misses_total") == misses + 4


def test_every_connection_sees_every_write(server: Server) -> None:
    """Several connections (likely on different workers): each GetItems after
    an acknowledged write sees it, whichever worker filled the cache."""
    channels = [grpc.insecure_channel(server.process.endpoint) for _ in range(4)]
    try:
        stubs = [kv_pb2_grpc.KeyValueStub(ch) for ch in channels]
        for n in range(20):
            value = b"%d" % n
            stubs[n % 4].PutItems(
                kv_pb2.PutItemsRequest(namespace=NS, id="r", items=[kv_pb2.Item(key=b"k", value=value)]),
                timeout=5,
            )
            for stub in stubs:
                assert get(stub, "r") == [(b"k", value)]
    finally:
        for ch in channels:
            ch.close()
