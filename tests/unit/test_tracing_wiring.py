"""Tracing across workers, in config, and off.

A call forwarded to another tenant's worker continues the trace there: the
owner's span is a child of the sender's forwarding span. ``[tracing]``
refuses bad values, naming the field. Off (the default), or with only the
access log, a worker does not import OpenTelemetry at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from prism.config import ServerConfig
from prism.config.tracing import TracingConfig
from prism.errors import ConfigError, StatusCode
from prism.proto import kv_pb2
from prism.workers.app import App

from .h2client import frame
from .test_forwarding import GET, PUT, Node, client_of, ipc_dir, routes, running  # noqa: F401 (a fixture)
from .test_imports import _loaded_after

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{CLIENT_SPAN:016x}-01"


class TracedNode(Node):
    """A worker whose spans go to ``exporter``."""

    def __init__(self, wid: int, tenant: str, sockets: Path, data_dir: Path) -> None:
        super().__init__(wid, tenant, sockets, data_dir)
        self.exporter = InMemorySpanExporter()
        self.app = App(
            ServerConfig(data_dir=str(data_dir / f"w{wid}"), tracing=TracingConfig(sample_ratio=0.0)),
            remote=self.remote,
            locator=self.remote,
            tenant=tenant,
            span_exporter=self.exporter,
        )


async def test_a_forwarded_call_continues_the_trace_on_the_owning_worker(
    ipc_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = TracedNode(1, "a", ipc_dir, tmp_path), TracedNode(2, "b", ipc_dir, tmp_path)
    table = routes(1, {"kv": ("b", "keyvalue")}, a, b)
    await a.install(table)
    await b.install(table)
    put = kv_pb2.PutItemsRequest(namespace="kv", id="r", items=[kv_pb2.Item(key=b"k", value=b"v")])
    get = kv_pb2.GetItemsRequest(namespace="kv", id="r")
    async with running(a, b), client_of(a) as client:
        assert (await client.call(PUT, frame(put.SerializeToString()))).status == StatusCode.OK
        got = await client.call(GET, frame(get.SerializeToString()), extra=[("traceparent", TRACEPARENT)])
    assert got.status == StatusCode.OK
    assert [i.value for i in kv_pb2.GetItemsResponse.FromString(got.messages()[0]).items] == [b"v"]
    # The untraced put (sample_ratio 0, no traceparent) made no span on either worker.
    front = {s.name: s for s in a.exporter.get_finished_spans()}
    owner = {s.name: s for s in b.exporter.get_finished_spans()}
    assert set(front) == {"prism.kv.v1.KeyValue/GetItems", "prism.forward"}
    assert set(owner) == {"prism.kv.v1.KeyValue/GetItems"}
    front_span, hop, owner_span = (
        front["prism.kv.v1.KeyValue/GetItems"],
        front["prism.forward"],
        owner["prism.kv.v1.KeyValue/GetItems"],
    )
    assert front_span.parent is not None and front_span.parent.span_id == CLIENT_SPAN
    assert hop.kind == SpanKind.CLIENT and hop.parent is not None
    assert hop.parent.span_id == front_span.context.span_id
    assert owner_span.parent is not None and owner_span.parent.span_id == hop.context.span_id
    assert {front_span.context.trace_id, hop.context.trace_id, owner_span.context.trace_id} == {TRACE_ID}
    assert dict(front_span.attributes or {})["prism.tenant"] == "a"
    assert dict(owner_span.attributes or {})["prism.tenant"] == "b"
    assert dict(owner_span.attributes or {})["prism.namespace"] == "kv"


@pytest.mark.parametrize(
    ("tracing", "message"),
    [
        ({"otlp_endpoint": "localhost:4318"}, r"^tracing\.otlp_endpoint: expected an http:// or https://"),
        ({"otlp_endpoint": "http://:4318/v1/traces"}, r"^tracing\.otlp_endpoint: expected an http"),
        ({"otlp_endpoint": "http://collector:99999/v1/traces"}, r"^tracing\.otlp_endpoint: the port is not"),
        ({"sample_ratio": 1.5}, r"^tracing\.sample_ratio: 1\.5 must be between 0 and 1"),
        ({"sample_ratio": float("nan")}, r"^tracing\.sample_ratio: nan must be between 0 and 1"),
        ({"export_queue": 0}, r"^tracing\.export_queue: 0 out of range"),
        ({"export_timeout_s": 0.0}, r"^tracing\.export_timeout_s: 0\.0 must be > 0"),
    ],
)
def test_bad_tracing_values_are_refused_naming_the_field(tracing: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(tracing=TracingConfig(**tracing))  # type: ignore[arg-type]


def test_tracing_is_off_by_default() -> None:
    assert not ServerConfig().tracing.enabled
    assert ServerConfig(tracing=TracingConfig(otlp_endpoint="https://collector:4318/v1/traces")).tracing.spans


_SERVE_ONE_CONNECTION = """
import trio, trio.testing
import prism.workers.worker
from prism.config import ServerConfig
from prism.config.tracing import TracingConfig
from prism.rpc.server import Connection
from prism.workers.app import App

async def main():
    app = App(ServerConfig(data_dir={data_dir!r}, tracing=TracingConfig({tracing})))
    server, client = trio.testing.memory_stream_pair()
    Connection(server, app.settings)
    await app.aclose()

trio.run(main)
"""


@pytest.mark.parametrize(
    ("tracing", "loaded"),
    [
        ("", []),
        ("access_log=True", []),
        ("otlp_endpoint='http://127.0.0.1:9/v1/traces', export_timeout_s=0.1", ["opentelemetry"]),
    ],
)
def test_a_worker_imports_opentelemetry_only_to_make_spans(
    tmp_path: Path, tracing: str, loaded: list[str]
) -> None:
    code = _SERVE_ONE_CONNECTION.format(data_dir=str(tmp_path), tracing=tracing)
    assert _loaded_after(code, ("opentelemetry",)) == loaded
