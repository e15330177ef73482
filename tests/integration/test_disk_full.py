"""A full file system under an SQLite namespace: writes answer
RESOURCE_EXHAUSTED (not INTERNAL), the server logs it once (a minute) naming
the file, and reads keep working. A real full file system: a 1 MiB tmpfs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from prism.proto import kv_pb2, kv_pb2_grpc

from .conftest import PrismProcess, tmpfs


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    yield from tmpfs(tmp_path / "small", "size=1m")


def put(stub: kv_pb2_grpc.KeyValueStub, id: str, value: bytes) -> None:
    item = kv_pb2.Item(key=b"k", value=value)
    stub.PutItems(kv_pb2.PutItemsRequest(namespace="small", id=id, items=[item]), timeout=5)


def test_full_disk_is_resource_exhausted_logged_once_and_reads_go_on(tmp_path: Path, small_fs: Path) -> None:
    path = small_fs / "small.sqlite3"
    config = 'workers = 1\n[[namespaces]]\nname = "small"\nbackend = "sqlite"\n'
    config += f'options = {{ path = "{path}" }}\n'
    server = PrismProcess(tmp_path / "data", config)
    server.start()
    try:
        with grpc.insecure_channel(server.endpoint) as channel:
            stub = kv_pb2_grpc.KeyValueStub(channel)
            put(stub, "first", b"kept")
            failures = []
            for i in range(400):  # 4 KiB each: a 1 MiB file system is full well before
                try:
                    put(stub, f"id{i}", os.urandom(4000))
                except grpc.RpcError as exc:
                    failures.append((exc.code(), exc.details()))
                    if len(failures) == 5:
                        break
            assert failures == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "sqlite: disk is full")] * 5
            got = stub.GetItems(kv_pb2.GetItemsRequest(namespace="small", id="first"), timeout=5)
            assert [(i.key, i.value) for i in got.items] == [(b"k", b"kept")]
    finally:
        server.stop()
    assert server.stderr is not None
    full = [line for line in server.stderr.splitlines() if "no space left" in line]
    assert len(full) == 1, server.stderr[-3000:]
    assert f"namespace small: no space left for {path}" in full[0]
