"""The backend statement as a child span on PostgreSQL and Redis: an App
serving a namespace on the real server to an in-process h2 client, its
spans caught by the SDK's in-memory exporter."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prism.config import NamespaceConfig, ServerConfig
from prism.config.tracing import TracingConfig
from prism.errors import StatusCode
from prism.proto import kv_pb2
from prism.workers.app import App
from tests import pg, rd
from tests.unit.apps import serving_app
from tests.unit.h2client import frame

PUT = "/prism.kv.v1.KeyValue/PutItems"
GET = "/prism.kv.v1.KeyValue/GetItems"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("backend", ["postgres", "redis"])
async def test_the_statement_is_a_child_of_the_calls_span(tmp_path: Path, backend: str) -> None:
    name = f"tr{uuid.uuid4().hex[:8]}"
    prefix = rd.new_prefix()
    options = {"dsn": pg.DSN} if backend == "postgres" else {"url": rd.URL, "key_prefix": prefix}
    ns = NamespaceConfig(name=name, backend=backend, options=options)
    exporter = InMemorySpanExporter()
    config = ServerConfig(data_dir=str(tmp_path), namespaces=(ns,), tracing=TracingConfig(sample_ratio=0.0))
    app = App(config, span_exporter=exporter)
    assert await app.apply(config.namespaces) == []
    held = app.namespaces.by_name[name]
    put = kv_pb2.PutItemsRequest(namespace=name, id="r", items=[kv_pb2.Item(key=b"k", value=b"v")])
    get = kv_pb2.GetItemsRequest(namespace=name, id="r")
    try:
        async with serving_app(app) as client:
            traced = [("traceparent", TRACEPARENT)]
            wrote = await client.call(PUT, frame(put.SerializeToString()), extra=traced)
            got = await client.call(GET, frame(get.SerializeToString()), extra=traced)
    finally:
        if backend == "postgres":
            pg.drop_tables(held.backend)  # type: ignore[arg-type]  # (a PostgresBackend here)
        else:
            await rd.delete_keys(prefix)
    assert wrote.status == got.status == StatusCode.OK
    assert [i.value for i in kv_pb2.GetItemsResponse.FromString(got.messages()[0]).items] == [b"v"]
    spans = exporter.get_finished_spans()
    system = {"postgres": "postgresql", "redis": "redis"}[backend]
    for method in ("PutItems", "GetItems"):
        (call,) = [s for s in spans if s.name == f"prism.kv.v1.KeyValue/{method}"]
        children = [s for s in spans if s.parent is not None and s.parent.span_id == call.context.span_id]
        statements = [s for s in children if s.name == f"prism.backend.{system}"]
        assert statements, (method, [s.name for s in children])
        assert all(dict(s.attributes or {})["db.system"] == system for s in statements)
