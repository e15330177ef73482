"""Every KeyValue RPC through grpcio stubs against a real ``prism serve``."""

from __future__ import annotations

import grpc
import pytest

from prism.proto import common_pb2, kv_pb2, kv_pb2_grpc

from .conftest import PrismProcess

NAMESPACES = ["default", "mem"]  # sqlite, memory


def put(stub: kv_pb2_grpc.KeyValueStub, ns: str, id: str, items: dict[bytes, bytes], **kw: object) -> None:
    stub.PutItems(
        kv_pb2.PutItemsRequest(
            namespace=ns, id=id, items=[kv_pb2.Item(key=k, value=v) for k, v in items.items()], **kw
        ),
        timeout=5,
    )


def get_all(stub: kv_pb2_grpc.KeyValueStub, ns: str, id: str, **kw: object) -> list[tuple[bytes, bytes]]:
    out, token = [], ""
    while True:
        r = stub.GetItems(kv_pb2.GetItemsRequest(namespace=ns, id=id, page_token=token, **kw), timeout=5)
        out += [(i.key, i.value) for i in r.items]
        if not r.next_page_token:
            return out
        token = r.next_page_token


@pytest.mark.parametrize("ns", NAMESPACES)
def test_every_rpc(channel: grpc.Channel, ns: str) -> None:
    stub = kv_pb2_grpc.KeyValueStub(channel)
    put(stub, ns, "u1", {b"b": b"2", b"a": b"1", b"\x80": b"high", b"c": b"3"})
    assert get_all(stub, ns, "u1") == [(b"a", b"1"), (b"b", b"2"), (b"c", b"3"), (b"\x80", b"high")]
    rev = get_all(stub, ns, "u1", selection=common_pb2.Selection(reverse=True, limit_items=1))
    assert [k for k, _ in rev] == [b"\x80", b"c", b"b", b"a"]
    keys = stub.GetItems(
        kv_pb2.GetItemsRequest(
            namespace=ns, id="u1", predicate=kv_pb2.Predicate(match_keys=kv_pb2.MatchKeys(keys=[b"c", b"zz"]))
        )
    )
    assert [(i.key, i.value) for i in keys.items] == [(b"c", b"3")]
    rng = stub.GetItems(
        kv_pb2.GetItemsRequest(
            namespace=ns, id="u1", predicate=kv_pb2.Predicate(match_range=kv_pb2.MatchRange(start=b"b"))
        )
    )
    assert [i.key for i in rng.items] == [b"b", b"c", b"\x80"]
    stub.DeleteItems(
        kv_pb2.DeleteItemsRequest(
            namespace=ns, id="u1", predicate=kv_pb2.Predicate(match_keys=kv_pb2.MatchKeys(keys=[b"a"]))
        )
    )
    assert [k for k, _ in get_all(stub, ns, "u1")] == [b"b", b"c", b"\x80"]
    stub.MutateItems(
        kv_pb2.MutateItemsRequest(
            namespace=ns,
            id="u1",
            mutations=[
                kv_pb2.Mutation(delete=kv_pb2.Predicate(match_all=kv_pb2.MatchAll())),
                kv_pb2.Mutation(put=kv_pb2.Item(key=b"z", value=b"26")),
            ],
        )
    )
    assert get_all(stub, ns, "u1") == [(b"z", b"26")]
    put(stub, ns, "u2", {b"k": b"v"})
    seen, token = [], ""
    while True:
        r = stub.ScanItems(
            kv_pb2.ScanItemsRequest(
                namespace=ns, page_token=token, selection=common_pb2.Selection(limit_items=1)
            )
        )
        seen += [(rec.id, [(i.key, i.value) for i in rec.items]) for rec in r.records]
        token = r.next_page_token
        if not token:
            break
    assert seen == [("u1", [(b"z", b"26")]), ("u2", [(b"k", b"v")])]
    stub.DeleteItems(kv_pb2.DeleteItemsRequest(namespace=ns, id="u2"))
    assert get_all(stub, ns, "u2") == []


