"""``prism kv`` over TLS and with tokens, as a user runs it (a subprocess).

Most tests use a stock grpcio server in this process, with trustme
certificates, to check the client's side alone: the TLS handshake (server
certificate, client certificate), the bearer token on every call, and the
one line a user gets when any of it fails, with nothing of grpcio's own
logging around it. The last ones run against a real ``prism serve``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from prism.proto import kv_pb2
from tests.integration.conftest import PrismProcess, free_port
from tests.tokens import AUDIENCE, ISSUER, Issuer

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"


@dataclass
class Seen:
    """What the server was sent: every call's authorization header, and the puts."""

    authorization: list[str] = field(default_factory=list)
    items: dict[bytes, bytes] = field(default_factory=dict)


def servicer(seen: Seen, *, require_token: bool) -> Any:
    def check(context: grpc.ServicerContext) -> None:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        seen.authorization.append(auth)
        if require_token and auth != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

    def put_items(request: kv_pb2.PutItemsRequest, context: grpc.ServicerContext) -> kv_pb2.PutItemsResponse:
        check(context)
        for item in request.items:
            seen.items[item.key] = item.value
        return kv_pb2.PutItemsResponse()

    def get_items(request: kv_pb2.GetItemsRequest, context: grpc.ServicerContext) -> kv_pb2.GetItemsResponse:
        check(context)
        return kv_pb2.GetItemsResponse(
            items=[kv_pb2.Item(key=k, value=v) for k, v in sorted(seen.items.items())]
        )

    handlers = {
        "PutItems": grpc.unary_unary_rpc_method_handler(
            put_items, kv_pb2.PutItemsRequest.FromString, kv_pb2.PutItemsResponse.SerializeToString
        ),
        "GetItems": grpc.unary_unary_rpc_method_handler(
            get_items, kv_pb2.GetItemsRequest.FromString, kv_pb2.GetItemsResponse.SerializeToString
        ),
    }
    return grpc.method_handlers_generic_handler("prism.kv.v1.KeyValue", handlers)


@dataclass
class Pki:
    dir: Path
    ca: trustme.CA
    server: trustme.LeafCert

    def path(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "other-ca.pem"))
    client = ca.issue_cert("alice@prism.test")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    (d / "token").write_text(TOKEN + "\n")
    return Pki(d, ca, ca.issue_cert("127.0.0.1", "localhost"))


Server = tuple[str, Seen]


