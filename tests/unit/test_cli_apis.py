"""``prism ts``, ``prism pubsub`` and ``prism ns`` without a server: parsing, requests, output, acks."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest

from prism import cli
from prism.cli import ns, pubsub, ts
from prism.cli.client import CallFailed, run_calls
from prism.cli.credentials import Credentials
from prism.cli.main import _build_parser as main_parser
from prism.proto import pubsub_pb2, timeseries_pb2
from tests.unit.test_cli_client import rpc_error

NOW_US = 1_796_576_400_000_000  # 2026-12-06T17:00:00Z


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("PRISM_ENDPOINT", "PRISM_ADMIN_ENDPOINT", "PRISM_TOKEN_FILE", "PRISM_ADMIN_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW_US),
        ("now-15m", NOW_US - 15 * 60_000_000),
        ("now+2h", NOW_US + 2 * 3_600_000_000),
        ("now-1d", NOW_US - 86_400_000_000),
        ("now-250ms", NOW_US - 250_000),
        ("now-7us", NOW_US - 7),
        ("2026-12-06T17:00:00Z", NOW_US),
        ("2026-12-06T18:00:00.25+01:00", NOW_US + 250_000),
        ("2026-12-06 17:00:00.000001z", NOW_US + 1),
        ("1796576400000000", NOW_US),
        ("-5", -5),
        ("1970-01-01T00:00:00Z", 0),
    ],
)
def test_parse_time(text: str, expected: int) -> None:
    assert ts.parse_time(text, now=lambda: NOW_US) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("yesterday", "expected now, now-15m, an ISO 8601 time"),
        ("now-5x", "expected now"),
        ("now-", "expected now"),
        ("", "expected now"),
        ("2026-13-01T00:00:00Z", "expected now"),
        ("2026-12-06T17:00:00", "has no UTC offset"),
        ("2026-12-06", "has no UTC offset"),
    ],
)
def test_parse_time_refuses(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        ts.parse_time(text, now=lambda: NOW_US)


def test_format_time() -> None:
    assert ts.format_time(NOW_US + 1) == "2026-12-06T17:00:00.000001Z"
    assert ts.format_time(-1) == "1969-12-31T23:59:59.999999Z"
    assert ts.format_time(2**62) == str(2**62)  # beyond datetime: the number as it is


def test_start_position() -> None:
    kind = pubsub_pb2.StartPosition
    assert pubsub.start_position("earliest") == kind(kind=kind.EARLIEST)
    assert pubsub.start_position("LATEST") == kind(kind=kind.LATEST)
    assert pubsub.start_position("42") == kind(kind=kind.SEQUENCE, sequence=42)
    for bad in ("0", "-1", "first", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected earliest, latest or a sequence"):
            pubsub.start_position(bad)


# ---------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["ts", "write", "m", "s", "x", "--time", "soon"], "argument --time: expected now"),
        (["ts", "write", "m", "s", "x", "--tag", "unit"], "argument --tag: expected KEY=VALUE, got 'unit'"),
        (["ts", "write", "m", "s", "x", "--tag", "=v"], "argument --tag: expected KEY=VALUE"),
        (["ts", "write", "m", "s"], "the following arguments are required: PAYLOAD"),
        (["ts", "read", "m", "s", "--from", "2026-12-06"], "argument --from: '2026-12-06' has no UTC offset"),
        (["ts", "read", "m", "s", "--to", "later"], "argument --to: expected now"),
        (["ts", "read", "m", "s", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
        (["ts", "read", "m", "s", "--limit", "-3"], "argument --limit: must be >= 0, got -3"),
        (["pubsub", "publish", "e", "t", "m", "--header", "h"], "argument --header: expected KEY=VALUE"),
        (["pubsub", "subscribe", "e", "t", "--count", "0"], "argument --count: must be >= 1, got 0"),
        (["pubsub", "subscribe", "e", "t", "--count", "-1"], "argument --count: must be >= 0, got -1"),
        (["pubsub", "subscribe", "e", "t", "--count", "many"], "argument --count: expected an integer"),
        (["pubsub", "subscribe", "e", "t", "--from", "0"], "argument --from: expected earliest, latest"),
        (["pubsub", "subscribe", "e", "t", "--from", "start"], "argument --from: expected earliest, latest"),
        (["pubsub", "subscribe", "e", "t", "--timeout", "0"], "argument --timeout: must be a positive"),
        (["ns", "list", "--timeout", "-1"], "argument --timeout: must be a positive"),
        (["ns"], "the following arguments are required: OP"),
    ],
)
def test_bad_options_are_usage_errors(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "usage: prism" in out.err
    assert says in out.err.splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["ts", "write", "m", "s", "x", "--tag", "a=1", "--tag", "a=2"], "prism: --tag 'a' given twice"),
        (["ts", "write", "m", "s", "x", "--id", ""], "prism: --id must not be empty"),
        (
            ["ts", "read", "m", "s", "--from", "0"],
            "prism: --from 0 (the epoch) means no bound to the server: give 1 or leave it out",
        ),
        (
            ["pubsub", "publish", "e", "t", "m", "--header", "h=1", "--header", "h=2"],
            "prism: --header 'h' given twice",
        ),
    ],
)
def test_inconsistent_options_are_one_line_and_exit_2(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", line + "\n")


def test_help_lists_every_api(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"    {name} " in out for name in ("kv", "ts", "pubsub", "ns"))


# ---------------------------------------------------------------- output


EVENTS = [
    timeseries_pb2.Event(series_id="cpu", event_time_us=NOW_US, event_id="e1", payload=b"0.5"),
    timeseries_pb2.Event(
        series_id="cpu", event_time_us=NOW_US + 1, event_id="e2", payload=b"\xff", tags={"u": "r", "h": "a"}
    ),
]


def test_render_events() -> None:
    assert list(ts.render_events(EVENTS, as_json=False)) == [
        "2026-12-06T17:00:00.000000Z e1 = 0.5",
        "2026-12-06T17:00:00.000001Z e2 = b'\\xff' [h=a u=r]",
    ]
    docs = [msgspec.json.decode(line) for line in ts.render_events(EVENTS, as_json=True)]
    assert docs[0] == {
        "series_id": "cpu",
        "event_time_us": NOW_US,
        "time": "2026-12-06T17:00:00.000000Z",
        "event_id": "e1",
        "payload": "0.5",
        "tags": {},
    }
    assert docs[1]["payload_b64"] == "/w==" and "payload" not in docs[1]
    assert docs[1]["tags"] == {"h": "a", "u": "r"}


def test_render_message() -> None:
    plain = pubsub_pb2.Message(topic="t", sequence=7, payload=b"hi", message_id="m")
    headed = pubsub_pb2.Message(topic="t", sequence=8, payload=b"a\nb", headers={"k": "v"})
    assert pubsub.render_message(plain, as_json=False) == "7: hi"
    assert pubsub.render_message(headed, as_json=False) == "8: b'a\\nb' [k=v]"
    assert msgspec.json.decode(pubsub.render_message(plain, as_json=True)) == {
        "topic": "t",
        "sequence": 7,
        "payload": "hi",
        "headers": {},
        "message_id": "m",
    }


def test_render_namespaces() -> None:
    raw = (
        b'{"generation":3,"namespaces":['
        b'{"name":"default","tenant":"default","abstraction":"keyvalue","backend":"sqlite","cache":{},'
        b'"owners":[{"id":0,"pid":10,"serving":true},{"id":1,"pid":11,"serving":false}]},'
        b'{"name":"q","tenant":"payments","abstraction":"pubsub","backend":"nats","cache":{},"owners":[]}]}'
    )
    page = msgspec.json.decode(raw, type=ns._Page)
    assert list(ns.render_namespaces(page, raw, as_json=False)) == [
        "NAME     ABSTRACTION  BACKEND  TENANT    SERVING",
        "default  keyvalue     sqlite   default   1/2",
        "q        pubsub       nats     payments  0/0",
    ]
    [doc] = ns.render_namespaces(page, raw, as_json=True)
    assert msgspec.json.decode(doc) == msgspec.json.decode(raw)


# ---------------------------------------------------------------- calls, against fakes


class FakeStream:
    """A server-streaming call: canned messages, or an error instead of them."""

    def __init__(self, messages: list[pubsub_pb2.Message], error: Exception | None = None) -> None:
        self.messages = messages
        self.error = error
        self.cancelled = False

    def initial_metadata(self) -> Any:
        return ()

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def __iter__(self) -> Iterator[pubsub_pb2.Message]:
        if self.error is not None:
            raise self.error
        yield from self.messages


class FakeStub:
    """TimeSeries and PubSub in one: records requests; Ack records what had been printed before it."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.requests: list[Any] = []
        self.metadata: list[Any] = []
        self.acks: list[tuple[list[int], str]] = []  # (sequences, stdout printed so far)
        self.streams: list[FakeStream] = []
        self.read_pages: list[timeseries_pb2.ReadEventsResponse] = []
        self.printed = ""

    def WriteEvents(self, request: Any, *, timeout: float | None = None) -> Any:
        self.requests.append(request)
        return timeseries_pb2.WriteEventsResponse()

    def ReadEvents(self, request: Any, *, timeout: float | None = None) -> Any:
        self.requests.append(request)
        return self.read_pages.pop(0)

    def Publish(self, request: Any, *, timeout: float | None = None, metadata: Any = None) -> Any:
        self.requests.append(request)
        return pubsub_pb2.PublishResponse(sequence=41)

    def Subscribe(self, request: Any, *, metadata: Any = None) -> FakeStream:
        self.requests.append(request)
        self.metadata.append(metadata)
        return self.streams.pop(0)

    def Ack(self, request: Any, *, timeout: float | None = None, metadata: Any = None) -> Any:
        self.printed += self.capsys.readouterr().out
        self.acks.append((list(request.sequences), self.printed))
        return pubsub_pb2.AckResponse()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> FakeStub:
    stub = FakeStub(capsys)

    class FakeConnection:
        opened = 0

        def __init__(self, endpoint: str, creds: Credentials | None = None) -> None:
            self.channel = object()

        def ever_connected(self) -> bool:
            return True

        def close(self) -> None:
            pass

    monkeypatch.setattr(cli.client, "Connection", FakeConnection)
    monkeypatch.setattr(ts, "_stub", lambda channel: stub)
    monkeypatch.setattr(pubsub, "_stub", lambda channel: stub)
    return stub


