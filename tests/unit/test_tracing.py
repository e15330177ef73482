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

import io
import json
import logging
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from prism.backends.memory.keyvalue import MemoryBackend
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
NAMESPACES = (
    NamespaceConfig(name="default", backend="sqlite"),
    NamespaceConfig(name="mem", backend="memory"),
)


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


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-not-a-trace-01",
        TRACEPARENT.upper(),  # the spec's hex is lower case
        TRACEPARENT[:-1],  # one character short
        TRACEPARENT + "0",  # version 00 has exactly four fields
        TRACEPARENT.replace("-", "_"),
        f"00-{0:032x}-{CLIENT_SPAN:016x}-01",  # an all-zero trace id is invalid
        f"00-{TRACE_ID:032x}-{0:016x}-01",  # so is an all-zero parent id
        "ff" + TRACEPARENT[2:],  # version ff is forbidden
        "",
    ],
)
async def test_a_malformed_traceparent_is_ignored_not_an_error(tmp_path: Path, traceparent: str) -> None:
    exporter = InMemorySpanExporter()
    async with traced(tmp_path, exporter, sample_ratio=1.0) as client:
        await client.call(PUT, put_body("mem"))
        got = await client.call(GET, get_body("mem"), extra=[("traceparent", traceparent)])
    assert status(got) == StatusCode.OK
    assert kv_pb2.GetItemsResponse.FromString(got.messages()[0]).items[0].value == b"v"
    (span,) = by_name(exporter.get_finished_spans(), "prism.kv.v1.KeyValue/GetItems")
    assert span.parent is None  # a trace of its own (sampled: sample_ratio 1)
    assert span.context.trace_id != TRACE_ID


async def test_a_later_version_with_more_fields_is_read_as_version_00(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    async with traced(tmp_path, exporter, sample_ratio=0.0) as client:
        later = "cc" + TRACEPARENT[2:] + "-what"
        got = await client.call(GET, get_body("mem"), extra=[("traceparent", later)])
    assert status(got) == StatusCode.OK
    (span,) = by_name(exporter.get_finished_spans(), "prism.kv.v1.KeyValue/GetItems")
    assert span.context.trace_id == TRACE_ID


async def test_the_clients_sampled_flag_and_the_ratio_decide(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    not_sampled = TRACEPARENT[:-2] + "00"
    async with traced(tmp_path, exporter, sample_ratio=1.0) as client:
        assert status(await client.call(GET, get_body("mem"), extra=[("traceparent", not_sampled)])) == 0
    assert exporter.get_finished_spans() == ()  # the client said: not sampled
    exporter = InMemorySpanExporter()  # (an App's end shuts its exporter down)
    async with traced(tmp_path, exporter, sample_ratio=0.0) as client:
        for _ in range(20):
            assert status(await client.call(GET, get_body("mem"))) == StatusCode.OK
    assert exporter.get_finished_spans() == ()  # ratio 0, no client trace
    exporter = InMemorySpanExporter()
    async with traced(tmp_path, exporter, sample_ratio=1.0) as client:
        for _ in range(3):
            assert status(await client.call(GET, get_body("mem"))) == StatusCode.OK
    spans = by_name(exporter.get_finished_spans(), "prism.kv.v1.KeyValue/GetItems")
    assert len(spans) == 3 and len({s.context.trace_id for s in spans}) == 3


async def test_sample_ratio_is_the_share_of_calls_traced(tmp_path: Path) -> None:
    random.seed(15)
    exporter = InMemorySpanExporter()
    async with traced(tmp_path, exporter, sample_ratio=0.25) as client:
        for _ in range(400):
            assert status(await client.call(GET, get_body("mem"))) == StatusCode.OK
    sampled = len(by_name(exporter.get_finished_spans(), "prism.kv.v1.KeyValue/GetItems"))
    assert 70 <= sampled <= 130  # 100 expected; 6 standard deviations either side


async def test_a_failed_call_has_its_status_on_its_span(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    async with traced(tmp_path, exporter, sample_ratio=1.0) as client:
        got = await client.call(GET, get_body("nowhere"))
    assert status(got) == StatusCode.NOT_FOUND
    (span,) = by_name(exporter.get_finished_spans(), "prism.kv.v1.KeyValue/GetItems")
    assert dict(span.attributes or {})["prism.status"] == "NOT_FOUND"
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == StatusCode.NOT_FOUND
    assert not span.status.is_ok


def access_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if '"prism.access"' in line]


async def test_the_access_log_writes_one_json_line_per_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with traced(tmp_path, None, access_log=True) as client:
        put = await client.call(PUT, put_body("mem", b"x" * 300), extra=[("traceparent", TRACEPARENT)])
        got = await client.call(GET, get_body("mem"))
        missing = await client.call(GET, get_body("nowhere"))
    lines = access_lines(capsys.readouterr().err)
    assert [(line["method"], line["status"], line["namespace"]) for line in lines] == [
        (PUT, "OK", "mem"),
        (GET, "OK", "mem"),
        (GET, "NOT_FOUND", "nowhere"),
    ]
    assert lines[0]["bytes_in"] == len(put_body("mem", b"x" * 300)) - 5  # the message, not its frame
    assert lines[1]["bytes_out"] == len(got.messages()[0]) and lines[1]["bytes_out"] > 300
    assert lines[2]["bytes_out"] == 0 and status(missing) == StatusCode.NOT_FOUND
    # No spans without an endpoint, but the client's trace id is logged.
    assert [line["trace_id"] for line in lines] == [f"{TRACE_ID:032x}", None, None]
    assert {line["level"] for line in lines} == {"info"} and all(line["duration_ms"] >= 0 for line in lines)
    assert all(line["ts"].endswith("Z") and "peer" in line and line["principal"] is None for line in lines)
    assert status(put) == StatusCode.OK


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """prism's JSON log lines, as a worker sets them up (``setup_logging``), into a buffer."""
    logger = logging.getLogger("prism")
    saved = logger.handlers[:], logger.level, logger.propagate
    setup_logging("info")
    stream = io.StringIO()
    logger.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    try:
        yield stream
    finally:
        logger.handlers[:], level, logger.propagate = saved
        logger.setLevel(level)


async def test_log_lines_a_call_writes_carry_its_trace_id(
    tmp_path: Path, logged: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    async with traced(tmp_path, exporter, sample_ratio=0.0) as client:

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the disk caught fire")

        monkeypatch.setattr(MemoryBackend, "get_items_now", broken)  # (get_items reads through it)
        got = await client.call(GET, get_body("mem"), extra=[("traceparent", TRACEPARENT)])
        untraced = await client.call(GET, get_body("mem"))
    assert status(got) == status(untraced) == StatusCode.INTERNAL
    errors = [json.loads(line) for line in logged.getvalue().splitlines() if '"error"' in line]
    assert len(errors) == 2 and all("the disk caught fire" in e["exc"] for e in errors)
    assert errors[0]["trace_id"] == f"{TRACE_ID:032x}"
    assert "trace_id" not in errors[1]  # not sampled, no client trace: none to name
