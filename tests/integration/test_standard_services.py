"""Health and server reflection, as stock grpcio clients use them."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from .conftest import PrismProcess


def test_health_check_server_and_namespaces(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(service="")).status == serving
    assert stub.Check(health_pb2.HealthCheckRequest(service="default")).status == serving
    try:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError("unknown service must be NOT_FOUND")
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="mem"), timeout=5)
    assert next(watch).status == serving
    watch.cancel()


def test_reflection_lists_and_describes_services(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {
        "prism.kv.v1.KeyValue",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    pool = DescriptorPool(db)
    kv = pool.FindServiceByName("prism.kv.v1.KeyValue")
    assert [m.name for m in kv.methods] == ["PutItems", "GetItems", "DeleteItems", "MutateItems", "ScanItems"]
    item = pool.FindMessageTypeByName("prism.kv.v1.Item")
    assert [f.name for f in item.fields] == ["key", "value", "ttl_ms", "expires_at_ms"]


def test_sigterm_turns_watchers_not_serving_and_ends_their_streams(prism_server: PrismProcess) -> None:
    # A load balancer's Watch must hear NOT_SERVING and then let the drain
    # finish, not hold it for graceful_timeout_s (10 s here).
    assert prism_server.proc is not None
    with grpc.insecure_channel(prism_server.endpoint) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        watches = [
            stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=30) for name in ("", "default")
        ]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        prism_server.proc.send_signal(signal.SIGTERM)
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                next(watch)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert prism_server.stop() == 0
    assert time.monotonic() - started < 5
