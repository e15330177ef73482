"""Access control across a process tree: two tenants, forwarded calls, the
shared cache, the audit log, and no token anywhere Prism writes."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import pytest

from prism.proto import kv_pb2
from tests.tokens import AUDIENCE, ISSUER, Issuer, bearer

from .conftest import sqlite_ns, tenant_toml, wait_until

RULES = """
[[access]]
principals = ["alice"]
namespaces = ["na", "nb"]
allow = ["read", "write"]

[[access]]
principals = ["bob"]
namespaces = ["na", "nb"]
allow = ["read"]
"""


def body(jwks: str) -> str:
    return (
        "audit_writes = true\n"
        + tenant_toml("a", [sqlite_ns("na")])
        + tenant_toml("b", [sqlite_ns("nb", cache=True)], workers=2)
        + f'[auth]\njwt = {{ jwks_file = "{jwks}", issuer = "{ISSUER}", audience = "{AUDIENCE}" }}\n'
        + RULES
    )


def refused(call: Any) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code().name, info.value.details()


def audit_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "prism.audit"]


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


def test_forwarded_calls_carry_their_principal_and_are_checked_at_the_owner(
    prism_tree: Any, issuer: Issuer, tmp_path: Any
) -> None:
    tree = prism_tree(body(issuer.write_jwks(tmp_path / "jwks.json")))
    alice, bob = bearer(issuer.token("alice")), bearer(issuer.token("bob"))
    via_a = tree.kv("a.prism")  # a connection handed to tenant a: nb's calls are forwarded to b
    request = kv_pb2.PutItemsRequest(namespace="nb", id="f", items=[kv_pb2.Item(key=b"k", value=b"v")])
    via_a.PutItems(request, metadata=alice, timeout=10)  # the owner accepted the principal a sent
    got = via_a.GetItems(kv_pb2.GetItemsRequest(namespace="nb", id="f"), metadata=bob, timeout=10)
    assert [(i.key, i.value) for i in got.items] == [(b"k", b"v")]
    assert refused(lambda: via_a.PutItems(request, metadata=bob, timeout=10)) == (
        "PERMISSION_DENIED",
        "permission denied: 'bob' may not write this namespace",
    )
    assert refused(lambda: via_a.PutItems(request, timeout=10))[0] == "UNAUTHENTICATED"
    assert tree.metric("prism_forwarded_calls_total") >= 2

    # One audit line per write (where the client is, not again at the owner)
    # and per denial, each naming the client's address.
    def written() -> list[dict[str, Any]]:
        return audit_lines(tree.stderr())

    lines = wait_until(lambda: len(written()) >= 3 and written(), 5, what="three audit lines")
    assert [(x["msg"], x["principal"], x["namespace"], x["method"]) for x in lines] == [
        ("write", "alice", "nb", "KeyValue/PutItems"),
        ("denied", "bob", "nb", "KeyValue/PutItems"),
        ("denied", None, "nb", "KeyValue/PutItems"),
    ]
    assert [x.get("status") for x in lines] == [None, "PERMISSION_DENIED", "UNAUTHENTICATED"]
    assert all(x["peer"].startswith("127.0.0.1:") for x in lines)
    time.sleep(0.3)
    assert len(written()) == 3


def test_a_shared_cache_hit_is_checked(prism_tree: Any, issuer: Issuer, tmp_path: Any) -> None:
    tree = prism_tree(body(issuer.write_jwks(tmp_path / "jwks.json")))
    alice, bob = bearer(issuer.token("alice")), bearer(issuer.token("bob"))
    kv = tree.kv("b.prism")
    request = kv_pb2.GetItemsRequest(namespace="nb", id="c")
    kv.PutItems(
        kv_pb2.PutItemsRequest(namespace="nb", id="c", items=[kv_pb2.Item(key=b"k", value=b"v")]),
        metadata=alice,
        timeout=10,
    )
    kv.GetItems(request, metadata=alice, timeout=10)  # a miss fills the shared cache
    hits = tree.metric("prism_cache_hits_total", namespace="nb")
    kv.GetItems(request, metadata=bob, timeout=10)  # bob may read: a hit
    assert tree.metric("prism_cache_hits_total", namespace="nb") == hits + 1
    assert refused(lambda: kv.GetItems(request, timeout=10)) == (
        "UNAUTHENTICATED",
        "no credentials: send a bearer token (authorization metadata) or a client certificate",
    )
    stranger = bearer(issuer.token("mallory"))
    assert refused(lambda: kv.GetItems(request, metadata=stranger, timeout=10))[0] == "PERMISSION_DENIED"
    assert tree.metric("prism_cache_hits_total", namespace="nb") == hits + 1


def test_no_token_appears_in_logs_or_admin_output(prism_tree: Any, issuer: Issuer, tmp_path: Any) -> None:
    tree = prism_tree(body(issuer.write_jwks(tmp_path / "jwks.json")), env={"PRISM_LOG_LEVEL": "debug"})
    tokens = [issuer.token("alice"), issuer.token("alice", exp=1), issuer.token("bob"), issuer.hmac_signed()]
    kv = tree.kv("a.prism")
    for token in tokens:
        for namespace in ("na", "nb", "nope"):
            for call, request in (
                (
                    kv.PutItems,
                    kv_pb2.PutItemsRequest(namespace=namespace, id="s", items=[kv_pb2.Item(key=b"k")]),
                ),
                (kv.GetItems, kv_pb2.GetItemsRequest(namespace=namespace, id="s")),
            ):
                try:
                    call(request, metadata=bearer(token), timeout=10)
                except grpc.RpcError:
                    pass
    tree.send_signal(1)  # a reload: files read again, more log lines
    wait_until(lambda: "reload" in tree.stderr(), 10, what="the reload logged")
    outputs = {
        "stderr": tree.stderr(),
        "/v1/namespaces": tree.fetch("/v1/namespaces")[1].decode(),
        "/metrics": tree.metrics(),
        "/healthz": tree.fetch("/healthz")[1].decode(),
    }
    assert audit_lines(outputs["stderr"])  # the denials were logged...
    for where, text in outputs.items():
        for token in tokens:
            signature = token.split(".")[2]
            assert token not in text and (not signature or signature not in text), where  # ...but no token


def test_sighup_reads_the_jwks_again_and_a_bad_one_is_rejected(
    prism_tree: Any, issuer: Issuer, tmp_path: Any
) -> None:
    jwks = tmp_path / "jwks.json"
    tree = prism_tree(body(issuer.write_jwks(jwks, "rsa")))
    kv = tree.kv("a.prism")
    request = kv_pb2.GetItemsRequest(namespace="na", id="r")
    by_rsa, by_ec = bearer(issuer.token("alice", kid="rsa")), bearer(issuer.token("alice", kid="ec"))
    kv.GetItems(request, metadata=by_rsa, timeout=10)
    assert refused(lambda: kv.GetItems(request, metadata=by_ec, timeout=10)) == (
        "UNAUTHENTICATED",
        "invalid bearer token: unknown key",
    )

    def accepted(metadata: list[tuple[str, str]]) -> bool:
        try:
            kv.GetItems(request, metadata=metadata, timeout=10)
        except grpc.RpcError:
            return False
        return True

    issuer.write_jwks(jwks, "ec")  # rotation: the ec key in, the rsa key out
    tree.send_signal(1)
    wait_until(lambda: accepted(by_ec), 10, what="the new key accepted after SIGHUP")
    assert refused(lambda: kv.GetItems(request, metadata=by_rsa, timeout=10)) == (
        "UNAUTHENTICATED",
        "invalid bearer token: unknown key",
    )
    jwks.write_text('{"keys": [')  # a bad file: the reload is rejected, the keys in use stay
    tree.send_signal(1)
    wait_until(lambda: "reload rejected" in tree.stderr(), 10, what="the reload rejected")
    rejected = [line for line in tree.stderr().splitlines() if "reload rejected" in line]
    assert len(rejected) == 1 and f"auth.jwt.jwks_file: {jwks}: not JSON" in rejected[0]
    assert accepted(by_ec) and not accepted(by_rsa)
