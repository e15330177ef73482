"""Traces as an operator gets them: a real ``prism serve`` exporting spans
over OTLP/HTTP to a receiver this test serves, called by a stock grpcio
client that sends a W3C ``traceparent``; and its access log.

The receiver is a tiny HTTP server accepting ``POST /v1/traces`` (protobuf
``ExportTraceServiceRequest``, decoded with opentelemetry-proto), as a
collector would.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from prism.proto import kv_pb2, kv_pb2_grpc

from .conftest import DEFAULT_CONFIG, PrismProcess

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP traces endpoint: every span exported to it, decoded."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []  # (resource attributes, span)
        self.paths: list[str] = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.changed:
                    receiver.paths.append(self.path)
                    for resource_spans in request.resource_spans:
                        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans += [(resource, span) for span in scope_spans.spans]
                    receiver.changed.notify_all()
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_for(self, name: str, timeout_s: float = 20.0) -> list[Span]:
        """The spans named ``name`` once one has come (the exporter sends every second)."""
        with self.changed:
            self.changed.wait_for(lambda: any(s.name == name for _, s in self.spans), timeout_s)
            return [s for _, s in self.spans if s.name == name]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def attributes(span: Span) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()
        r.thread.join()


@pytest.fixture
def traced_server(tmp_path: Path, receiver: Receiver) -> Iterator[PrismProcess]:
    tracing = f'[tracing]\notlp_endpoint = "{receiver.url}"\nsample_ratio = 0.0\naccess_log = true\n'
    config = tracing + DEFAULT_CONFIG
    server = PrismProcess(tmp_path / "data", config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_spans_reach_the_otlp_receiver_continuing_the_clients_trace(
    traced_server: PrismProcess, receiver: Receiver
) -> None:
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    with grpc.insecure_channel(traced_server.endpoint) as channel:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        stub.PutItems(
            kv_pb2.PutItemsRequest(namespace="default", id="r1", items=[kv_pb2.Item(key=b"k", value=b"v")]),
            metadata=[("traceparent", traceparent)],
            timeout=5,
        )
        got = stub.GetItems(kv_pb2.GetItemsRequest(namespace="default", id="r1"), timeout=5)
        # sample_ratio 0: a call without a traceparent makes no span; not-sampled ("-00") neither.
        stub.GetItems(
            kv_pb2.GetItemsRequest(namespace="default", id="r1"),
            metadata=[("traceparent", f"00-{'1' * 32}-{'2' * 16}-00")],
            timeout=5,
        )
        # A malformed traceparent is ignored: the call is answered.
        bad = stub.GetItems(
            kv_pb2.GetItemsRequest(namespace="default", id="r1"),
            metadata=[("traceparent", "00-not-a-trace-01")],
            timeout=5,
        )
    assert [i.value for i in got.items] == [b"v"] == [i.value for i in bad.items]

    (server_span,) = receiver.wait_for("prism.kv.v1.KeyValue/PutItems")
    assert server_span.trace_id.hex() == TRACE_ID
    assert server_span.parent_span_id.hex() == CLIENT_SPAN
    assert server_span.kind == Span.SPAN_KIND_SERVER
    got_attributes = attributes(server_span)
    assert got_attributes["prism.namespace"] == "default"
    assert got_attributes["rpc.method"] == "PutItems"
    assert got_attributes["prism.status"] == "OK"
    assert got_attributes["prism.tenant"] == "default"
    statements = receiver.wait_for("prism.backend.sqlite")
    assert any(s.parent_span_id == server_span.span_id for s in statements)
    assert all(s.trace_id.hex() == TRACE_ID for _, s in receiver.spans)
    assert not receiver.wait_for("prism.kv.v1.KeyValue/GetItems", timeout_s=0.1)
    assert set(receiver.paths) == {"/v1/traces"}

    traced_server.stop()
    assert traced_server.stderr is not None
    lines = [json.loads(line) for line in traced_server.stderr.splitlines() if '"prism.access"' in line]
    calls = [line for line in lines if line["method"].startswith("/prism.kv.v1.KeyValue/")]
    assert [(c["method"].rsplit("/", 1)[1], c["status"], c["trace_id"]) for c in calls] == [
        ("PutItems", "OK", TRACE_ID),
        ("GetItems", "OK", None),
        ("GetItems", "OK", "1" * 32),
        ("GetItems", "OK", None),
    ]
    put = calls[0]
    assert put["namespace"] == "default" and put["peer"].startswith("127.0.0.1:")
    assert put["bytes_in"] > 0 and put["bytes_out"] == 0  # PutItemsResponse {} is no bytes
    assert calls[1]["bytes_out"] > 0 and put["duration_ms"] >= 0