@pytest.mark.parametrize("ns", NAMESPACES)
def test_ttl_is_reported_and_idempotent_retry(channel: grpc.Channel, ns: str) -> None:
    stub = kv_pb2_grpc.KeyValueStub(channel)
    stub.PutItems(
        kv_pb2.PutItemsRequest(namespace=ns, id="t", items=[kv_pb2.Item(key=b"k", value=b"v", ttl_ms=60_000)])
    )
    (item,) = stub.GetItems(kv_pb2.GetItemsRequest(namespace=ns, id="t")).items
    assert item.expires_at_ms > 0
    token = common_pb2.IdempotencyToken(generation_time_us=1_000, token="w1")
    put(stub, ns, "i", {b"k": b"first"}, idempotency_token=token)
    stub.DeleteItems(kv_pb2.DeleteItemsRequest(namespace=ns, id="i"))
    put(stub, ns, "i", {b"k": b"first"}, idempotency_token=token)  # a retry: no second effect
    assert get_all(stub, ns, "i") == []
    newer = common_pb2.IdempotencyToken(generation_time_us=10_000_000, token="w2")
    older = common_pb2.IdempotencyToken(generation_time_us=5_000_000, token="w3")
    put(stub, ns, "lww", {b"k": b"new"}, idempotency_token=newer)
    put(stub, ns, "lww", {b"k": b"old"}, idempotency_token=older)
    assert get_all(stub, ns, "lww") == [(b"k", b"new")]


def code_of(fn: object, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=5)  # type: ignore[operator]
    return info.value.code(), info.value.details()