def out_of(fake: FakeStub) -> str:
    return fake.printed + fake.capsys.readouterr().out


def test_ts_write_sends_one_event(fake: FakeStub) -> None:
    argv = [
        "ts",
        "write",
        "m",
        "cpu",
        "0.5",
        "--time",
        "2026-12-06T17:00:00Z",
        "--tag",
        "u=r",
        "--tag",
        "h=a=b",
    ]
    assert cli.main([*argv, "--id", "e1"]) == 0
    assert out_of(fake) == "ok time=2026-12-06T17:00:00.000000Z id=e1\n"
    [request] = fake.requests
    assert request.namespace == "m"
    assert list(request.events) == [
        timeseries_pb2.Event(
            series_id="cpu", event_time_us=NOW_US, event_id="e1", payload=b"0.5", tags={"u": "r", "h": "a=b"}
        )
    ]


def test_ts_write_defaults_to_now_and_a_fresh_id(fake: FakeStub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ts, "now_us", lambda: NOW_US)
    assert cli.main(["ts", "write", "m", "cpu", "x", "--json"]) == 0
    assert cli.main(["ts", "write", "m", "cpu", "x"]) == 0
    first, second = (r.events[0] for r in fake.requests)
    assert first.event_time_us == second.event_time_us == NOW_US
    assert len(first.event_id) == 32 and first.event_id != second.event_id  # writing twice is two events
    doc = msgspec.json.decode(out_of(fake).splitlines()[0])
    assert doc["ok"] is True and doc["event_id"] == first.event_id and doc["event_time_us"] == NOW_US


