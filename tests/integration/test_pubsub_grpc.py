"""PubSub through grpcio stubs against a real ``prism serve``: memory and NATS JetStream."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trio

from prism.proto import kv_pb2, kv_pb2_grpc, pubsub_pb2, pubsub_pb2_grpc

from .conftest import PrismProcess

pytestmark = pytest.mark.services("nats")

Kind = pubsub_pb2.StartPosition.Kind


def _config(stream: str) -> str:
    return f"""
[[namespaces]]
name = "kv"
backend = "sqlite"

[[namespaces]]
name = "mem"
abstraction = "pubsub"
backend = "memory"
options = {{ ack_wait_ms = 500 }}

[[namespaces]]
name = "orders"
abstraction = "pubsub"
backend = "nats"
options = {{ url = "nats://127.0.0.1:4222", stream = "{stream}", ack_wait_ms = 500 }}
"""


async def _drop_stream(stream: str, tmp: Path) -> None:
    from prism.backends.nats.options import NatsPubSubOptions
    from prism.backends.nats.pubsub import NatsPubSubBackend

    backend = NatsPubSubBackend(NatsPubSubOptions(stream=stream), namespace="cleanup")
    await backend.open()
    try:
        await backend.drop()
    finally:
        await backend.aclose()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrismProcess]:
    stream = f"TPS{uuid.uuid4().hex[:12]}"
    proc = PrismProcess(tmp_path / "data", _config(stream))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        trio.run(_drop_stream, stream, tmp_path)


@pytest.fixture
def stub(server: PrismProcess) -> Iterator[pubsub_pb2_grpc.PubSubStub]:
    with grpc.insecure_channel(server.endpoint) as ch:
        yield pubsub_pb2_grpc.PubSubStub(ch)


def publish(stub: pubsub_pb2_grpc.PubSubStub, ns: str, topic: str, payload: bytes, mid: str = "") -> int:
    r = stub.Publish(
        pubsub_pb2.PublishRequest(
            namespace=ns, topic=topic, payload=payload, headers={"h": "v"}, message_id=mid
        ),
        timeout=5,
    )
    return int(r.sequence)


def subscribe(
    stub: pubsub_pb2_grpc.PubSubStub, ns: str, topic: str, group: str, kind: int = Kind.EARLIEST
) -> grpc.Future:
    request = pubsub_pb2.SubscribeRequest(
        namespace=ns, topic=topic, group=group, start=pubsub_pb2.StartPosition(kind=kind)
    )
    return stub.Subscribe(request, timeout=20)


def take(stream: grpc.Future, n: int) -> list[pubsub_pb2.Message]:
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("ns", ["mem", "orders"])
def test_publish_subscribe_ack_and_redelivery(stub: pubsub_pb2_grpc.PubSubStub, ns: str) -> None:
    seqs = [publish(stub, ns, "t.a b", f"m{i}".encode()) for i in range(3)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    # A message id seen again is not published again: the first sequence answers.
    assert publish(stub, ns, "t.a b", b"dup", mid="id-1") == publish(stub, ns, "t.a b", b"dup2", mid="id-1")
    stream = subscribe(stub, ns, "t.a b", "g1")
    got = take(stream, 4)
    assert [m.payload for m in got] == [b"m0", b"m1", b"m2", b"dup"]
    assert [m.sequence for m in got[:3]] == seqs
    assert got[3].message_id == "id-1" and dict(got[0].headers) == {"h": "v"}
    stub.Ack(
        pubsub_pb2.AckRequest(namespace=ns, topic="t.a b", group="g1", sequences=[seqs[0], seqs[2]]),
        timeout=5,
    )
    stream.cancel()
    # The group resumes where it left off: only what was not acknowledged
    # comes again (at once: the ended stream gave its deliveries back).
    again = subscribe(stub, ns, "t.a b", "g1", kind=Kind.LATEST)
    redelivered = sorted(m.sequence for m in take(again, 2))
    assert redelivered == sorted([seqs[1], got[3].sequence])
    # Unacknowledged: delivered again after ack_wait_ms (500 ms) on the same stream.
    assert next(again).sequence in redelivered
    again.cancel()


@pytest.mark.parametrize("ns", ["mem", "orders"])
def test_groups_fan_out_and_ephemeral_latest(stub: pubsub_pb2_grpc.PubSubStub, ns: str) -> None:
    live = subscribe(stub, ns, "fan", "", kind=Kind.LATEST)
    live.initial_metadata()  # the response headers: the subscription is in place
    a = subscribe(stub, ns, "fan", "ga")
    b = subscribe(stub, ns, "fan", "gb")
    seq = publish(stub, ns, "fan", b"x")
    assert next(a).sequence == seq
    assert next(b).sequence == seq
    assert next(live).sequence == seq  # ephemeral: needs no ack
    for s in (live, a, b):
        s.cancel()


def test_errors(stub: pubsub_pb2_grpc.PubSubStub, server: PrismProcess) -> None:
    cases = [
        (lambda: stub.Publish(pubsub_pb2.PublishRequest(namespace="mem", topic="")), "INVALID_ARGUMENT"),
        (lambda: stub.Publish(pubsub_pb2.PublishRequest(namespace="nope", topic="t")), "NOT_FOUND"),
        (lambda: stub.Publish(pubsub_pb2.PublishRequest(namespace="kv", topic="t")), "FAILED_PRECONDITION"),
        (lambda: stub.Ack(pubsub_pb2.AckRequest(namespace="mem", topic="t", group="")), "INVALID_ARGUMENT"),
        (lambda: next(subscribe(stub, "mem", "", "g")), "INVALID_ARGUMENT"),
        (lambda: next(subscribe(stub, "nope", "t", "g")), "NOT_FOUND"),
        (lambda: next(subscribe(stub, "kv", "t", "g")), "FAILED_PRECONDITION"),
        (lambda: next(subscribe(stub, "mem", "t", "g", kind=Kind.SEQUENCE)), "INVALID_ARGUMENT"),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code().name == code, (code, info.value.details())
        assert info.value.details()
    # A KeyValue call naming a PubSub namespace is refused the same way.
    with grpc.insecure_channel(server.endpoint) as ch:
        with pytest.raises(grpc.RpcError) as info:
            kv_pb2_grpc.KeyValueStub(ch).GetItems(kv_pb2.GetItemsRequest(namespace="orders", id="x"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_nats_group_resumes_after_prism_restart(server: PrismProcess) -> None:
    with grpc.insecure_channel(server.endpoint) as ch:
        stub = pubsub_pb2_grpc.PubSubStub(ch)
        seqs = [publish(stub, "orders", "r", f"{i}".encode()) for i in range(4)]
        stream = subscribe(stub, "orders", "r", "durable")
        first = take(stream, 2)
        stub.Ack(
            pubsub_pb2.AckRequest(
                namespace="orders", topic="r", group="durable", sequences=[m.sequence for m in first]
            ),
            timeout=5,
        )
        stream.cancel()
    server.stop()
    server.start()
    with grpc.insecure_channel(server.endpoint) as ch:
        stub = pubsub_pb2_grpc.PubSubStub(ch)
        stream = subscribe(stub, "orders", "r", "durable", kind=Kind.LATEST)  # start ignored: resumes
        rest = take(stream, 2)
        stream.cancel()
    assert sorted(m.sequence for m in rest) == seqs[2:]


def test_sigterm_ends_subscriptions_at_once_and_loses_nothing(server: PrismProcess) -> None:
    # Without ending them, open Subscribe streams would hold the drain for
    # graceful_timeout_s (10 s here) and then be killed.
    assert server.proc is not None
    with grpc.insecure_channel(server.endpoint) as ch:
        stub = pubsub_pb2_grpc.PubSubStub(ch)
        seq = publish(stub, "orders", "d", b"x")
        stream = subscribe(stub, "orders", "d", "g")
        assert next(stream).sequence == seq  # delivered, not acknowledged
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "subscribe again" in (info.value.details() or "")
    assert server.stop() == 0
    assert time.monotonic() - started < 5
    server.start()
    with grpc.insecure_channel(server.endpoint) as ch:
        stub = pubsub_pb2_grpc.PubSubStub(ch)
        again = subscribe(stub, "orders", "d", "g", kind=Kind.LATEST)
        assert next(again).sequence == seq  # the group resumes; the unacked delivery comes back
        again.cancel()
