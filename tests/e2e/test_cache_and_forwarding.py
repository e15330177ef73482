"""The shared cache across workers, cross-tenant forwarding, and connection hand-off."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from prism.proto import common_pb2, kv_pb2, kv_pb2_grpc

from .conftest import get, metric_sum, put, sqlite_ns, tenant_toml

# a: one worker; b: two workers and a cached namespace.
BODY = tenant_toml("a", [sqlite_ns("na")]) + tenant_toml("b", [sqlite_ns("nb", cache=True)], workers=2)


def _error(call) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code().name, info.value.details()


def test_cache_hits_and_never_serves_a_stale_value(prism_tree) -> None:
    tree = prism_tree(BODY)
    first = tree.kv("b.prism")
    put(first, "nb", "c", b"k", b"v1")
    hits, misses = (
        tree.metric("prism_cache_hits_total", namespace="nb"),
        tree.metric("prism_cache_misses_total", namespace="nb"),
    )
    assert get(first, "nb", "c") == {b"k": b"v1"}
    assert tree.metric("prism_cache_misses_total", namespace="nb") == misses + 1
    assert tree.metric("prism_cache_hits_total", namespace="nb") == hits
    assert get(first, "nb", "c") == {b"k": b"v1"}
    assert tree.metric("prism_cache_hits_total", namespace="nb") == hits + 1
    # A read forwarded from tenant a is answered by b's worker from the same
    # shared table: a hit, not a miss (either of b's workers may take it).
    via_a = tree.kv("a.prism")
    for n in range(2, 5):
        assert get(via_a, "nb", "c") == {b"k": b"v1"}
        assert tree.metric("prism_cache_hits_total", namespace="nb") == hits + n
    assert tree.metric("prism_cache_misses_total", namespace="nb") == misses + 1

    # Writes through other connections (b's other worker, or forwarded from a's)
    # invalidate what ``first`` has cached: every read sees the last acked value.
    others = [tree.kv("b.prism") for _ in range(4)] + [tree.kv("a.prism")]
    readers = [first, *others]
    for n in range(2, 12):
        writer = others[n % len(others)]
        put(writer, "nb", "c", b"k", f"v{n}".encode())
        for r, reader in enumerate(readers):
            for _ in range(2):  # the second read may be a hit: it must be as fresh
                assert get(reader, "nb", "c") == {b"k": f"v{n}".encode()}, (n, r)
    assert tree.metric("prism_cache_hits_total", namespace="nb") > hits + 10

    # A request over one DATA frame (16 KiB) is assembled in a buffer and
    # handed over as it is (a bytearray): the cached path takes it (too large
    # a key to be kept: a miss each time), locally and forwarded.
    keys = [b"k"] + [b"absent-%05d" % n for n in range(2_000)]
    large = kv_pb2.GetItemsRequest(
        namespace="nb", id="c", predicate=kv_pb2.Predicate(match_keys=kv_pb2.MatchKeys(keys=keys))
    )
    assert large.ByteSize() > 16_384
    misses = tree.metric("prism_cache_misses_total", namespace="nb")
    for stub in (first, first, via_a):
        assert [(i.key, i.value) for i in stub.GetItems(large, timeout=10).items] == [(b"k", b"v11")]
    assert tree.metric("prism_cache_misses_total", namespace="nb") == misses + 3


def test_cache_under_concurrent_writes_never_goes_back(prism_tree) -> None:
    """A read that starts after a write was acked never returns an older value."""
    tree = prism_tree(BODY)
    writers = [tree.kv("b.prism"), tree.kv("b.prism"), tree.kv("a.prism")]
    readers = [tree.kv("b.prism") for _ in range(3)] + [tree.kv("a.prism")]
    put(writers[0], "nb", "hot", b"k", b"0")
    acked = [0]
    stop = threading.Event()
    stale: list[tuple[int, int]] = []
    errors: list[str] = []
    reads = [0]

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                put(writers[n % len(writers)], "nb", "hot", b"k", str(n).encode(), timeout=5)
            except grpc.RpcError as exc:
                errors.append(f"put: {exc.code().name}: {exc.details()}")
                continue
            acked[0] = n

    def read(stub) -> None:
        while not stop.is_set():
            floor = acked[0]
            try:
                got = int(get(stub, "nb", "hot", timeout=5)[b"k"])
            except grpc.RpcError as exc:
                errors.append(f"get: {exc.code().name}: {exc.details()}")
                continue
            reads[0] += 1
            if got < floor:
                stale.append((floor, got))

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read, args=(s,)) for s in readers]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(10)
    print(f"{acked[0]} writes, {reads[0]} reads")
    assert not errors, errors[:5]
    assert acked[0] > 20 and reads[0] > 100
    assert not stale, f"{len(stale)} stale reads (acked floor, value read): {stale[:5]}"


def test_forwarding_to_another_tenant_serves_every_rpc(prism_tree) -> None:
    tree = prism_tree(BODY)
    via_a = tree.kv("a.prism")
    direct = tree.kv("b.prism")
    before = tree.metrics()

    def forwarded(op: str) -> float:
        return metric_sum(tree.metrics(), "prism_forwarded_calls_total", namespace="nb", operation=op) - (
            metric_sum(before, "prism_forwarded_calls_total", namespace="nb", operation=op)
        )

    tok = common_pb2.IdempotencyToken
    via_a.PutItems(
        kv_pb2.PutItemsRequest(
            namespace="nb",
            id="f",
            items=[kv_pb2.Item(key=b"a", value=b"1"), kv_pb2.Item(key=b"b", value=b"2")],
            idempotency_token=tok(generation_time_us=time.time_ns() // 1000, token="t1"),
        ),
        timeout=10,
    )
    via_a.MutateItems(
        kv_pb2.MutateItemsRequest(
            namespace="nb",
            id="f",
            mutations=[
                kv_pb2.Mutation(put=kv_pb2.Item(key=b"c", value=b"3")),
                kv_pb2.Mutation(delete=kv_pb2.Predicate(match_keys=kv_pb2.MatchKeys(keys=[b"a"]))),
            ],
        ),
        timeout=10,
    )
    via_a.DeleteItems(
        kv_pb2.DeleteItemsRequest(
            namespace="nb", id="f", predicate=kv_pb2.Predicate(match_keys=kv_pb2.MatchKeys(keys=[b"b"]))
        ),
        timeout=10,
    )
    got = via_a.GetItems(kv_pb2.GetItemsRequest(namespace="nb", id="f"), timeout=10)
    assert [(i.key, i.value) for i in got.items] == [(b"c", b"3")]
    put(direct, "nb", "g", b"x", b"y")
    scan = via_a.ScanItems(kv_pb2.ScanItemsRequest(namespace="nb"), timeout=10)
    assert {r.id: [(i.key, i.value) for i in r.items] for r in scan.records} == {
        "f": [(b"c", b"3")],
        "g": [(b"x", b"y")],
    }
    # The owner holds what the forwarded writes did.
    assert get(direct, "nb", "f") == {b"c": b"3"}
    # Paging through a forward: tokens the owner issued work through the forward.
    page = via_a.GetItems(
        kv_pb2.GetItemsRequest(namespace="nb", id="g", selection=common_pb2.Selection(limit_items=1)),
        timeout=10,
    )
    assert [i.key for i in page.items] == [b"x"]
    for op in ("PutItems", "MutateItems", "DeleteItems", "GetItems", "ScanItems"):
        assert forwarded(op) >= 1, (op, forwarded(op))
    assert forwarded("GetItems") >= 2


def test_errors_come_back_through_the_forward_unchanged(prism_tree) -> None:
    tree = prism_tree(BODY)
    via_a = tree.kv("a.prism")
    direct = tree.kv("b.prism")
    put(direct, "nb", "r", b"k1", b"v")
    put(direct, "nb", "r", b"k2", b"v")
    forwards_before = tree.metric("prism_forwarded_calls_total", namespace="nb")

    cases = {
        "empty id put": lambda s: s.PutItems(
            kv_pb2.PutItemsRequest(namespace="nb", id="", items=[kv_pb2.Item(key=b"k", value=b"v")]),
            timeout=10,
        ),
        "empty id get": lambda s: s.GetItems(kv_pb2.GetItemsRequest(namespace="nb", id=""), timeout=10),
        "empty key": lambda s: s.PutItems(
            kv_pb2.PutItemsRequest(namespace="nb", id="r", items=[kv_pb2.Item(key=b"", value=b"v")]),
            timeout=10,
        ),
        "forged get token": lambda s: s.GetItems(
            kv_pb2.GetItemsRequest(namespace="nb", id="r", page_token="forged-token"), timeout=10
        ),
        "forged scan token": lambda s: s.ScanItems(
            kv_pb2.ScanItemsRequest(namespace="nb", page_token="AAAAAAAAAAAAAAAAAAAAAAAAAAAA"), timeout=10
        ),
        "bad range": lambda s: s.GetItems(
            kv_pb2.GetItemsRequest(
                namespace="nb",
                id="r",
                predicate=kv_pb2.Predicate(match_range=kv_pb2.MatchRange(start=b"z", end=b"a")),
            ),
            timeout=10,
        ),
    }
    for name, call in cases.items():
        want = _error(lambda c=call: c(direct))
        assert want[0] == "INVALID_ARGUMENT", (name, want)
        assert _error(lambda c=call: c(via_a)) == want, name

    # A token issued for another request (another record) is refused through the forward too.
    page = direct.GetItems(
        kv_pb2.GetItemsRequest(namespace="nb", id="r", selection=common_pb2.Selection(limit_items=1)),
        timeout=10,
    )
    assert page.next_page_token
    other = kv_pb2.GetItemsRequest(namespace="nb", id="other", page_token=page.next_page_token)
    want = _error(lambda: direct.GetItems(other, timeout=10))
    assert want[0] == "INVALID_ARGUMENT"
    assert _error(lambda: via_a.GetItems(other, timeout=10)) == want
    assert tree.metric("prism_forwarded_calls_total", namespace="nb") >= forwards_before + len(cases) + 1

    # An unknown namespace is NOT_FOUND wherever the call lands.
    assert _error(lambda: get(via_a, "nope", "r"))[0] == "NOT_FOUND"
    assert _error(lambda: get(direct, "nope", "r"))[0] == "NOT_FOUND"


def test_handoff_moves_connections_to_their_tenant(prism_tree) -> None:
    tree = prism_tree(BODY)
    put(tree.kv("b.prism"), "nb", "h", b"k", b"v")
    handoffs = tree.metric("prism_connection_handoffs_total", tenant="b")
    channels = []
    # Every new connection lands on whichever worker accepts first; keep opening
    # them until at least one landed on a's worker and was handed to b.
    for _ in range(40):
        stub = tree.kv("b.prism")
        assert get(stub, "nb", "h") == {b"k": b"v"}
        channels.append(stub)
        if tree.metric("prism_connection_handoffs_total", tenant="b") > handoffs and len(channels) >= 6:
            break
    grown = tree.metric("prism_connection_handoffs_total", tenant="b") - handoffs
    assert grown >= 1, f"no connection of {len(channels)} was handed off to b"

    # Calls on every b.prism connection, handed off or not, run on b's workers: no forwarding hop.
    forwarded = tree.metric("prism_forwarded_calls_total")
    for stub in channels:
        for n in range(5):
            put(stub, "nb", "h", b"k", f"v{n}".encode())
            assert get(stub, "nb", "h") == {b"k": f"v{n}".encode()}
    assert tree.metric("prism_forwarded_calls_total") == forwarded

    # The prism-tenant metadata names the tenant as well as :authority does.
    before = tree.metric("prism_connection_handoffs_total", tenant="b")
    landed = 0
    for _ in range(40):
        channel = tree.channel(None)
        stub = kv_pb2_grpc.KeyValueStub(channel)
        response = stub.GetItems(
            kv_pb2.GetItemsRequest(namespace="nb", id="h"), metadata=[("prism-tenant", "b")], timeout=10
        )
        assert [i.value for i in response.items] == [b"v4"]
        landed = tree.metric("prism_connection_handoffs_total", tenant="b") - before
        if landed:
            break
    assert landed >= 1