def test_ts_read_follows_pages_up_to_the_limit(fake: FakeStub) -> None:
    fake.read_pages = [
        timeseries_pb2.ReadEventsResponse(events=EVENTS[:1], next_page_token="p"),
        timeseries_pb2.ReadEventsResponse(events=EVENTS[1:], next_page_token="q"),
    ]
    argv = ["ts", "read", "m", "cpu", "--from", "2026-12-06T17:00:00Z", "--to", "now+1d", "--limit", "2"]
    assert cli.main([*argv, "--reverse"]) == 0
    assert out_of(fake).splitlines() == list(ts.render_events(EVENTS, as_json=False))
    first, second = fake.requests  # the limit reached: page "q" is never asked for
    assert (first.start_time_us, first.page_token, second.page_token) == (NOW_US, "", "p")
    assert first.end_time_us > NOW_US
    assert (first.selection.limit_items, first.selection.reverse) == (2, True)


def test_ts_read_unbounded_sends_zero_bounds(fake: FakeStub) -> None:
    fake.read_pages = [timeseries_pb2.ReadEventsResponse()]
    assert cli.main(["ts", "read", "m", "cpu"]) == 0
    [request] = fake.requests
    assert (request.start_time_us, request.end_time_us, request.selection.limit_items) == (0, 0, 1000)


