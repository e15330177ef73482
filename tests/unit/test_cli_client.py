"""The ``prism`` command without a server: config errors, client logic, output, failures."""

from __future__ import annotations

import socket
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest
import trustme

from prism import cli
from prism.cli.credentials import Credentials
from prism.config import ServerConfig
from prism.errors import ConfigError
from prism.proto import kv_pb2


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in (
        "PRISM_CONFIG",
        "PRISM_LISTEN",
        "PRISM_DATA_DIR",
        "PRISM_LOG_LEVEL",
        "PRISM_ENDPOINT",
        "PRISM_TLS_CA",
        "PRISM_TLS_CERT",
        "PRISM_TLS_KEY",
        "PRISM_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


# ---------------------------------------------------------------- serve


def test_serve_with_bad_config_exits_2_before_importing_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("max_concurrent_streams = 0\n", encoding="utf-8")
    # None in sys.modules makes any import of prism.server fail loudly.
    monkeypatch.setitem(sys.modules, "prism.server", None)

    assert cli.main(["serve", "--config", str(bad)]) == 2

    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith("prism: config error: max_concurrent_streams: 0 out of range")
    assert "bad.toml" in lines[0]


def test_serve_with_invalid_toml_syntax(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [\n", encoding="utf-8")
    assert cli.main(["serve", "--config", str(bad)]) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith(f"prism: config error: {bad}: invalid TOML: ")


def fake_server(monkeypatch: pytest.MonkeyPatch, result: int | Exception = 0) -> list[ServerConfig]:
    """Install a stand-in ``prism.server`` whose ``serve`` records its config."""
    seen: list[ServerConfig] = []

    def serve(config: ServerConfig, reload_config: Callable[[], ServerConfig], **source: Any) -> int:
        seen.append(config)
        assert reload_config() == config  # SIGHUP reads the same sources again
        if isinstance(result, Exception):
            raise result
        return result

    module = types.ModuleType("prism.server")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "prism.server", module)
    return seen


def test_serve_passes_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('listen = "127.0.0.1:1001"\nlog_level = "warning"\ndata_dir = "f"\n', encoding="utf-8")
    monkeypatch.setenv("PRISM_LISTEN", "127.0.0.1:1002")
    monkeypatch.setenv("PRISM_DATA_DIR", "from-env")
    seen = fake_server(monkeypatch, result=0)

    assert cli.main(["serve", "--config", str(conf), "--listen", "127.0.0.1:1003"]) == 0

    [config] = seen
    assert config.listen == "127.0.0.1:1003"
    assert config.data_dir == "from-env"
    assert config.log_level == "warning"


def test_serve_returns_the_servers_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_server(monkeypatch, result=3)
    assert cli.main(["serve", "--data-dir", "d", "--log-level", "debug"]) == 3


def test_config_error_from_the_server_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_server(monkeypatch, result=ConfigError('namespaces[0].backend: unknown backend "x"'))
    assert cli.main(["serve"]) == 2
    assert stderr_lines(capsys) == ['prism: config error: namespaces[0].backend: unknown backend "x"']


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["kv"],
        ["kv", "get", "ns"],
        ["kv", "put", "ns", "id", "k"],
        ["kv", "get", "ns", "id", "--timeout", "0"],
        ["kv", "get", "ns", "id", "--timeout", "soon"],
        ["kv", "put", "ns", "id", "k", "v", "--ttl-ms", "-1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage: prism" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kv", "get", "--help"]) == 0
    assert "--endpoint" in capsys.readouterr().out


# ---------------------------------------------------------------- unreachable server


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there now


@pytest.mark.parametrize(
    "op",
    [["put", "ns", "id", "k", "v"], ["get", "ns", "id"], ["delete", "ns", "id", "k"], ["scan", "ns"]],
)
def test_unreachable_endpoint_is_one_line_and_exit_1(
    op: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"127.0.0.1:{unused_port()}"
    assert cli.main(["kv", *op, "--endpoint", endpoint, "--timeout", "1"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"prism: cannot reach {endpoint}: ")


def test_endpoint_defaults_to_prism_endpoint_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"127.0.0.1:{unused_port()}"
    monkeypatch.setenv("PRISM_ENDPOINT", endpoint)
    assert cli.main(["kv", "scan", "ns", "--timeout", "1"]) == 1
    assert stderr_lines(capsys)[0].startswith(f"prism: cannot reach {endpoint}: ")


def test_grpcios_poller_dying_on_a_closed_channel_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpcio's connectivity poller, run on a channel closed under it (the
    race CI once hit: a traceback under the command's one error line), is
    silent; another thread's error still reaches the hook before ours."""
    from grpc import _channel

    from prism.cli.client import Connection

    reported: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(str(args.exc_value)))
    conn = Connection(f"127.0.0.1:{unused_port()}")
    conn.close()
    channel = conn.channel
    poller = threading.Thread(
        target=_channel._poll_connectivity,  # what subscribe() runs, as it runs
        args=(channel._connectivity_state, channel._channel, False),  # type: ignore[attr-defined]
    )
    poller.start()
    poller.join()
    assert reported == []

    def fails() -> None:
        raise ValueError("Channel closed! but not grpcio's poller")

    other = threading.Thread(target=fails)
    other.start()
    other.join()
    assert reported == ["Channel closed! but not grpcio's poller"]


# ---------------------------------------------------------------- error lines


def test_error_line_for_a_server_that_answered() -> None:
    line = cli.error_line("NOT_FOUND", 'unknown namespace "x"', "h:1", True, 5)
    assert line == 'prism: NOT_FOUND: unknown namespace "x"'
    # UNAVAILABLE from a server we reached is the server's word, not a connection failure.
    assert cli.error_line("UNAVAILABLE", "draining", "h:1", True, 5) == "prism: UNAVAILABLE: draining"
    assert cli.error_line("INTERNAL", "", "h:1", True, 5) == "prism: INTERNAL"


def test_error_line_when_never_connected() -> None:
    line = cli.error_line("UNAVAILABLE", "failed to connect\n  Connection refused", "h:1", False, 5)
    assert line == "prism: cannot reach h:1: failed to connect Connection refused"
    line = cli.error_line("DEADLINE_EXCEEDED", "Deadline Exceeded", "h:1", False, 0.5)
    assert line == "prism: cannot reach h:1: no connection within 0.5s"


# ---------------------------------------------------------------- output


def test_display_bytes() -> None:
    assert cli.display_bytes(b"hello") == "hello"
    assert cli.display_bytes("größe".encode()) == "größe"
    assert cli.display_bytes(b"") == ""
    assert cli.display_bytes(b"\xff\x00") == "b'\\xff\\x00'"
    assert cli.display_bytes(b"two\nlines") == "b'two\\nlines'"


def test_item_json_uses_base64_only_for_non_utf8() -> None:
    item = kv_pb2.Item(key=b"k", value=b"\xff\xfe", expires_at_ms=123)
    assert cli.item_json(item) == {"key": "k", "value_b64": "//4=", "expires_at_ms": 123}
    item = kv_pb2.Item(key=b"\x80", value=b"v")
    assert cli.item_json(item) == {"key_b64": "gA==", "value": "v", "expires_at_ms": 0}


ITEMS = [kv_pb2.Item(key=b"a", value=b"1"), kv_pb2.Item(key=b"b\xff", value=b"x y")]


def test_render_items_readable_and_json() -> None:
    assert list(cli.render_items("r", ITEMS, as_json=False)) == ["a = 1", "b'b\\xff' = x y"]
    [doc] = cli.render_items("r", ITEMS, as_json=True)
    assert msgspec.json.decode(doc) == {
        "id": "r",
        "items": [
            {"key": "a", "value": "1", "expires_at_ms": 0},
            {"key_b64": "Yv8=", "value": "x y", "expires_at_ms": 0},
        ],
    }
    assert list(cli.render_items("r", [], as_json=True)) == ['{"id":"r","items":[]}']


def test_render_records_readable_and_json_lines() -> None:
    records = [kv_pb2.Record(id="r1", items=ITEMS[:1]), kv_pb2.Record(id="r2", items=ITEMS)]
    assert list(cli.render_records(records, as_json=False)) == [
        "r1: a = 1",
        "r2: a = 1",
        "r2: b'b\\xff' = x y",
    ]
    lines = list(cli.render_records(records, as_json=True))
    assert [msgspec.json.decode(line)["id"] for line in lines] == ["r1", "r2"]


# ---------------------------------------------------------------- calls, against a fake stub


class FakeStub:
    """Answers from canned pages and records every request, like KeyValueStub would see them."""

    def __init__(self, get_pages: list[kv_pb2.GetItemsResponse] | None = None) -> None:
        self.get_pages = get_pages or [kv_pb2.GetItemsResponse()]
        self.scan_pages: list[kv_pb2.ScanItemsResponse] = [kv_pb2.ScanItemsResponse()]
        self.requests: list[Any] = []
        self.timeouts: list[float | None] = []
        self.credentials: list[Credentials | None] = []  # what each command's connection was given

    def _record(self, request: Any, timeout: float | None) -> int:
        self.requests.append(request)
        self.timeouts.append(timeout)
        return len(self.requests) - 1

    def PutItems(self, request: kv_pb2.PutItemsRequest, *, timeout: float | None = None) -> Any:
        self._record(request, timeout)
        return kv_pb2.PutItemsResponse()

    def DeleteItems(self, request: kv_pb2.DeleteItemsRequest, *, timeout: float | None = None) -> Any:
        self._record(request, timeout)
        return kv_pb2.DeleteItemsResponse()

    def GetItems(self, request: kv_pb2.GetItemsRequest, *, timeout: float | None = None) -> Any:
        return self.get_pages[self._record(request, timeout)]

    def ScanItems(self, request: kv_pb2.ScanItemsRequest, *, timeout: float | None = None) -> Any:
        return self.scan_pages[self._record(request, timeout)]


def item(key: bytes) -> kv_pb2.Item:
    return kv_pb2.Item(key=key, value=key.upper())


def test_get_follows_pages_and_keeps_the_predicate() -> None:
    stub = FakeStub(
        [
            kv_pb2.GetItemsResponse(items=[item(b"a")], next_page_token="t1"),
            kv_pb2.GetItemsResponse(items=[item(b"b")], next_page_token="t2"),
            kv_pb2.GetItemsResponse(items=[item(b"c")]),
        ]
    )
    got = list(cli.get_items(stub, "ns", "r", [b"a", b"b", b"c"], 2.0))
    assert [i.key for i in got] == [b"a", b"b", b"c"]
    assert [r.page_token for r in stub.requests] == ["", "t1", "t2"]
    assert all(list(r.predicate.match_keys.keys) == [b"a", b"b", b"c"] for r in stub.requests)
    assert {(r.namespace, r.id) for r in stub.requests} == {("ns", "r")}
    assert stub.timeouts == [2.0, 2.0, 2.0]


def test_get_without_keys_matches_all() -> None:
    stub = FakeStub()
    assert list(cli.get_items(stub, "ns", "r", [], 1.0)) == []
    assert stub.requests[0].predicate.WhichOneof("match") == "match_all"


def test_scan_follows_pages() -> None:
    stub = FakeStub()
    stub.scan_pages = [
        kv_pb2.ScanItemsResponse(records=[kv_pb2.Record(id="r1")], next_page_token="p"),
        kv_pb2.ScanItemsResponse(records=[kv_pb2.Record(id="r2")]),
    ]
    assert [r.id for r in cli.scan_records(stub, "ns", 1.0)] == ["r1", "r2"]
    assert [(r.namespace, r.page_token) for r in stub.requests] == [("ns", ""), ("ns", "p")]


def test_a_repeated_page_token_stops_instead_of_looping() -> None:
    stub = FakeStub(
        [
            kv_pb2.GetItemsResponse(items=[item(b"a")], next_page_token="same"),
            kv_pb2.GetItemsResponse(items=[item(b"a")], next_page_token="same"),
        ]
    )
    with pytest.raises(cli.PageTokenLoop):
        list(cli.get_items(stub, "ns", "r", [], 1.0))


def test_put_and_delete_requests() -> None:
    stub = FakeStub()
    cli.put_item(stub, "ns", "r", kv_pb2.Item(key=b"k", value=b"v", ttl_ms=500), 1.0)
    cli.delete_items(stub, "ns", "r", [], 1.0)
    cli.delete_items(stub, "ns", "r", [b"k"], 1.0)
    put, delete_all, delete_k = stub.requests
    assert (put.namespace, put.id, list(put.items)) == (
        "ns",
        "r",
        [kv_pb2.Item(key=b"k", value=b"v", ttl_ms=500)],
    )
    assert delete_all.predicate.WhichOneof("match") == "match_all"
    assert list(delete_k.predicate.match_keys.keys) == [b"k"]


# ---------------------------------------------------------------- commands, end to end against the fake


def rpc_error(code: grpc.StatusCode, details: str) -> Exception:
    """What grpcio raises from a failed unary call: an RpcError that is also a Call.

    Built with ``type()`` because grpcio ships no type stubs, and mypy --strict
    rejects a class statement whose bases are untyped.
    """
    methods: dict[str, Any] = {
        "code": lambda self: code,
        "details": lambda self: details,
        "initial_metadata": lambda self: (),
        "trailing_metadata": lambda self: (),
        "is_active": lambda self: False,
        "time_remaining": lambda self: None,
        "cancel": lambda self: False,
        "add_callback": lambda self, callback: False,
    }
    error: Exception = type("FakeRpcError", (grpc.RpcError, grpc.Call), methods)()
    return error


@pytest.fixture
def fake_connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeStub]:
    """Route the kv commands to a FakeStub instead of a grpcio channel."""
    stub = FakeStub()

    class FakeConnection:
        def __init__(self, endpoint: str, creds: Credentials | None = None) -> None:
            self.channel = object()
            stub.credentials.append(creds)

        def ever_connected(self) -> bool:
            return True

        def close(self) -> None:
            pass

    monkeypatch.setattr(cli.client, "Connection", FakeConnection)
    monkeypatch.setattr(cli.kv, "_stub", lambda channel: stub)
    yield stub


def test_put_command(fake_connection: FakeStub, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kv", "put", "ns", "r", "k\u00e9", "v", "--ttl-ms", "5", "--timeout", "3"]) == 0
    assert capsys.readouterr().out == "ok\n"
    [request] = fake_connection.requests
    assert list(request.items) == [kv_pb2.Item(key="k\u00e9".encode(), value=b"v", ttl_ms=5)]
    assert fake_connection.timeouts == [3.0]


def test_put_command_json(fake_connection: FakeStub, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["kv", "put", "ns", "r", "k", "v", "--json"]) == 0
    assert capsys.readouterr().out == '{"ok":true}\n'


def test_get_command_prints_items(fake_connection: FakeStub, capsys: pytest.CaptureFixture[str]) -> None:
    fake_connection.get_pages = [
        kv_pb2.GetItemsResponse(items=[item(b"a")], next_page_token="t"),
        kv_pb2.GetItemsResponse(items=[item(b"b")]),
    ]
    assert cli.main(["kv", "get", "ns", "r", "a", "b"]) == 0
    assert capsys.readouterr().out == "a = A\nb = B\n"


def test_scan_command_prints_id_key_value(
    fake_connection: FakeStub, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_connection.scan_pages = [
        kv_pb2.ScanItemsResponse(records=[kv_pb2.Record(id="r", items=[item(b"k")])])
    ]
    assert cli.main(["kv", "scan", "ns"]) == 0
    assert capsys.readouterr().out == "r: k = K\n"


def test_grpc_error_is_one_line_with_the_status(
    fake_connection: FakeStub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(request: Any, *, timeout: float | None = None) -> Any:
        raise rpc_error(grpc.StatusCode.NOT_FOUND, 'unknown namespace "ns"')

    monkeypatch.setattr(fake_connection, "GetItems", fail)
    assert cli.main(["kv", "get", "ns", "r"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == 'prism: NOT_FOUND: unknown namespace "ns"\n'


def test_page_token_loop_is_one_line(fake_connection: FakeStub, capsys: pytest.CaptureFixture[str]) -> None:
    fake_connection.scan_pages = [kv_pb2.ScanItemsResponse(next_page_token="x")] * 2
    assert cli.main(["kv", "scan", "ns"]) == 1
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("prism: server returned the same page token")


# ---------------------------------------------------------------- TLS files and the token


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA file, a client certificate and key it signed, and files that are not those."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client = ca.issue_cert("client@prism.test")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    trustme.CA().issue_cert("other").private_key_pem.write_to_path(str(d / "other.key"))
    (d / "junk.pem").write_text("not a certificate\n")
    (d / "token").write_text("  eyJhbGciOiJFUzI1NiJ9.e30.c2ln\n")
    return {p.name: p for p in d.iterdir()}


def test_the_files_are_read_and_handed_to_the_connection(
    fake_connection: FakeStub, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--tls-ca", str(pki["ca.pem"]), "--cert", str(pki["client.pem"]), "--key", str(pki["client.key"])]
    assert cli.main(["kv", "get", "ns", "r", *argv, "--token-file", str(pki["token"])]) == 0

    [creds] = fake_connection.credentials
    assert creds is not None and creds.tls and creds.identified
    assert creds.root_certificates == pki["ca.pem"].read_bytes()
    assert creds.certificate_chain == pki["client.pem"].read_bytes()
    assert creds.private_key == pki["client.key"].read_bytes()
    assert creds.token == "eyJhbGciOiJFUzI1NiJ9.e30.c2ln"  # blanks and the newline dropped


def test_the_environment_names_the_files_and_a_flag_wins(
    fake_connection: FakeStub, pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRISM_TLS_CA", str(pki["ca.pem"]))
    monkeypatch.setenv("PRISM_TOKEN_FILE", str(pki["token"]))
    monkeypatch.setenv("PRISM_TLS_CERT", str(pki["junk.pem"]))  # overridden below, never read
    monkeypatch.setenv("PRISM_TLS_KEY", str(pki["junk.pem"]))
    argv = ["--cert", str(pki["client.pem"]), "--key", str(pki["client.key"])]
    assert cli.main(["kv", "scan", "ns", *argv]) == 0

    [creds] = fake_connection.credentials
    assert creds is not None
    assert creds.root_certificates == pki["ca.pem"].read_bytes()
    assert creds.certificate_chain == pki["client.pem"].read_bytes()
    assert creds.token == "eyJhbGciOiJFUzI1NiJ9.e30.c2ln"


def test_without_files_the_channel_stays_plaintext(fake_connection: FakeStub) -> None:
    assert cli.main(["kv", "scan", "ns"]) == 0
    assert fake_connection.credentials == [Credentials()]
    assert not Credentials().tls and not Credentials().identified


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    [line] = out.err.splitlines()
    return line


def test_a_missing_file_is_one_line_and_exit_2(
    fake_connection: FakeStub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = tmp_path / "missing.pem"
    line = usage_error(["kv", "get", "ns", "r", "--tls-ca", str(missing)], capsys)
    assert line == f"prism: cannot read --tls-ca {missing}: No such file or directory"

    monkeypatch.setenv("PRISM_TOKEN_FILE", str(missing))
    line = usage_error(["kv", "get", "ns", "r"], capsys)
    assert line == f"prism: cannot read $PRISM_TOKEN_FILE {missing}: No such file or directory"

    line = usage_error(["kv", "get", "ns", "r", "--token-file", str(tmp_path)], capsys)  # a directory
    assert line.startswith(f"prism: cannot read --token-file {tmp_path}: ")
    assert fake_connection.credentials == []  # no call was made


def test_files_that_are_not_what_they_should_be_are_one_line_and_exit_2(
    fake_connection: FakeStub, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    get = ["kv", "get", "ns", "r"]
    line = usage_error([*get, "--tls-ca", str(pki["junk.pem"])], capsys)
    assert line.startswith(f"prism: --tls-ca {pki['junk.pem']}: not PEM CA certificates (")

    line = usage_error([*get, "--cert", str(pki["client.pem"]), "--key", str(pki["other.key"])], capsys)
    assert line.startswith(f"prism: --cert {pki['client.pem']} and --key {pki['other.key']}: not a PEM")

    line = usage_error([*get, "--cert", str(pki["client.pem"])], capsys)
    assert line == "prism: --cert and --key go together (a certificate and its private key)"
    assert fake_connection.credentials == []


@pytest.mark.parametrize("content", [b"", b"\n \n", b"two words", b"line1\nline2", b"t\xc3\xb6ken"])
def test_a_token_file_without_one_token_is_one_line_and_exit_2(
    fake_connection: FakeStub, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)

    line = usage_error(["kv", "get", "ns", "r", "--token-file", str(path)], capsys)

    assert line.startswith(f"prism: --token-file {path} ")
    assert "words" not in line and "line1" not in line  # a secret, however malformed


def test_a_token_never_goes_in_plaintext_to_another_machine(
    fake_connection: FakeStub, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_connection.get_pages = [kv_pb2.GetItemsResponse()] * 4  # one per call below
    token = ["--token-file", str(pki["token"])]
    line = usage_error(["kv", "get", "ns", "r", *token, "--endpoint", "prism.example:8980"], capsys)
    assert line == (
        "prism: --token-file: a bearer token goes over TLS (--tls-ca) or to this machine only, "
        "and prism.example:8980 is neither"
    )
    for endpoint in ("127.0.0.1:8980", "localhost:8980", "[::1]:8980"):
        assert cli.main(["kv", "get", "ns", "r", *token, "--endpoint", endpoint]) == 0
    tls = ["--tls-ca", str(pki["ca.pem"])]
    assert cli.main(["kv", "get", "ns", "r", *token, *tls, "--endpoint", "prism.example:8980"]) == 0


# What grpcio says when a channel never connected, as it says it.
BAD_CA = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8980: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
    "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
)
TLS_TO_PLAINTEXT = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8980: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
    "WRONG_VERSION_NUMBER: Invalid certificate verification context: OK"
)
CLOSED = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:8980: Socket closed"


def test_error_lines_for_tls_failures() -> None:
    assert cli.error_line("UNAVAILABLE", BAD_CA, "h:1", False, 5, tls=True) == (
        "prism: TLS handshake with h:1 failed: the server's certificate does not verify "
        "(unable to get local issuer certificate); is --tls-ca the CA that signed it?"
    )
    assert cli.error_line("UNAVAILABLE", TLS_TO_PLAINTEXT, "h:1", False, 5, tls=True) == (
        "prism: TLS handshake with h:1 failed: the server does not speak TLS there (a plaintext port?)"
    )
    assert cli.error_line("UNAVAILABLE", CLOSED, "h:1", False, 5, tls=True) == (
        "prism: h:1 closed the connection during the TLS handshake "
        "(it may want a client certificate: --cert and --key, or not this one)"
    )
    assert cli.error_line("UNAVAILABLE", CLOSED, "h:1", False, 5) == (
        "prism: h:1 closed the connection (a TLS port? give --tls-ca)"
    )


def test_error_lines_for_auth_failures() -> None:
    line = cli.error_line("UNAUTHENTICATED", "token expired", "h:1", True, 5, identified=True)
    assert line == "prism: UNAUTHENTICATED: token expired"
    line = cli.error_line("UNAUTHENTICATED", "no credentials", "h:1", True, 5, identified=False)
    assert line == "prism: UNAUTHENTICATED: no credentials (no --token-file or --cert was given)"
    line = cli.error_line("PERMISSION_DENIED", "not allowed", "h:1", True, 5, identified=True)
    assert line == "prism: PERMISSION_DENIED: not allowed"


def test_an_auth_failure_is_one_line_and_exit_1(
    fake_connection: FakeStub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(request: Any, *, timeout: float | None = None) -> Any:
        raise rpc_error(grpc.StatusCode.UNAUTHENTICATED, "a call needs a principal")

    monkeypatch.setattr(fake_connection, "PutItems", fail)
    assert cli.main(["kv", "put", "ns", "r", "k", "v"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert (
        out.err == "prism: UNAUTHENTICATED: a call needs a principal (no --token-file or --cert was given)\n"
    )
