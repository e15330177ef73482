"""A PostgreSQL namespace through the real server: the KeyValue calls, and a
slow backend answered DEADLINE_EXCEEDED with its query cancelled server-side."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from prism.proto import kv_pb2, kv_pb2_grpc
from tests.pg import DSN

from .conftest import PrismProcess

pytestmark = pytest.mark.services("postgres")


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[tuple[PrismProcess, str]]:
    name = f"prism_test_{uuid.uuid4().hex[:12]}"
    # One worker: a second one still opening the namespace (CREATE ... IF NOT
    # EXISTS) when the test locks the tables would wait on that lock too.
    config = (
        f'workers = 1\n[[namespaces]]\nname = "{name}"\nbackend = "postgres"\noptions = {{ dsn = "{DSN}" }}\n'
    )
    server = PrismProcess(tmp_path / "data", config)
    server.start()
    try:
        yield server, name
    finally:
        server.stop()
        with psycopg.connect(DSN, autocommit=True) as conn:
            for (table,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (f"prism_kv_{name}%",)
            ).fetchall():
                conn.execute(f'DROP TABLE IF EXISTS "{table}"'.encode())


def test_postgres_namespace_serves_and_cancels_slow_queries(pg_server: tuple[PrismProcess, str]) -> None:
    server, ns = pg_server
    with grpc.insecure_channel(server.endpoint) as ch:
        kv = kv_pb2_grpc.KeyValueStub(ch)
        kv.PutItems(kv_pb2.PutItemsRequest(namespace=ns, id="r", items=[kv_pb2.Item(key=b"k", value=b"v")]))
        got = kv.GetItems(kv_pb2.GetItemsRequest(namespace=ns, id="r"), timeout=5)
        assert [(i.key, i.value) for i in got.items] == [(b"k", b"v")]
        with psycopg.connect(DSN) as locker:
            tables = [
                t
                for (t,) in locker.execute(
                    "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (f"prism_kv_{ns}%",)
                ).fetchall()
            ]
            for table in tables:
                locker.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE'.encode())
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                kv.GetItems(kv_pb2.GetItemsRequest(namespace=ns, id="r"), timeout=0.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 1.5
            # The server-side query is gone: nothing of ours waits on the lock.
            deadline = time.monotonic() + 2
            while True:
                with psycopg.connect(DSN, autocommit=True) as watcher:
                    waiting = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> %s",
                        (locker.info.backend_pid,),
                    ).fetchone()
                if waiting is not None and waiting[0] == 0:
                    break
                if time.monotonic() >= deadline:
                    with psycopg.connect(DSN, autocommit=True) as watcher:
                        rows = watcher.execute(
                            "SELECT pid, application_name, state, query FROM pg_stat_activity"
                            " WHERE wait_event_type = 'Lock'"
                        ).fetchall()
                    raise AssertionError(f"the cancelled query still waits in PostgreSQL: {rows}")
                time.sleep(0.05)
            locker.rollback()
        got = kv.GetItems(kv_pb2.GetItemsRequest(namespace=ns, id="r"), timeout=5)
        assert [(i.key, i.value) for i in got.items] == [(b"k", b"v")]
