"""Method.invoke (the one way a unary handler's answer becomes bytes),
Method.answer_now (a ``<Method>Now`` that fails is logged, rate-limited), and
Method.action (what the access rules govern each RPC by), and a service's
own decoders (``decoders``)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import ClassVar

import pytest
from grpc_health.v1 import health_pb2

from prism.config import ServerConfig
from prism.errors import NotFound
from prism.rpc.call import Call, CallContext
from prism.rpc.methods import NOW_FAILURE_LOG_INTERVAL_S, UNARY, Method, MethodTable
from prism.rpc.pieces import Pieces
from prism.workers.app import App

Request = health_pb2.HealthCheckRequest
Response = health_pb2.HealthCheckResponse


async def answer_message(request: Request, call: CallContext) -> Response:
    return Response(status=Response.SERVING if request.service == call.namespace else Response.NOT_SERVING)


async def answer_bytes(request: Request, call: CallContext) -> bytes:
    return b"pre-serialized"


async def answer_error(request: Request, call: CallContext) -> Response:
    raise NotFound("no such service")


def method(handler: object, now: object = None, clock: object = None) -> Method:
    kw = {"clock": clock} if clock is not None else {}
    return Method(UNARY, Request.FromString, handler, "Health/Check", now, **kw)  # type: ignore[arg-type]


async def test_invoke_serializes_a_message_answer() -> None:
    call = Call(1)
    call.namespace = "svc"
    payload = await method(answer_message).invoke(Request(service="svc"), call)
    assert Response.FromString(payload).status == Response.SERVING


async def test_invoke_passes_bytes_through_untouched() -> None:
    payload = b"pre-serialized"
    assert await method(answer_bytes).invoke(Request(), Call(1)) == payload


async def test_invoke_lets_the_handlers_error_through() -> None:
    with pytest.raises(NotFound, match="no such service"):
        await method(answer_error).invoke(Request(), Call(1))


def test_answer_now_without_now_is_none() -> None:
    assert method(answer_message).answer_now(Request(), Call(1)) is None


def test_answer_now_returns_nows_answer() -> None:
    def now(request: Request, call: CallContext) -> bytes | None:
        return b"hit" if request.service == "cached" else None

    m = method(answer_message, now)
    assert m.answer_now(Request(service="cached"), Call(1)) == b"hit"
    assert m.answer_now(Request(service="other"), Call(1)) is None


def test_a_failing_now_is_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = [1000.0]

    def now(request: Request, call: CallContext) -> bytes | None:
        raise RuntimeError("cache slot unreadable")

    m = method(answer_message, now, clock=lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="prism.rpc")

    assert m.answer_now(Request(), Call(1)) is None  # the handler answers instead
    [first] = caplog.records
    assert first.levelno == logging.WARNING
    assert "Health/CheckNow failed" in first.getMessage()
    assert first.exc_info is not None and "cache slot unreadable" in str(first.exc_info[1])

    # Within the interval: still None each time, and nothing more is logged.
    for _ in range(3):
        assert m.answer_now(Request(), Call(1)) is None
    clock[0] += NOW_FAILURE_LOG_INTERVAL_S - 0.1
    assert m.answer_now(Request(), Call(1)) is None
    assert len(caplog.records) == 1

    # Past it: one line, saying how many failures went unreported meanwhile.
    clock[0] += 0.2
    assert m.answer_now(Request(), Call(1)) is None
    assert len(caplog.records) == 2
    assert "(4 more since the last report)" in caplog.records[1].getMessage()

    # The count starts again after each report.
    clock[0] += NOW_FAILURE_LOG_INTERVAL_S
    assert m.answer_now(Request(), Call(1)) is None
    assert len(caplog.records) == 3
    assert "more since" not in caplog.records[2].getMessage()


def test_every_data_rpc_has_its_action_and_health_and_reflection_none(tmp_path: Path) -> None:
    app = App(ServerConfig(data_dir=str(tmp_path)))
    actions = {path.decode(): m.action for path, m in app.methods.methods.items()}
    data = {p: a for p, a in actions.items() if p.startswith("/prism.")}
    assert data == {
        "/prism.kv.v1.KeyValue/GetItems": "read",
        "/prism.kv.v1.KeyValue/ScanItems": "read",
        "/prism.kv.v1.KeyValue/PutItems": "write",
        "/prism.kv.v1.KeyValue/DeleteItems": "write",
        "/prism.kv.v1.KeyValue/MutateItems": "write",
        "/prism.timeseries.v1.TimeSeries/ReadEvents": "read",
        "/prism.timeseries.v1.TimeSeries/WriteEvents": "write",
        "/prism.pubsub.v1.PubSub/Subscribe": "read",
        "/prism.pubsub.v1.PubSub/Ack": "read",
        "/prism.pubsub.v1.PubSub/Publish": "write",
    }
    assert {a for p, a in actions.items() if not p.startswith("/prism.")} == {None}  # Health, reflection


def test_an_action_the_check_could_not_apply_is_refused_at_registration() -> None:
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]

    class Service:
        actions: ClassVar[dict[str, str]] = {}

        async def Check(self, request: Request, call: CallContext) -> Response:
            return Response()

        List = Watch = Check

    for actions, error in [
        ({"Nope": "read"}, "actions for no such RPC: ['Nope']"),
        ({"Check": "admin"}, "action 'admin' is not 'read' or 'write'"),
        ({"Check": "read"}, "no single request with a namespace to check"),  # HealthCheckRequest has none
    ]:
        Service.actions = actions
        with pytest.raises(ValueError, match=re.escape(error)):
            MethodTable().add_service(health, Service())


def test_a_services_own_decoder_decodes_and_takes_large_messages_in_pieces() -> None:
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]

    def decode(message: bytes | bytearray | Pieces) -> Request:
        return Request(service=f"{type(message).__name__}:{len(message)}")

    class Service:
        decoders: ClassVar[dict[str, object]] = {"Check": decode}

        async def Check(self, request: Request, call: CallContext) -> Response:
            return Response()

        List = Watch = Check

    table = MethodTable()
    table.add_service(health, Service())
    check = table.methods[b"/grpc.health.v1.Health/Check"]
    assert check.decode(Pieces([b"ab", b"c"], 3)).service == "Pieces:3"
    assert table.piecewise_paths == {b"/grpc.health.v1.Health/Check"}  # the others: protobuf's parser
    assert table.methods[b"/grpc.health.v1.Health/List"].decode(b"") == health_pb2.HealthListRequest()
    Service.decoders = {"Nope": decode}
    with pytest.raises(ValueError, match=re.escape("decoders for no such RPC: ['Nope']")):
        MethodTable().add_service(health, Service())