def test_publish(fake: FakeStub) -> None:
    argv = ["pubsub", "publish", "e", "t", "hello", "--header", "k=v", "--id", "m1"]
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--json"]) == 0
    assert out_of(fake) == 'ok sequence=41\n{"ok":true,"sequence":41}\n'
    assert fake.requests[0] == pubsub_pb2.PublishRequest(
        namespace="e", topic="t", payload=b"hello", headers={"k": "v"}, message_id="m1"
    )


def messages(*sequences: int) -> list[pubsub_pb2.Message]:
    return [pubsub_pb2.Message(topic="t", sequence=s, payload=f"m{s}".encode()) for s in sequences]


def test_subscribe_in_a_group_acks_each_message_after_printing_it(fake: FakeStub) -> None:
    stream = FakeStream(messages(1, 2, 3, 4))
    fake.streams = [stream]
    assert (
        cli.main(["pubsub", "subscribe", "e", "t", "--group", "g", "--from", "earliest", "--count", "3"]) == 0
    )
    assert fake.acks == [([1], "1: m1\n"), ([2], "1: m1\n2: m2\n"), ([3], "1: m1\n2: m2\n3: m3\n")]
    assert out_of(fake) == "1: m1\n2: m2\n3: m3\n"  # the 4th is neither printed nor acked
    assert stream.cancelled
    [request] = fake.requests
    assert (request.group, request.start.kind) == ("g", pubsub_pb2.StartPosition.EARLIEST)
    assert fake.metadata == [None]


def test_an_ephemeral_subscription_acks_nothing(fake: FakeStub) -> None:
    fake.streams = [FakeStream(messages(5, 6))]
    assert cli.main(["pubsub", "subscribe", "e", "t", "--json"]) == 0  # runs to the end of the stream
    assert [msgspec.json.decode(line)["sequence"] for line in out_of(fake).splitlines()] == [5, 6]
    assert fake.acks == []


def test_a_message_that_could_not_be_printed_is_not_acked(fake: FakeStub) -> None:
    fake.streams = [FakeStream(messages(1, 2))]
    args = main_parser().parse_args(["pubsub", "subscribe", "e", "t", "--group", "g"])
    printed: list[str] = []

    def lines(channel: Any) -> Iterator[str]:
        for line in pubsub.subscription_lines(args)(channel):
            if printed:
                raise BrokenPipeError  # the reader went away before the 2nd line was printed
            printed.append(line)
            yield line

    with pytest.raises(BrokenPipeError):
        run_calls(args, lines)
    assert printed == ["1: m1"] and [seqs for seqs, _ in fake.acks] == [[1]]


OTHER_TENANT = (
    "namespace 'q' is held by tenant 'payments': subscribe on a connection to that tenant "
    "(metadata prism-tenant: payments)"
)


def test_subscribe_names_the_tenant_the_server_points_to(fake: FakeStub) -> None:
    error = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, OTHER_TENANT)
    fake.streams = [FakeStream([], error), FakeStream(messages(9))]
    assert cli.main(["pubsub", "subscribe", "q", "t", "--count", "1"]) == 0
    assert out_of(fake) == "9: m9\n"
    assert fake.metadata == [None, [("prism-tenant", "payments")]]


def test_a_tenant_given_is_not_second_guessed(fake: FakeStub, capsys: pytest.CaptureFixture[str]) -> None:
    error = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, OTHER_TENANT)
    fake.streams = [FakeStream([], error)]
    assert cli.main(["pubsub", "subscribe", "q", "t", "--tenant", "default"]) == 1
    assert capsys.readouterr().err == f"prism: FAILED_PRECONDITION: {OTHER_TENANT}\n"
    assert fake.metadata == [[("prism-tenant", "default")]]


def test_asked_twice_for_another_tenant_reports_the_second_answer(
    fake: FakeStub, capsys: pytest.CaptureFixture[str]
) -> None:
    again = OTHER_TENANT.replace("payments", "billing")
    fake.streams = [
        FakeStream([], rpc_error(grpc.StatusCode.FAILED_PRECONDITION, OTHER_TENANT)),
        FakeStream([], rpc_error(grpc.StatusCode.FAILED_PRECONDITION, again)),
    ]
    assert cli.main(["pubsub", "subscribe", "q", "t"]) == 1
    assert capsys.readouterr().err == f"prism: FAILED_PRECONDITION: {again}\n"


