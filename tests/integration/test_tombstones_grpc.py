"""No resurrection after a delete, through a real ``prism serve`` and stock
grpcio stubs, on every KeyValue backend and through both GetItems caches: a
put stamped before a delete (a retry that arrives late) is acknowledged and
changes nothing, and no cache serves the item it would have put back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import psycopg
import pytest
import trio

from prism.proto import common_pb2, kv_pb2, kv_pb2_grpc
from tests.pg import DSN
from tests.rd import URL, delete_keys, new_prefix

from .conftest import PrismProcess

pytestmark = pytest.mark.services("postgres", "redis")

PG_NS = f"prism_test_{uuid.uuid4().hex[:12]}"
NAMESPACES = ["mem", "lite", PG_NS, "rd", "lite_shared_cache", "lite_redis_cache"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismProcess]:
    prefix = new_prefix()
    config = f"""
workers = 1  # the memory backend lives in one process

[[namespaces]]
name = "mem"
backend = "memory"

[[namespaces]]
name = "lite"
backend = "sqlite"

[[namespaces]]
name = "{PG_NS}"
backend = "postgres"
options = {{ dsn = "{DSN}" }}

[[namespaces]]
name = "rd"
backend = "redis"
options = {{ url = "{URL}", key_prefix = "{prefix}" }}

[[namespaces]]
name = "lite_shared_cache"
backend = "sqlite"
cache = {{ enabled = true, ttl_s = 30 }}

[[namespaces]]
name = "lite_redis_cache"
backend = "sqlite"
cache = {{ tier = "redis", url = "{URL}", ttl_s = 30, key_prefix = "{prefix}cache:" }}
"""
    process = PrismProcess(tmp_path_factory.mktemp("tombstones") / "data", config)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        trio.run(delete_keys, prefix)
        with psycopg.connect(DSN, autocommit=True) as conn:
            for suffix in ("", "_idem", "_tomb"):
                conn.execute(f'DROP TABLE IF EXISTS "prism_kv_{PG_NS}{suffix}"'.encode())


@pytest.fixture
def kv(server: PrismProcess) -> Iterator[kv_pb2_grpc.KeyValueStub]:
    with grpc.insecure_channel(server.endpoint) as channel:
        yield kv_pb2_grpc.KeyValueStub(channel)


def stamp(t: int, token: str) -> common_pb2.IdempotencyToken:
    return common_pb2.IdempotencyToken(generation_time_us=t, token=token)


def put(kv: kv_pb2_grpc.KeyValueStub, ns: str, id: str, value: bytes, t: int, token: str) -> None:
    items = [kv_pb2.Item(key=b"name", value=value)]
    kv.PutItems(
        kv_pb2.PutItemsRequest(namespace=ns, id=id, items=items, idempotency_token=stamp(t, token)), timeout=5
    )


def items(kv: kv_pb2_grpc.KeyValueStub, ns: str, id: str) -> list[tuple[bytes, bytes]]:
    answer = kv.GetItems(kv_pb2.GetItemsRequest(namespace=ns, id=id), timeout=5)
    return [(i.key, i.value) for i in answer.items]


def scanned_ids(kv: kv_pb2_grpc.KeyValueStub, ns: str) -> set[str]:
    ids: set[str] = set()
    token = ""
    while True:
        page = kv.ScanItems(kv_pb2.ScanItemsRequest(namespace=ns, page_token=token), timeout=5)
        ids |= {r.id for r in page.records}
        token = page.next_page_token
        if not token:
            return ids


def delete(kv: kv_pb2_grpc.KeyValueStub, how: str, ns: str, id: str, t: int) -> None:
    token = stamp(t, f"delete-{id}")
    if how == "delete_all":
        kv.DeleteItems(kv_pb2.DeleteItemsRequest(namespace=ns, id=id, idempotency_token=token), timeout=5)
    elif how == "delete_keys":
        keys = kv_pb2.Predicate(match_keys=kv_pb2.MatchKeys(keys=[b"name"]))
        request = kv_pb2.DeleteItemsRequest(namespace=ns, id=id, predicate=keys, idempotency_token=token)
        kv.DeleteItems(request, timeout=5)
    else:  # a MutateItems delete, by range
        span = kv_pb2.Predicate(match_range=kv_pb2.MatchRange(start=b"n", end=b"o"))
        mutations = [kv_pb2.Mutation(delete=span)]
        kv.MutateItems(
            kv_pb2.MutateItemsRequest(namespace=ns, id=id, mutations=mutations, idempotency_token=token),
            timeout=5,
        )


@pytest.mark.parametrize("how", ["delete_all", "delete_keys", "mutate_delete_range"])
@pytest.mark.parametrize("ns", NAMESPACES)
def test_a_late_put_older_than_the_delete_does_not_bring_the_item_back(
    kv: kv_pb2_grpc.KeyValueStub, ns: str, how: str
) -> None:
    id = f"user-{uuid.uuid4().hex[:8]}"
    put(kv, ns, id, b"ada", 1_000, "put-1")
    assert items(kv, ns, id) == [(b"name", b"ada")]  # read, so that a cache holds it
    assert items(kv, ns, id) == [(b"name", b"ada")]

    delete(kv, how, ns, id, 3_000)
    assert items(kv, ns, id) == []

    # The put's retry (another token: a hedged copy), stamped before the
    # delete, arrives after it: acknowledged, and a no-op.
    put(kv, ns, id, b"ada", 2_000, "put-1-hedge")
    assert items(kv, ns, id) == []
    assert items(kv, ns, id) == []  # a second read: from the cache, if one holds it
    assert id not in scanned_ids(kv, ns)

    put(kv, ns, id, b"grace", 4_000, "put-2")  # newer than the delete
    assert items(kv, ns, id) == [(b"name", b"grace")]
    assert id in scanned_ids(kv, ns)