def start(
    pki: Pki | None, *, client_ca: bool = False, require_token: bool = False
) -> tuple[grpc.Server, Server]:
    seen = Seen()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((servicer(seen, require_token=require_token),))
    if pki is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials(
            [(pki.server.private_key_pem.bytes(), pki.server.cert_chain_pems[0].bytes())],
            root_certificates=pki.ca.cert_pem.bytes() if client_ca else None,
            require_client_auth=client_ca,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, (f"127.0.0.1:{port}", seen)


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[Server]:
    server, endpoint = start(pki)
    yield endpoint
    server.stop(None)


@pytest.fixture
def mtls_server(pki: Pki) -> Iterator[Server]:
    server, endpoint = start(pki, client_ca=True, require_token=True)
    yield endpoint
    server.stop(None)


@pytest.fixture
def plaintext_server() -> Iterator[Server]:
    server, endpoint = start(None, require_token=True)
    yield endpoint
    server.stop(None)


def prism(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PRISM_", "GRPC_"))}
    return subprocess.run(
        [sys.executable, "-m", "prism.cli", *args, "--timeout", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def one_line_failure(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert done.returncode == code, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()  # and nothing of grpcio's own logging
    return line


def test_put_and_get_over_tls_with_a_token(tls_server: Server, pki: Pki) -> None:
    endpoint, seen = tls_server
    flags = ["--endpoint", endpoint, "--tls-ca", pki.path("ca.pem"), "--token-file", pki.path("token")]

    assert prism("kv", "put", "ns", "r", "k", "over tls", *flags).returncode == 0
    got = prism("kv", "get", "ns", "r", *flags)

    assert (got.returncode, got.stdout) == (0, "k = over tls\n")
    assert seen.authorization == [f"Bearer {TOKEN}"] * 2  # on every call


def test_the_environment_gives_the_same_call(tls_server: Server, pki: Pki) -> None:
    endpoint, seen = tls_server
    env = {
        "PRISM_ENDPOINT": endpoint,
        "PRISM_TLS_CA": pki.path("ca.pem"),
        "PRISM_TOKEN_FILE": pki.path("token"),
    }

    assert prism("kv", "put", "ns", "r", "k", "v", env=env).returncode == 0
    assert seen.authorization == [f"Bearer {TOKEN}"]


def test_mtls_with_a_client_certificate(mtls_server: Server, pki: Pki) -> None:
    endpoint, seen = mtls_server
    flags = ["--endpoint", endpoint, "--tls-ca", pki.path("ca.pem"), "--token-file", pki.path("token")]
    mtls = ["--cert", pki.path("client.pem"), "--key", pki.path("client.key")]

    assert prism("kv", "put", "ns", "r", "k", "v", *flags, *mtls).returncode == 0
    assert seen.items == {b"k": b"v"}

    line = one_line_failure(prism("kv", "get", "ns", "r", *flags))  # no client certificate
    assert line == (
        f"prism: {endpoint} closed the connection during the TLS handshake "
        "(it may want a client certificate: --cert and --key, or not this one)"
    )


def test_a_server_certificate_from_another_ca_is_one_line(tls_server: Server, pki: Pki) -> None:
    endpoint, seen = tls_server

    line = one_line_failure(
        prism("kv", "get", "ns", "r", "--endpoint", endpoint, "--tls-ca", pki.path("other-ca.pem"))
    )

    assert line == (
        f"prism: TLS handshake with {endpoint} failed: the server's certificate does not verify "
        "(unable to get local issuer certificate); is --tls-ca the CA that signed it?"
    )
    assert seen.authorization == []


def test_tls_to_a_plaintext_port_is_one_line(plaintext_server: Server, pki: Pki) -> None:
    endpoint, _ = plaintext_server

    line = one_line_failure(
        prism("kv", "get", "ns", "r", "--endpoint", endpoint, "--tls-ca", pki.path("ca.pem"))
    )

    assert line == (
        f"prism: TLS handshake with {endpoint} failed: "
        "the server does not speak TLS there (a plaintext port?)"
    )


def test_plaintext_to_a_tls_port_is_one_line(tls_server: Server) -> None:
    endpoint, _ = tls_server

    line = one_line_failure(prism("kv", "get", "ns", "r", "--endpoint", endpoint))

    assert line == f"prism: {endpoint} closed the connection (a TLS port? give --tls-ca)"


def test_an_auth_failure_is_one_line(plaintext_server: Server, pki: Pki) -> None:
    endpoint, seen = plaintext_server

    line = one_line_failure(prism("kv", "get", "ns", "r", "--endpoint", endpoint))
    assert (
        line
        == "prism: UNAUTHENTICATED: a valid bearer token is required (no --token-file or --cert was given)"
    )

    # To this machine, a token may go in plaintext (grpcio's local credentials).
    done = prism("kv", "get", "ns", "r", "--endpoint", endpoint, "--token-file", pki.path("token"))
    assert done.returncode == 0, done.stderr
    assert seen.authorization == ["", f"Bearer {TOKEN}"]


def test_a_missing_file_is_one_line_and_exit_2(tls_server: Server, pki: Pki) -> None:
    endpoint, seen = tls_server
    missing = pki.path("missing.pem")

    line = one_line_failure(
        prism("kv", "get", "ns", "r", "--endpoint", endpoint, "--tls-ca", missing), code=2
    )

    assert line == f"prism: cannot read --tls-ca {missing}: No such file or directory"
    assert seen.authorization == []


def test_a_real_prism_serve_over_tls(pki: Pki, tmp_path: Path) -> None:
    """The CLI against ``prism serve`` with [tls], not a stand-in."""
    pki.server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    pki.server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    port, admin_port = free_port(), free_port()
    (tmp_path / "prism.toml").write_text(
        f'admin_listen = "127.0.0.1:{admin_port}"\n'
        f'[tls]\ncert_file = "{tmp_path / "server.pem"}"\nkey_file = "{tmp_path / "server.key"}"\n'
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "prism.cli", "serve", "--config", str(tmp_path / "prism.toml")],
        cwd=tmp_path,
        env={**os.environ, "PRISM_LISTEN": f"127.0.0.1:{port}", "PRISM_WORKERS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    flags = ["--endpoint", f"127.0.0.1:{port}", "--tls-ca", pki.path("ca.pem")]
    try:
        deadline = time.monotonic() + 30
        while (put := prism("kv", "put", "default", "r", "k", "over tls", *flags)).returncode != 0:
            assert server.poll() is None, server.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, put.stderr
            time.sleep(0.2)
        got = prism("kv", "get", "default", "r", *flags)
        assert (got.returncode, got.stdout) == (0, "k = over tls\n")
        line = one_line_failure(prism("kv", "get", "default", "r", "--endpoint", f"127.0.0.1:{port}"))
        assert line.startswith(f"prism: 127.0.0.1:{port} closed the connection")
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.communicate()


AUTH_CONFIG = """
[auth]
jwt = {{ jwks_file = "{jwks}", issuer = "{issuer}", audience = "{audience}" }}

[[access]]
principals = ["alice"]
namespaces = ["default"]
allow = ["read", "write"]

[[access]]
principals = ["bob"]
namespaces = ["default"]
allow = ["read"]

[[namespaces]]
name = "default"
backend = "sqlite"
"""


def test_tokens_against_a_real_prism_serve_with_auth(tmp_path: Path) -> None:
    """The token reaches prism's own check (plaintext to this machine), and its refusals are one line."""
    issuer = Issuer()
    jwks = issuer.write_jwks(tmp_path / "jwks.json")
    for name in ("alice", "bob"):
        (tmp_path / f"{name}.token").write_text(issuer.token(name) + "\n")
    (tmp_path / "expired.token").write_text(issuer.token("alice", exp=int(time.time()) - 3600) + "\n")
    server = PrismProcess(tmp_path / "data", AUTH_CONFIG.format(jwks=jwks, issuer=ISSUER, audience=AUDIENCE))
    server.start()
    try:
        ep = ["--endpoint", server.endpoint]
        put = ["kv", "put", "default", "r", "k", "v", *ep]

        done = prism(*put, "--token-file", str(tmp_path / "alice.token"))
        assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
        got = prism("kv", "get", "default", "r", *ep, env={"PRISM_TOKEN_FILE": str(tmp_path / "bob.token")})
        assert (got.returncode, got.stdout) == (0, "k = v\n"), got.stderr

        assert one_line_failure(prism(*put)).startswith("prism: UNAUTHENTICATED: ")
        assert one_line_failure(prism(*put)).endswith("(no --token-file or --cert was given)")
        expired = one_line_failure(prism(*put, "--token-file", str(tmp_path / "expired.token")))
        assert expired.startswith("prism: UNAUTHENTICATED: ") and "expired" in expired
        denied = one_line_failure(prism(*put, "--token-file", str(tmp_path / "bob.token")))
        assert denied.startswith("prism: PERMISSION_DENIED: ")
    finally:
        server.stop()
