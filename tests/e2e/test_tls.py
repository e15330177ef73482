"""TLS on the gRPC port with real ``prism serve`` trees and stock grpcio clients.

Valid TLS and mTLS calls; clients refused at the handshake (no, unknown or
expired client certificate, plaintext, ALPN without h2) while everyone else
is served; a client that never handshakes holds up no one; TLS sent to a
plaintext port; a ClientHello naming another tenant (SNI) handed to that
tenant's worker, whose calls then take no forwarding hop; a certificate
rotated by SIGHUP under a connection that keeps going.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from prism.proto import kv_pb2, kv_pb2_grpc
from tests.certs import (
    client_cert,
    client_context,
    grpc_credentials,
    server_files,
    tls_toml,
    write_server_cert,
)

from .conftest import PrismTree, get, put, sqlite_ns, tenant_toml, wait_until


@pytest.fixture
def channels() -> Iterator[list[grpc.Channel]]:
    opened: list[grpc.Channel] = []
    yield opened
    for channel in opened:
        channel.close()


def tls_kv(
    tree: PrismTree,
    opened: list[grpc.Channel],
    credentials: grpc.ChannelCredentials,
    name: str = "prism.test",
    *,
    insecure: bool = False,
) -> kv_pb2_grpc.KeyValueStub:
    """A KeyValue stub on its own connection, its SNI and certificate name ``name``."""
    options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    if insecure:
        channel = grpc.insecure_channel(tree.endpoint, options=options)
    else:
        options.append(("grpc.ssl_target_name_override", name))
        channel = grpc.secure_channel(tree.endpoint, credentials, options=options)
    opened.append(channel)
    return kv_pb2_grpc.KeyValueStub(channel)


def status_of(stub: kv_pb2_grpc.KeyValueStub) -> str:
    try:
        get(stub, "kv", "r", timeout=5)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def quiet(tree: PrismTree) -> None:
    """Nothing a client did was the server's error."""
    log = tree.stderr()
    assert "Traceback" not in log and "connection failed" not in log, log[-3000:]


