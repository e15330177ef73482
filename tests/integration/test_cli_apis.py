"""``prism ts``, ``prism pubsub`` and ``prism ns`` against a real ``prism serve``, as a user types them."""

from __future__ import annotations

import json
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from tests.integration.conftest import PrismProcess, free_port
from tests.integration.test_admin_security import admin_files, fetch, wait_for_admin

CONFIG = """
admin_listen = "127.0.0.1:{admin_port}"
workers = 1

[[namespaces]]
name = "default"
backend = "sqlite"

[[namespaces]]
name = "metrics"
abstraction = "timeseries"
backend = "sqlite"

[[namespaces]]
name = "mts"
abstraction = "timeseries"
backend = "memory"

[[namespaces]]
name = "events"
abstraction = "pubsub"
backend = "memory"

[[tenants]]
name = "other"
workers = 1
namespaces = [{{ name = "otherq", abstraction = "pubsub", backend = "memory" }}]
"""
T0 = "2026-12-06T17:00:00Z"
T0_US = 1_796_576_400_000_000


def prism(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prism.cli", *args], capture_output=True, text=True, timeout=30
    )


def ok_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return done.stdout.splitlines()


def failure(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one stderr line of a failed command (nothing on stdout, no traceback)."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    return line


@pytest.fixture(scope="module")
def admin_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, admin_port: int) -> Iterator[PrismProcess]:
    proc = PrismProcess(tmp_path_factory.mktemp("cli") / "data", CONFIG.format(admin_port=admin_port))
    proc.start()
    try:
        base = f"http://127.0.0.1:{admin_port}"
        wait_for_admin(base, ssl.create_default_context())
        deadline = time.monotonic() + 15
        while fetch(base + "/readyz", ssl.create_default_context())[0] != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def ep(server: PrismProcess) -> list[str]:
    return ["--endpoint", server.endpoint]


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- TimeSeries


@pytest.mark.parametrize("namespace", ["metrics", "mts"])  # sqlite, memory
def test_ts_write_then_read(namespace: str, ep: list[str]) -> None:
    series = fresh("cpu")
    w = ["ts", "write", namespace, series]
    assert ok_lines(prism(*w, "0.5", "--time", T0, "--id", "e1", "--tag", "unit=ratio", *ep)) == [
        "ok time=2026-12-06T17:00:00.000000Z id=e1"
    ]
    ok_lines(prism(*w, "0.7", "--time", "2026-12-06T18:00:00.000001+01:00", "--id", "e2", *ep))
    ok_lines(prism(*w, "0.9", "--time", str(T0_US + 60_000_000), "--id", "e3", *ep))
    ok_lines(prism(*w, "ignored", "--time", T0, "--id", "e1", *ep))  # the same identity: changes nothing

    assert ok_lines(prism("ts", "read", namespace, series, *ep)) == [
        "2026-12-06T17:00:00.000000Z e1 = 0.5 [unit=ratio]",
        "2026-12-06T17:00:00.000001Z e2 = 0.7",
        "2026-12-06T17:01:00.000000Z e3 = 0.9",
    ]
    window = ["--from", "2026-12-06T17:00:00.000001Z", "--to", str(T0_US + 60_000_000)]
    assert ok_lines(prism("ts", "read", namespace, series, *window, *ep)) == [
        "2026-12-06T17:00:00.000001Z e2 = 0.7"
    ]
    newest = ok_lines(prism("ts", "read", namespace, series, "--reverse", "--limit", "1", "--json", *ep))
    assert [json.loads(line) for line in newest] == [
        {
            "series_id": series,
            "event_time_us": T0_US + 60_000_000,
            "time": "2026-12-06T17:01:00.000000Z",
            "event_id": "e3",
            "payload": "0.9",
            "tags": {},
        }
    ]


