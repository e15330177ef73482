"""Traces and the access log as a client and an operator see them: an App
(SQLite and memory namespaces) served to an in-process h2 client, its spans
caught by the SDK's in-memory exporter.

A call whose client sends a W3C ``traceparent`` continues that trace (its
span's parent is the client's span); a malformed one is ignored, never an
error; the call's span has the namespace, method, status and tenant, and
children for the queues and the backend statement; the access log writes
one JSON line per call; log lines a call writes carry its trace id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from prism.config import NamespaceConfig, ServerConfig
from prism.config.tracing import TracingConfig
from prism.errors import StatusCode
from prism.log import setup_logging
from prism.proto import kv_pb2
from prism.workers.app import App

from .apps import serving_app
from .h2client import H2Client, Response, frame

PUT = "/prism.kv.v1.KeyValue/PutItems"
GET = "/prism.kv.v1.KeyValue/GetItems"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{CLIENT_SPAN:016x}-01"
NAMESPACES = (NamespaceConfig(name="default", backend="sqlite"), NamespaceConfig(name="mem", backend="memory"))


def put_body(namespace: str = "default", value: bytes = b"v") -> bytes:
    return frame(
        kv_pb2.PutItemsRequest(
            namespace=namespace, id="r1", items=[kv_pb2.Item(key=b"k", value=value)]
        ).SerializeToString()
    )


def get_body(namespace: str = "default") -> bytes:
    return frame(kv_pb2.GetItemsRequest(namespace=namespace, id="r1").SerializeToString())


@asynccontextmanager
async def traced(
    tmp_path: Path, exporter: InMemorySpanExporter | None, **tracing: Any
) -> AsyncIterator[H2Client]:
    config = ServerConfig(data_dir=str(tmp_path), namespaces=NAMESPACES, tracing=TracingConfig(**tracing))
    app = App(config, tenant="t1", span_exporter=exporter)
    await app.apply(config.namespaces)
    async with serving_app(app) as client:
        yield client


def status(response: Response) -> int | None:
    return response.status


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_a_call_continues_its_clients_trace_with_child_spans(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    async with traced(tmp_path, exporter, sample_ratio=0.0) as client:
        put = await client.call(PUT, put_body(), extra=[("traceparent", TRACEPARENT)])
        got = await client.call(GET, get_body(), extra=[("traceparent", TRACEPARENT)])
    assert status(put) == status(got) == StatusCode.OK
    assert kv_pb2.GetItemsResponse.FromString(got.messages()[0]).items[0].value == b"v"
    spans = exporter.get_finished_spans()
    (server,) = by_name(spans, "prism.kv.v1.KeyValue/PutItems")
    assert server.kind == SpanKind.SERVER
    assert server.context.trace_id == TRACE_ID
    assert server.parent is not None and server.parent.span_id == CLIENT_SPAN and server.parent.is_remote
    attributes = dict(server.attributes or {})
    assert attributes["prism.namespace"] == "default"
    assert attributes["rpc.method"] == "PutItems"
    assert attributes["prism.status"] == "OK"
    assert attributes["prism.tenant"] == "t1"
    children = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
    names = {s.name for s in children}
    # The write queued for its batch's slot, waited for the writer, ran its statement.
    assert {"prism.coalesce.slot_wait", "prism.pool.wait", "prism.backend.sqlite"} <= names
    (statement,) = [s for s in children if s.name == "prism.backend.sqlite"]
    assert dict(statement.attributes or {})["db.system"] == "sqlite"
    assert all(s.context.trace_id == TRACE_ID for s in children)
    (get_span,) = by_name(spans, "prism.kv.v1.KeyValue/GetItems")
    assert get_span.context.trace_id == TRACE_ID