def served_certificate(tree: PrismTree) -> bytes:
    """The DER certificate a new TLS connection is served."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", tree.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="prism.test") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


# -- one mTLS server for the per-connection cases ------------------------------


@dataclass
class Mtls:
    tree: PrismTree
    ca: trustme.CA
    clients: trustme.CA

    def good(self) -> grpc.ChannelCredentials:
        return grpc_credentials(self.ca, client_cert(self.clients, "alice"))


HANDSHAKE_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mtls]:
    root = tmp_path_factory.mktemp("mtls")
    ca, clients = trustme.CA(), trustme.CA()
    tls = server_files(root / "tls", ca, client_ca=clients, handshake_timeout_s=HANDSHAKE_TIMEOUT_S)
    # One worker: the silent client and the others share its accept loop.
    tree = PrismTree(root / "tree", tls_toml(tls) + tenant_toml("t", [sqlite_ns("kv")]))
    try:
        tree.start()
        yield Mtls(tree, ca, clients)
    finally:
        tree.stop()


def test_a_valid_mtls_call_is_served(mtls: Mtls, channels: list[grpc.Channel]) -> None:
    stub = tls_kv(mtls.tree, channels, mtls.good())
    put(stub, "kv", "r", b"k", b"v")
    assert get(stub, "kv", "r") == {b"k": b"v"}


def test_clients_refused_at_the_handshake_fail_alone(mtls: Mtls, channels: list[grpc.Channel]) -> None:
    tree = mtls.tree
    before = tls_kv(tree, channels, mtls.good())  # a connection made before, kept throughout
    put(before, "kv", "r", b"k", b"v")
    refused = {
        "no client certificate": tls_kv(tree, channels, grpc_credentials(mtls.ca)),
        "another CA's certificate": tls_kv(
            tree, channels, grpc_credentials(mtls.ca, client_cert(trustme.CA(), "alice"))
        ),
        "an expired certificate": tls_kv(
            tree, channels, grpc_credentials(mtls.ca, client_cert(mtls.clients, "alice", expired=True))
        ),
        "a plaintext client": tls_kv(tree, channels, grpc_credentials(mtls.ca), insecure=True),
    }
    assert {case: status_of(stub) for case, stub in refused.items()} == dict.fromkeys(refused, "UNAVAILABLE")
    assert get(before, "kv", "r") == {b"k": b"v"}
    assert get(tls_kv(tree, channels, mtls.good()), "kv", "r") == {b"k": b"v"}
    quiet(tree)


def test_a_client_that_does_not_select_h2_is_closed_after_the_handshake(mtls: Mtls) -> None:
    for alpn in (("http/1.1",), ()):
        context = client_context(mtls.ca, client_cert(mtls.clients, "alice"), alpn=alpn)
        with socket.create_connection(("127.0.0.1", mtls.tree.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="prism.test") as tls:
                assert tls.selected_alpn_protocol() is None  # the handshake itself completed
                try:
                    data = tls.recv(1024)
                except (ssl.SSLError, ConnectionResetError):
                    data = b""
                assert data == b"", alpn  # closed: not even the server's HTTP/2 preface
    quiet(mtls.tree)


def test_a_client_that_never_handshakes_holds_up_no_one(mtls: Mtls, channels: list[grpc.Channel]) -> None:
    silent = socket.create_connection(("127.0.0.1", mtls.tree.port), timeout=HANDSHAKE_TIMEOUT_S + 10)
    with silent:
        opened = time.monotonic()
        for n in range(3):  # new connections to the same worker, served meanwhile
            stub = tls_kv(mtls.tree, channels, mtls.good())
            put(stub, "kv", f"s{n}", b"k", b"v")
        served_in = time.monotonic() - opened
        assert served_in < HANDSHAKE_TIMEOUT_S, f"served only after {served_in:.2f}s"
        assert silent.recv(1) == b""  # then the silent one is closed, at its timeout
        closed_in = time.monotonic() - opened
    assert HANDSHAKE_TIMEOUT_S - 0.5 < closed_in < HANDSHAKE_TIMEOUT_S + 5, closed_in
    quiet(mtls.tree)


# -- plaintext port ------------------------------------------------------------


def test_tls_to_a_plaintext_port_fails_that_connection_alone(
    prism_tree, channels: list[grpc.Channel]
) -> None:
    tree = prism_tree(tenant_toml("t", [sqlite_ns("kv")]))
    plain = tree.kv()
    put(plain, "kv", "r", b"k", b"v")
    assert status_of(tls_kv(tree, channels, grpc_credentials(trustme.CA()))) == "UNAVAILABLE"
    assert get(plain, "kv", "r") == {b"k": b"v"}
    assert get(tree.kv(), "kv", "r") == {b"k": b"v"}
    quiet(tree)


# -- SNI hand-off --------------------------------------------------------------


def test_a_client_hello_naming_a_tenant_goes_to_that_tenants_worker(
    prism_tree, tmp_path: Path, channels: list[grpc.Channel]
) -> None:
    """payments' worker is stopped while the connections are made, so a's
    worker accepts every one: each must be handed over, by its SNI alone."""
    ca = trustme.CA()
    tls = server_files(tmp_path / "tls", ca)
    tree = prism_tree(
        tls_toml(tls) + tenant_toml("a", [sqlite_ns("na")]) + tenant_toml("payments", [sqlite_ns("np")]),
        heartbeat_timeout_s=5.0,
    )
    credentials = grpc_credentials(ca)
    via_a = tls_kv(tree, channels, credentials, "a.prism.test")
    put(via_a, "np", "r", b"k", b"v0")  # a TLS call, forwarded from a to payments
    forwarded = tree.metric("prism_forwarded_calls_total")
    assert forwarded >= 1
    handoffs = tree.metric("prism_connection_handoffs_total", tenant="payments")

    [payments] = tree.owners("np")
    tree.stop_worker(payments["pid"])
    try:
        stubs = [tls_kv(tree, channels, credentials, "payments.prism.test") for _ in range(3)]
        first = [s.GetItems.future(kv_pb2.GetItemsRequest(namespace="np", id="r"), timeout=10) for s in stubs]
        time.sleep(0.3)
    finally:
        os.kill(payments["pid"], signal.SIGCONT)
    assert [[i.value for i in f.result().items] for f in first] == [[b"v0"]] * 3
    assert tree.metric("prism_connection_handoffs_total", tenant="payments") == handoffs + 3

    for n, stub in enumerate(stubs):
        put(stub, "np", "r", b"k", f"v{n}".encode())
        assert get(stub, "np", "r") == {b"k": f"v{n}".encode()}
    assert tree.metric("prism_forwarded_calls_total") == forwarded  # served by payments itself
    quiet(tree)


# -- rotation ------------------------------------------------------------------


def test_a_certificate_rotated_by_sighup_is_served_to_new_connections_while_old_ones_keep_going(
    prism_tree, tmp_path: Path, channels: list[grpc.Channel]
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    tls = server_files(tmp_path / "tls", old_ca)
    tree = prism_tree(tls_toml(tls) + tenant_toml("t", [sqlite_ns("kv")], workers=2))
    # Trusts the old CA alone: were its connection replaced, the new
    # certificate would fail it. Its calls going on prove the connection lasts.
    old = tls_kv(tree, channels, grpc_credentials(old_ca))
    put(old, "kv", "r", b"k", b"v1")
    assert status_of(tls_kv(tree, channels, grpc_credentials(new_ca))) == "UNAVAILABLE"

    new_cert = write_server_cert(tmp_path / "tls", new_ca)
    tree.send_signal(signal.SIGHUP)
    # Every worker (new connections land on either) serves the new certificate.
    wait_until(
        lambda: all(served_certificate(tree) == der_of(new_cert) for _ in range(6)),
        5.0,
        what="new connections served the new certificate",
    )
    assert get(tls_kv(tree, channels, grpc_credentials(new_ca)), "kv", "r") == {b"k": b"v1"}
    assert status_of(tls_kv(tree, channels, grpc_credentials(old_ca))) == "UNAVAILABLE"
    for n in range(2, 5):
        put(old, "kv", "r", b"k", f"v{n}".encode())
        assert get(old, "kv", "r") == {b"k": f"v{n}".encode()}

    # A key that does not load: the reload is refused, and the certificate in use stays.
    Path(tls.key_file).write_text("not a key\n")
    tree.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload rejected" in tree.stderr(), 5.0, what="the reload rejected")
    assert served_certificate(tree) == der_of(new_cert)
    assert get(tls_kv(tree, channels, grpc_credentials(new_ca)), "kv", "r") == {b"k": b"v4"}
    assert get(old, "kv", "r") == {b"k": b"v4"}
    quiet(tree)


def test_the_client_certificate_is_the_principal_the_rules_decide_on(
    tmp_path: Path, channels: list[grpc.Channel]
) -> None:
    ca, clients = trustme.CA(), trustme.CA()
    tls = server_files(tmp_path / "tls", ca, client_ca=clients)
    rules = '[[access]]\nprincipals = ["alice"]\nnamespaces = ["kv"]\nallow = ["read", "write"]\n'
    plain_tls = tls_toml(tls).split("[[access]]")[0]  # this test's own rules, not the allow-all one
    tree = PrismTree(tmp_path / "tree", plain_tls + rules + tenant_toml("t", [sqlite_ns("kv")]))
    tree.start()
    try:
        alice = tls_kv(tree, channels, grpc_credentials(ca, client_cert(clients, "alice")))
        put(alice, "kv", "r", b"k", b"v")
        assert get(alice, "kv", "r") == {b"k": b"v"}
        bob = tls_kv(tree, channels, grpc_credentials(ca, client_cert(clients, "bob")))
        with pytest.raises(grpc.RpcError) as denied:
            get(bob, "kv", "r", timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'bob'" in (denied.value.details() or "")
    finally:
        tree.stop()
    audit = [line for line in tree.stderr().splitlines() if '"prism.audit"' in line]
    assert any('"bob"' in line for line in audit), audit