def test_ts_write_defaults_to_now_and_reads_back_with_relative_times(ep: list[str]) -> None:
    series = fresh("now")
    [line] = ok_lines(prism("ts", "write", "metrics", series, "x", "--tag", "a=b=c", "--json", *ep))
    written = json.loads(line)
    assert abs(written["event_time_us"] - time.time_ns() // 1000) < 60_000_000
    [read] = ok_lines(
        prism("ts", "read", "metrics", series, "--from", "now-1h", "--to", "now+1h", "--json", *ep)
    )
    assert json.loads(read) == {k: v for k, v in written.items() if k != "ok"}
    assert json.loads(read)["tags"] == {"a": "b=c"}
    assert ok_lines(prism("ts", "read", "metrics", series, "--to", "now-1h", *ep)) == []
    assert ok_lines(prism("ts", "read", "metrics", fresh("never-written"), *ep)) == []


def test_ts_errors_are_the_servers_status_in_one_line(ep: list[str]) -> None:
    assert failure(prism("ts", "read", "nope", "s", *ep)) == "prism: NOT_FOUND: unknown namespace 'nope'"
    assert (
        failure(prism("ts", "write", "nope", "s", "x", *ep)) == "prism: NOT_FOUND: unknown namespace 'nope'"
    )
    assert failure(prism("ts", "read", "default", "s", *ep)) == (
        "prism: FAILED_PRECONDITION: namespace 'default' is a keyvalue namespace, not timeseries"
    )
    line = failure(prism("ts", "read", "metrics", "s", "--from", "now", "--to", "now-1h", *ep))
    assert line.startswith("prism: INVALID_ARGUMENT: ") and "start_time_us" in line
    assert failure(prism("ts", "write", "metrics", "", "x", *ep)) == (
        "prism: INVALID_ARGUMENT: events[0]: series_id must not be empty"
    )


def test_ts_bad_times_and_tags_stop_before_any_call(ep: list[str]) -> None:
    series = fresh("bad")
    for bad in (["--time", "yesterday"], ["--time", "2026-12-06T17:00:00"], ["--tag", "novalue"]):
        done = prism("ts", "write", "metrics", series, "x", *bad, *ep)
        assert done.returncode == 2 and f"argument {bad[0]}:" in done.stderr.splitlines()[-1]
    assert failure(prism("ts", "write", "metrics", series, "x", "--tag", "a=1", "--tag", "a=2", *ep), 2) == (
        "prism: --tag 'a' given twice"
    )
    assert ok_lines(prism("ts", "read", "metrics", series, *ep)) == []  # nothing was written


# ---------------------------------------------------------------- PubSub


def test_publish_then_subscribe_from_the_earliest(ep: list[str]) -> None:
    topic = fresh("t")
    assert ok_lines(prism("pubsub", "publish", "events", topic, "hello", "--header", "k=v", *ep)) == [
        "ok sequence=1"
    ]
    [line] = ok_lines(prism("pubsub", "publish", "events", topic, "world", "--id", "m2", "--json", *ep))
    assert json.loads(line) == {"ok": True, "sequence": 2}
    # The same message id again: not published twice, the first sequence answered.
    assert ok_lines(prism("pubsub", "publish", "events", topic, "again", "--id", "m2", *ep)) == [
        "ok sequence=2"
    ]

    sub = ["pubsub", "subscribe", "events", topic, "--from", "earliest", "--count", "2"]
    assert ok_lines(prism(*sub, *ep)) == ["1: hello [k=v]", "2: world"]
    docs = [json.loads(line) for line in ok_lines(prism(*sub, "--json", *ep))]
    assert docs[1] == {"topic": topic, "sequence": 2, "payload": "world", "headers": {}, "message_id": "m2"}
    assert ok_lines(prism("pubsub", "subscribe", "events", topic, "--from", "2", "--count", "1", *ep)) == [
        "2: world"
    ]


def test_a_group_subscriber_acks_what_it_printed(ep: list[str]) -> None:
    topic = fresh("t")
    for n in (1, 2, 3):
        ok_lines(prism("pubsub", "publish", "events", topic, f"m{n}", *ep))
    group = ["pubsub", "subscribe", "events", topic, "--group", "g", "--from", "earliest"]
    assert ok_lines(prism(*group, "--count", "2", *ep)) == ["1: m1", "2: m2"]
    # Unacknowledged messages would come back to the group at once when the
    # stream ended: the next member gets the third, so the first two were acked.
    assert ok_lines(prism(*group, "--count", "1", *ep)) == ["3: m3"]
    # A group of its own starts over: every group gets every message.
    other_group = ["pubsub", "subscribe", "events", topic, "--group", "h", "--from", "earliest"]
    assert ok_lines(prism(*other_group, "--count", "1", *ep)) == ["1: m1"]


def test_subscribe_from_latest_runs_until_ctrl_c(ep: list[str]) -> None:
    topic = fresh("t")
    ok_lines(prism("pubsub", "publish", "events", topic, "before", *ep))  # not for a "latest" subscriber
    sub = subprocess.Popen(
        [sys.executable, "-m", "prism.cli", "pubsub", "subscribe", "events", topic, *ep],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sub.stdout is not None
        with selectors.DefaultSelector() as ready:
            ready.register(sub.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 15
            # Published until the subscriber, once in place, prints one: "latest" starts after "before".
            while not ready.select(timeout=0.2):
                assert time.monotonic() < deadline and sub.poll() is None, "the subscriber printed nothing"
                ok_lines(prism("pubsub", "publish", "events", topic, "after", *ep))
            first = sub.stdout.readline()
        assert first.endswith(": after\n") and int(first.split(":")[0]) >= 2, first
        sub.send_signal(signal.SIGINT)
        assert sub.wait(10) == 130
        assert "Traceback" not in sub.communicate()[1]
    finally:
        if sub.poll() is None:
            sub.kill()
        sub.communicate()


def test_subscribe_reaches_the_tenant_that_holds_the_namespace(ep: list[str]) -> None:
    topic = fresh("t")
    ok_lines(prism("pubsub", "publish", "otherq", topic, "far", *ep))
    sub = ["pubsub", "subscribe", "otherq", topic, "--from", "earliest", "--count", "1"]
    for _ in range(3):  # whichever worker a connection lands on
        assert ok_lines(prism(*sub, *ep)) == ["1: far"]
    assert ok_lines(prism(*sub, "--tenant", "other", *ep)) == ["1: far"]
    assert failure(prism(*sub, "--tenant", "default", *ep)) == (
        "prism: FAILED_PRECONDITION: namespace 'otherq' is held by tenant 'other': subscribe on a "
        "connection to that tenant (metadata prism-tenant: other)"
    )


def test_pubsub_errors_are_the_servers_status_in_one_line(ep: list[str]) -> None:
    unknown = "prism: NOT_FOUND: unknown namespace 'nope'"
    assert failure(prism("pubsub", "publish", "nope", "t", "x", *ep)) == unknown
    assert failure(prism("pubsub", "subscribe", "nope", "t", "--count", "1", *ep)) == unknown
    line = failure(prism("pubsub", "subscribe", "default", "t", "--count", "1", *ep))
    assert line.startswith("prism: FAILED_PRECONDITION: ") and "not pubsub" in line
    assert failure(prism("pubsub", "publish", "events", "", "x", *ep)).startswith("prism: INVALID_ARGUMENT: ")
    assert failure(prism("pubsub", "subscribe", "events", "", *ep)).startswith("prism: INVALID_ARGUMENT: ")


def test_subscribe_count_and_from_are_checked_before_any_call(ep: list[str]) -> None:
    for bad in (["--count", "0"], ["--count", "-2"], ["--count", "x"], ["--from", "0"], ["--from", "first"]):
        done = prism("pubsub", "subscribe", "events", "t", *bad, *ep)
        assert done.returncode == 2 and f"argument {bad[0]}:" in done.stderr.splitlines()[-1], done.stderr


# ---------------------------------------------------------------- ns list


def test_ns_list_from_the_admin_port(server: PrismProcess, admin_port: int) -> None:
    admin = ["--endpoint", f"127.0.0.1:{admin_port}"]
    assert ok_lines(prism("ns", "list", *admin)) == [
        "NAME     ABSTRACTION  BACKEND  TENANT   SERVING",
        "default  keyvalue     sqlite   default  1/1",
        "events   pubsub       memory   default  1/1",
        "metrics  timeseries   sqlite   default  1/1",
        "mts      timeseries   memory   default  1/1",
        "otherq   pubsub       memory   other    1/1",
    ]
    [doc] = ok_lines(prism("ns", "list", "--json", *admin))
    page = json.loads(doc)
    assert [ns["name"] for ns in page["namespaces"]] == ["default", "events", "metrics", "mts", "otherq"]
    assert page["namespaces"][4]["tenant"] == "other" and page["generation"] >= 1
    # The gRPC port is not the admin port: said so in one line.
    line = failure(prism("ns", "list", "--endpoint", server.endpoint, "--timeout", "2"))
    assert line.startswith(f"prism: {server.endpoint} did not answer HTTP like Prism's admin port")


def test_ns_list_over_https_with_the_admin_token(tmp_path: Path) -> None:
    ca, tls_section = admin_files(tmp_path)
    (tmp_path / "admin.token").write_text("adm1n-t0ken\n")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    port = free_port()
    config = (
        f'admin_listen = "127.0.0.1:{port}"\nadmin_token_file = "{tmp_path / "admin.token"}"\n'
        '[[namespaces]]\nname = "default"\nbackend = "memory"\n' + tls_section
    )
    proc = PrismProcess(tmp_path / "data", config)
    proc.start()
    try:
        client = ssl.create_default_context()
        ca.configure_trust(client)
        wait_for_admin(f"https://127.0.0.1:{port}", client)
        admin = ["ns", "list", "--endpoint", f"127.0.0.1:{port}", "--timeout", "2"]
        ca_file, token = (
            ["--tls-ca", str(tmp_path / "ca.pem")],
            ["--token-file", str(tmp_path / "admin.token")],
        )

        lines = ok_lines(prism(*admin, *ca_file, *token))
        assert lines[0].split() == ["NAME", "ABSTRACTION", "BACKEND", "TENANT", "SERVING"]
        assert lines[1].split()[:4] == ["default", "keyvalue", "memory", "default"]

        assert failure(prism(*admin, *ca_file)) == (
            "prism: admin port answered 401: unauthorized: send Authorization: Bearer <the admin token> "
            "(no --token-file was given)"
        )
        assert failure(prism(*admin, "--tls-ca", str(tmp_path / "other-ca.pem"), *token)).startswith(
            f"prism: TLS handshake with 127.0.0.1:{port} failed: the server's certificate does not verify"
        )
        assert failure(prism(*admin, *token)).startswith(f"prism: 127.0.0.1:{port} did not answer HTTP")
    finally:
        proc.stop()


# ---------------------------------------------------------------- nothing answers


def _every_command(endpoint: str) -> list[list[str]]:
    common = ["--endpoint", endpoint, "--timeout", "0.5"]
    return [
        ["kv", "get", "default", "r", *common],
        ["ts", "write", "metrics", "s", "x", *common],
        ["ts", "read", "metrics", "s", *common],
        ["pubsub", "publish", "events", "t", "x", *common],
        ["pubsub", "subscribe", "events", "t", *common],
        ["ns", "list", *common],
    ]


def test_a_closed_port_is_one_line_and_exit_1() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    for argv in _every_command(endpoint):
        line = failure(prism(*argv))
        assert line.startswith(f"prism: cannot reach {endpoint}: ") and "refused" in line.lower(), argv


def test_a_silent_server_is_one_line_within_the_timeout() -> None:
    """A port that accepts connections and never speaks: each command gives up after --timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        for argv in _every_command(endpoint):
            started = time.monotonic()
            line = failure(prism(*argv))
            # 0.5 s of timeout plus the interpreter's start (grpcio's import): never unbounded.
            assert time.monotonic() - started < 10, argv
            assert line in (
                f"prism: cannot reach {endpoint}: no connection within 0.5s",
                f"prism: cannot reach {endpoint}: no answer within 0.5s",
            ), argv


# ---------------------------------------------------------------- NATS JetStream


async def _drop_stream(stream: str) -> None:
    from prism.backends.nats.options import NatsPubSubOptions
    from prism.backends.nats.pubsub import NatsPubSubBackend

    backend = NatsPubSubBackend(NatsPubSubOptions(stream=stream), namespace="cleanup")
    await backend.open()
    try:
        await backend.drop()
    finally:
        await backend.aclose()


@pytest.mark.services("nats")
def test_pubsub_on_nats_acks_survive_a_restart(tmp_path: Path) -> None:
    stream = f"TCLI{uuid.uuid4().hex[:12]}"
    config = (
        '[[namespaces]]\nname = "orders"\nabstraction = "pubsub"\nbackend = "nats"\n'
        f'options = {{ url = "nats://127.0.0.1:4222", stream = "{stream}", ack_wait_ms = 500 }}\n'
    )
    proc = PrismProcess(tmp_path / "data", config)
    proc.start()
    try:
        ep = ["--endpoint", proc.endpoint]
        sequences = []
        for n in (1, 2, 3):
            [line] = ok_lines(prism("pubsub", "publish", "orders", "o", f"m{n}", *ep))
            sequences.append(int(line.removeprefix("ok sequence=")))
        group = ["pubsub", "subscribe", "orders", "o", "--group", "billing", "--from", "earliest"]
        assert ok_lines(prism(*group, "--count", "2", *ep)) == [f"{sequences[0]}: m1", f"{sequences[1]}: m2"]
        proc.stop()
        proc.start()  # the group and its acks are JetStream's: they outlive Prism
        assert ok_lines(prism(*group, "--count", "1", *ep)) == [f"{sequences[2]}: m3"]
    finally:
        proc.stop()
        trio.run(_drop_stream, stream)