def test_bad_requests_get_clear_statuses(channel: grpc.Channel) -> None:
    stub = kv_pb2_grpc.KeyValueStub(channel)
    code, msg = code_of(stub.GetItems, kv_pb2.GetItemsRequest(namespace="nope", id="x"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg
    code, msg = code_of(stub.PutItems, kv_pb2.PutItemsRequest(namespace="mem", id=""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "id" in msg
    code, _ = code_of(stub.GetItems, kv_pb2.GetItemsRequest(namespace="mem", id="x", page_token="forged"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    put(stub, "mem", "p", {b"a": b"1", b"b": b"2"})
    first = stub.GetItems(
        kv_pb2.GetItemsRequest(namespace="mem", id="p", selection=common_pb2.Selection(limit_items=1))
    )
    assert first.next_page_token
    # A real token, presented for another record: refused, not a wrong page.
    code, msg = code_of(
        stub.GetItems, kv_pb2.GetItemsRequest(namespace="mem", id="other", page_token=first.next_page_token)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another request" in msg
    bad_range = kv_pb2.Predicate(match_range=kv_pb2.MatchRange(start=b"z", end=b"a"))
    code, _ = code_of(stub.GetItems, kv_pb2.GetItemsRequest(namespace="mem", id="p", predicate=bad_range))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # The server still serves.
    assert get_all(stub, "mem", "p") == [(b"a", b"1"), (b"b", b"2")]


def test_message_over_maximum(channel: grpc.Channel) -> None:
    stub = kv_pb2_grpc.KeyValueStub(channel)
    huge = kv_pb2.PutItemsRequest(
        namespace="mem", id="big", items=[kv_pb2.Item(key=b"k", value=b"x" * (5 << 20))]
    )
    code, _ = code_of(stub.PutItems, huge)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert get_all(stub, "mem", "big") == []


@pytest.mark.parametrize("ns", NAMESPACES)
def test_large_puts_store_the_bytes_sent(channel: grpc.Channel, ns: str) -> None:
    # Large requests arrive in many DATA frames, interleaved when several are
    # in flight on one connection, and a large PutItems is read from those
    # pieces without protobuf (prism.api.kvwire): what is stored must be,
    # byte for byte, what was sent. Sizes around the reader's threshold (64
    # KiB) and the frame size, with several items and every field set.
    stub = kv_pb2_grpc.KeyValueStub(channel)
    sizes = [16_383, 65_535, 65_536, 300_001, 1 << 20, 3 << 20]
    values = {n: bytes((i * 131 + n) % 251 for i in range(n)) for n in sizes}
    token = common_pb2.IdempotencyToken(generation_time_us=1_000, token="big")
    calls = [
        stub.PutItems.future(
            kv_pb2.PutItemsRequest(
                namespace=ns,
                id=f"big{n}",
                items=[
                    kv_pb2.Item(key=b"v", value=value, ttl_ms=600_000),
                    kv_pb2.Item(key=b"\x00small", value=b"s"),
                    kv_pb2.Item(key=b"w", value=value[-70_000:][::-1]),
                ],
                idempotency_token=token,
            ),
            timeout=30,
        )
        for n, value in values.items()
    ]
    for call in calls:
        call.result()
    for n, value in values.items():
        got = get_all(stub, ns, f"big{n}")
        assert got == [(b"\x00small", b"s"), (b"v", value), (b"w", value[-70_000:][::-1])]
        expiry = {
            key: stub.GetItems(
                kv_pb2.GetItemsRequest(
                    namespace=ns,
                    id=f"big{n}",
                    predicate=kv_pb2.Predicate(match_keys=kv_pb2.MatchKeys(keys=[key])),
                )
            )
            .items[0]
            .expires_at_ms
            for key in (b"v", b"w")
        }
        assert expiry[b"v"] > 0 and expiry[b"w"] == 0  # ttl_ms was read, and for its item only
    # The token was read: a retry of the same write after a delete does nothing.
    stub.DeleteItems(kv_pb2.DeleteItemsRequest(namespace=ns, id=f"big{1 << 20}"), timeout=5)
    calls[sizes.index(1 << 20)] = stub.PutItems.future(
        kv_pb2.PutItemsRequest(
            namespace=ns,
            id=f"big{1 << 20}",
            items=[kv_pb2.Item(key=b"v", value=values[1 << 20])],
            idempotency_token=token,
        ),
        timeout=30,
    )
    calls[sizes.index(1 << 20)].result()
    assert get_all(stub, ns, f"big{1 << 20}") == []


def test_deadline_exceeded_from_grpcio(channel: grpc.Channel) -> None:
    # grpcio sends a 1 us timeout as "grpc-timeout: 1m" (its smallest), and
    # Prism often answers a GetItems within that millisecond, before grpcio's
    # own timer has fired: most such calls succeed. What must hold: grpcio's
    # timeouts are understood, and a call that misses its deadline fails
    # with DEADLINE_EXCEEDED, never another status.
    stub = kv_pb2_grpc.KeyValueStub(channel)
    failed = []
    for _ in range(500):
        try:
            stub.GetItems(kv_pb2.GetItemsRequest(namespace="default", id="x"), timeout=0.000001)
        except grpc.RpcError as exc:
            failed.append(exc.code())
            if len(failed) == 5:
                break
    assert failed and set(failed) == {grpc.StatusCode.DEADLINE_EXCEEDED}


def test_sqlite_data_survives_restart_and_kill9(prism_server: PrismProcess) -> None:
    with grpc.insecure_channel(prism_server.endpoint) as ch:
        put(kv_pb2_grpc.KeyValueStub(ch), "default", "durable", {b"k": b"before-restart"})
    prism_server.stop()
    prism_server.start()
    with grpc.insecure_channel(prism_server.endpoint) as ch:
        stub = kv_pb2_grpc.KeyValueStub(ch)
        assert get_all(stub, "default", "durable") == [(b"k", b"before-restart")]
        for n in range(50):
            put(stub, "default", "acked", {b"%03d" % n: b"v"})
    prism_server.kill9()
    prism_server.start()
    with grpc.insecure_channel(prism_server.endpoint) as ch:
        got = get_all(kv_pb2_grpc.KeyValueStub(ch), "default", "acked")
        assert [k for k, _ in got] == [b"%03d" % n for n in range(50)]