def test_other_errors_of_subscribe_are_one_line(fake: FakeStub, capsys: pytest.CaptureFixture[str]) -> None:
    fake.streams = [FakeStream([], rpc_error(grpc.StatusCode.NOT_FOUND, "unknown namespace 'q'"))]
    assert cli.main(["pubsub", "subscribe", "q", "t", "--group", "g"]) == 1
    assert capsys.readouterr().err == "prism: NOT_FOUND: unknown namespace 'q'\n"
    assert len(fake.metadata) == 1 and fake.acks == []


class FiringTimer:
    """A deadline that has passed as soon as it is started (no real waiting)."""

    def __init__(self, interval_s: float, function: Callable[[], None]) -> None:
        self.interval_s = interval_s
        self.function = function

    def start(self) -> None:
        self.function()

    def cancel(self) -> None:
        pass


def test_a_subscription_not_in_place_within_the_timeout_is_deadline_exceeded(fake: FakeStub) -> None:
    stream = FakeStream(messages(1))
    fake.streams = [stream]
    request = pubsub_pb2.SubscribeRequest(namespace="e", topic="t")
    with pytest.raises(CallFailed) as failed:
        pubsub.open_subscription(fake, request, "", 2.5, timer=FiringTimer)
    assert (failed.value.code_name, failed.value.details) == (
        "DEADLINE_EXCEEDED",
        "the subscription was not in place within 2.5s",
    )
    assert stream.cancelled


def test_call_failed_is_reported_like_a_status(
    fake: FakeStub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def expired(*args: Any, **kwargs: Any) -> Any:
        raise CallFailed("DEADLINE_EXCEEDED", "the subscription was not in place within 5s")

    monkeypatch.setattr(pubsub, "open_subscription", expired)
    assert cli.main(["pubsub", "subscribe", "e", "t"]) == 1
    assert (
        capsys.readouterr().err == "prism: DEADLINE_EXCEEDED: the subscription was not in place within 5s\n"
    )


# ---------------------------------------------------------------- ns list: what it sends where


@pytest.fixture
def admin_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Credentials, float]]:
    calls: list[tuple[str, Credentials, float]] = []
    raw = b'{"generation":1,"namespaces":[]}'

    def fetch_page(endpoint: str, creds: Credentials, timeout_s: float) -> tuple[Any, bytes]:
        calls.append((endpoint, creds, timeout_s))
        return msgspec.json.decode(raw, type=ns._Page), raw

    monkeypatch.setattr(ns, "fetch_page", fetch_page)
    return calls


def test_ns_list_uses_the_admin_variables_never_the_grpc_token(
    admin_calls: list[tuple[str, Credentials, float]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "caller.jwt").write_text("caller-jwt\n")
    (tmp_path / "admin.token").write_text("adm1n\n")
    monkeypatch.setenv("PRISM_TOKEN_FILE", str(tmp_path / "caller.jwt"))
    monkeypatch.setenv("PRISM_ENDPOINT", "127.0.0.1:1")
    assert cli.main(["ns", "list", "--timeout", "3"]) == 0
    assert admin_calls[-1] == ("localhost:8981", Credentials(), 3.0)

    monkeypatch.setenv("PRISM_ADMIN_ENDPOINT", "127.0.0.1:9999")
    monkeypatch.setenv("PRISM_ADMIN_TOKEN_FILE", str(tmp_path / "admin.token"))
    assert cli.main(["ns", "list"]) == 0
    assert admin_calls[-1][:2] == ("127.0.0.1:9999", Credentials(token="adm1n"))
    assert capsys.readouterr().out.splitlines()[-1] == "NAME  ABSTRACTION  BACKEND  TENANT  SERVING"


def test_ns_list_sends_no_token_in_plaintext_to_another_machine(
    admin_calls: list[tuple[str, Credentials, float]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "admin.token").write_text("adm1n\n")
    argv = ["ns", "list", "--endpoint", "prism.example:8981", "--token-file", str(tmp_path / "admin.token")]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        "prism: --token-file: a bearer token goes over TLS (--tls-ca) or to this machine only, "
        "and prism.example:8981 is neither\n"
    )
    assert admin_calls == []
