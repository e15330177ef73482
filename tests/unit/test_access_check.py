"""The access check on every call path, in-process: an App on memory backends,
a real h2 client over memory streams, real tokens and JWKS.

The paths: a unary call run by a task, a unary call answered at once from
the shared cache (``Method.answer_now``), a Subscribe stream, and a call
another worker forwarded (``Forwarding.serve``), whose sender's principal
is checked again where it arrives.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from prism.cache.shared import SharedCache
from prism.config import NamespaceConfig, ServerConfig
from prism.config.namespaces import CacheConfig
from prism.config.security import AccessRule, AuthConfig, JwtConfig
from prism.errors import StatusCode
from prism.proto import kv_pb2, pubsub_pb2
from prism.router.messages import ForwardCall
from prism.security.runtime import NO_CREDENTIALS
from prism.security.section import SecuritySection
from prism.workers.app import App
from tests.tokens import AUDIENCE, ISSUER, Issuer

from .apps import serving_app
from .h2client import H2Client, Response, frame
from .test_forwarding import Node, client_of, routes, running

PUT = "/prism.kv.v1.KeyValue/PutItems"
GET = "/prism.kv.v1.KeyValue/GetItems"
SUBSCRIBE = "/prism.pubsub.v1.PubSub/Subscribe"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

MakeSection = Callable[..., SecuritySection]

RULES = (
    AccessRule(("alice",), ("kv", "orders-*", "topics"), ("read", "write")),
    AccessRule(("bob", "team-*"), ("kv",), ("read",)),
)


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def make_section(issuer: Issuer, tmp_path: Path) -> Iterator[MakeSection]:
    jwks = issuer.write_jwks(tmp_path / "jwks.json")

    def make(rules: tuple[AccessRule, ...] = RULES, *, audit_writes: bool = False) -> SecuritySection:
        auth = AuthConfig(JwtConfig(jwks, ISSUER, AUDIENCE))
        return SecuritySection(1, auth=auth, access=rules, audit_writes=audit_writes)

    yield make


@asynccontextmanager
async def served(tmp_path: Path, section: SecuritySection) -> AsyncIterator[tuple[App, H2Client]]:
    cache = SharedCache.create(1 << 20, 1024, version_words=1024)
    app = App(ServerConfig(data_dir=str(tmp_path / "data")), shared_cache=cache)
    await app.apply(
        [
            NamespaceConfig("kv", backend="memory", cache=CacheConfig(enabled=True)),
            NamespaceConfig("topics", abstraction="pubsub", backend="memory"),
        ]
    )
    app.settings.security.apply(section)
    async with serving_app(app) as client:
        yield app, client


def auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def put(client: H2Client, namespace: str, token: str | None) -> Response:
    request = kv_pb2.PutItemsRequest(namespace=namespace, id="r", items=[kv_pb2.Item(key=b"k", value=b"v")])
    with trio.fail_after(5):
        return await client.call(PUT, frame(request.SerializeToString()), extra=auth(token) if token else [])


async def get(client: H2Client, namespace: str, token: str | None) -> Response:
    request = kv_pb2.GetItemsRequest(namespace=namespace, id="r")
    with trio.fail_after(5):
        return await client.call(GET, frame(request.SerializeToString()), extra=auth(token) if token else [])


def outcome(r: Response) -> tuple[int | None, str]:
    return r.status, r.message


DENIED_BOB = (StatusCode.PERMISSION_DENIED, "permission denied: 'bob' may not write this namespace")


async def test_a_token_and_a_rule_are_needed_on_a_secured_server(
    issuer: Issuer, make_section: MakeSection, tmp_path: Path
) -> None:
    alice, bob = issuer.token("alice"), issuer.token("bob", kid="ec")
    async with served(tmp_path, make_section()) as (_, client):
        assert (await put(client, "kv", alice)).status == StatusCode.OK
        assert (await get(client, "kv", bob)).status == StatusCode.OK  # bob may read kv
        assert outcome(await put(client, "kv", bob)) == DENIED_BOB
        assert outcome(await put(client, "kv", None)) == (StatusCode.UNAUTHENTICATED, NO_CREDENTIALS)
        expired = issuer.token("alice", exp=1)
        assert outcome(await put(client, "kv", expired)) == (
            StatusCode.UNAUTHENTICATED,
            "invalid bearer token: expired",
        )
        assert outcome(await put(client, "kv", issuer.unsigned("alice"))) == (
            StatusCode.UNAUTHENTICATED,
            "invalid bearer token: unsupported algorithm",
        )
        # Glob rules: team-* may read kv; alice may use any orders-* namespace
        # (this one does not exist: allowed, then looked up).
        assert (await get(client, "kv", issuer.token("team-red"))).status == StatusCode.OK
        assert outcome(await get(client, "orders-x", alice)) == (
            StatusCode.NOT_FOUND,
            "unknown namespace 'orders-x'",
        )


async def test_a_forbidden_unknown_namespace_looks_like_a_forbidden_existing_one(
    issuer: Issuer, make_section: MakeSection, tmp_path: Path
) -> None:
    bob = issuer.token("bob")
    async with served(tmp_path, make_section()) as (_, client):
        assert outcome(await put(client, "kv", bob)) == DENIED_BOB
        assert outcome(await put(client, "no-such-namespace", bob)) == DENIED_BOB
        # Without credentials, nothing about namespaces either.
        assert outcome(await get(client, "no-such-namespace", None)) == outcome(await get(client, "kv", None))


async def test_health_and_reflection_stay_open(make_section: MakeSection, tmp_path: Path) -> None:
    async with served(tmp_path, make_section()) as (_, client):
        r = await client.call(HEALTH, frame(health_pb2.HealthCheckRequest().SerializeToString()))
        assert r.status == StatusCode.OK
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        r = await client.call(REFLECTION, frame(request.SerializeToString()))
        assert r.status == StatusCode.OK
        [raw] = r.messages()
        listed = reflection_pb2.ServerReflectionResponse.FromString(raw).list_services_response.service
        assert "prism.kv.v1.KeyValue" in {s.name for s in listed}


async def test_a_shared_cache_hit_is_checked_before_it_is_served(
    issuer: Issuer, make_section: MakeSection, tmp_path: Path
) -> None:
    alice = issuer.token("alice")
    async with served(tmp_path, make_section((RULES[0],))) as (app, client):
        cache = app.kv._shared_cache
        assert cache is not None
        assert (await put(client, "kv", alice)).status == StatusCode.OK
        assert (await get(client, "kv", alice)).status == StatusCode.OK  # a miss fills the cache
        hits = cache.stats().hits
        assert (await get(client, "kv", alice)).status == StatusCode.OK
        assert cache.stats().hits == hits + 1  # that one was answered from the cache
        # The same request bytes, hence the same cache entry, without the right to read:
        assert outcome(await get(client, "kv", None)) == (StatusCode.UNAUTHENTICATED, NO_CREDENTIALS)
        assert outcome(await get(client, "kv", issuer.token("bob"))) == (
            StatusCode.PERMISSION_DENIED,
            "permission denied: 'bob' may not read this namespace",
        )
        assert cache.stats().hits == hits + 1  # the cache was not even looked at


async def test_subscribe_is_checked(
    issuer: Issuer, make_section: MakeSection, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    body = frame(pubsub_pb2.SubscribeRequest(namespace="topics", topic="t").SerializeToString())
    async with served(tmp_path, make_section()) as (_, client):
        r = await client.call(SUBSCRIBE, body)
        assert outcome(r) == (StatusCode.UNAUTHENTICATED, NO_CREDENTIALS)
        r = await client.call(SUBSCRIBE, body, extra=auth(issuer.token("bob")))
        assert outcome(r) == (
            StatusCode.PERMISSION_DENIED,
            "permission denied: 'bob' may not read this namespace",
        )
        # alice may: her stream is under way (headers sent) until its deadline.
        r = await client.call(SUBSCRIBE, body, extra=[*auth(issuer.token("alice")), ("grpc-timeout", "1S")])
        assert r.headers[":status"] == "200" and r.status == StatusCode.DEADLINE_EXCEEDED


async def test_without_security_nothing_is_checked(issuer: Issuer, tmp_path: Path) -> None:
    async with served(tmp_path, SecuritySection(1)) as (_, client):
        assert (await put(client, "kv", None)).status == StatusCode.OK
        assert (await put(client, "kv", "not even a token")).status == StatusCode.OK


async def test_denials_and_audited_writes_are_logged_without_the_token(
    issuer: Issuer, make_section: MakeSection, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="prism")  # every line Prism writes, at any level
    alice, bob, expired = issuer.token("alice"), issuer.token("bob"), issuer.token("alice", exp=1)
    async with served(tmp_path, make_section(audit_writes=True)) as (_, client):
        await put(client, "kv", alice)
        await get(client, "kv", alice)  # a read: not audited
        await put(client, "ledger", bob)
        await put(client, "kv", expired)
        await get(client, "kv", None)
    audit = [(r.getMessage(), r.fields) for r in caplog.records if r.name == "prism.audit"]  # type: ignore[attr-defined]
    assert audit == [
        ("write", {"principal": "alice", "peer": "", "namespace": "kv", "method": "KeyValue/PutItems"}),
        (
            "denied",
            {
                "principal": "bob",
                "peer": "",
                "namespace": "ledger",
                "method": "KeyValue/PutItems",
                "status": "PERMISSION_DENIED",
                "reason": "no rule allows write",
            },
        ),
        (
            "denied",
            {
                "principal": None,
                "peer": "",
                "namespace": "kv",
                "method": "KeyValue/PutItems",
                "status": "UNAUTHENTICATED",
                "reason": "bearer token: expired",
            },
        ),
        (
            "denied",
            {
                "principal": None,
                "peer": "",
                "namespace": "kv",
                "method": "KeyValue/GetItems",
                "status": "UNAUTHENTICATED",
                "reason": "no credentials",
            },
        ),
    ]
    assert caplog.records
    for record in caplog.records:
        text = f"{record.getMessage()} {getattr(record, 'fields', '')} {record.exc_text or ''}"
        for token in (alice, bob, expired):
            assert token not in text and token.split(".")[2] not in text


# -- forwarded calls -----------------------------------------------------------


def forwarded(principal: str | None, *, namespace: str = "kv", peer: str = "10.1.2.3:4567") -> ForwardCall:
    request = kv_pb2.PutItemsRequest(namespace=namespace, id="r", items=[kv_pb2.Item(key=b"k", value=b"v")])
    return ForwardCall(
        7, "ipc:///unused", PUT.encode(), request.SerializeToString(), [], None, principal, peer
    )


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    ipc = Path(tempfile.mkdtemp(prefix="pacc", dir="/tmp"))
    yield Node(1, "a", ipc, tmp_path), Node(2, "b", ipc, tmp_path)
    shutil.rmtree(ipc, ignore_errors=True)


async def test_a_forwarded_call_is_checked_again_where_it_arrives(
    nodes: tuple[Node, Node], make_section: MakeSection, caplog: pytest.LogCaptureFixture
) -> None:
    _, b = nodes
    await b.install(routes(1, {"kv": ("b", "keyvalue")}, b))
    b.app.settings.security.apply(make_section())
    caplog.set_level(logging.INFO, logger="prism.audit")
    answer = await b.remote.serve(forwarded("bob"))
    assert (answer.status, answer.message) == DENIED_BOB
    answer = await b.remote.serve(forwarded(None))  # a sender that ran no check
    assert (answer.status, answer.message) == (StatusCode.UNAUTHENTICATED, NO_CREDENTIALS)
    answer = await b.remote.serve(forwarded("bob", namespace="no-such-namespace"))
    assert (answer.status, answer.message) == DENIED_BOB
    assert (await b.remote.serve(forwarded("alice"))).status == StatusCode.OK
    assert b.observed == [
        ("KeyValue/PutItems", StatusCode.PERMISSION_DENIED),
        ("KeyValue/PutItems", StatusCode.UNAUTHENTICATED),
        ("KeyValue/PutItems", StatusCode.PERMISSION_DENIED),
        ("KeyValue/PutItems", StatusCode.OK),
    ]
    audit = [r.fields for r in caplog.records if r.name == "prism.audit"]  # type: ignore[attr-defined]
    assert [(f["principal"], f["peer"], f["status"]) for f in audit] == [
        ("bob", "10.1.2.3:4567", "PERMISSION_DENIED"),
        (None, "10.1.2.3:4567", "UNAUTHENTICATED"),
        ("bob", "10.1.2.3:4567", "PERMISSION_DENIED"),
    ]
    await b.app.aclose()


async def test_a_call_goes_out_with_its_principal_not_its_token(
    issuer: Issuer, nodes: tuple[Node, Node], make_section: MakeSection, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = nodes
    table = routes(1, {"kv": ("b", "keyvalue")}, a, b)
    await a.install(table)
    await b.install(table)
    # The front worker lets bob write kv; the owner does not (its rules are
    # another generation's, say): the owner's check decides.
    a.app.settings.security.apply(
        make_section((*RULES, AccessRule(("bob",), ("kv",), ("write",))), audit_writes=True)
    )
    b.app.settings.security.apply(make_section(audit_writes=True))
    caplog.set_level(logging.INFO, logger="prism.audit")
    arrived: list[ForwardCall] = []
    serve = b.remote.serve

    async def spy(request: ForwardCall) -> object:
        arrived.append(request)
        return await serve(request)

    b.remote.bus._handle = spy  # type: ignore[assignment]
    alice, bob = issuer.token("alice"), issuer.token("bob")
    async with running(a, b), client_of(a) as client:
        assert (await put(client, "kv", alice)).status == StatusCode.OK
        assert outcome(await put(client, "kv", bob)) == DENIED_BOB
    assert [(c.principal, c.peer) for c in arrived] == [("alice", ""), ("bob", "")]
    assert all(key != "authorization" for c in arrived for key, _ in c.metadata)
    assert b.observed == [
        ("KeyValue/PutItems", StatusCode.OK),
        ("KeyValue/PutItems", StatusCode.PERMISSION_DENIED),
    ]
    # Each write audited once, by the worker the client reached; the owner's denial by the owner.
    audit = [(r.getMessage(), r.fields["principal"]) for r in caplog.records if r.name == "prism.audit"]  # type: ignore[attr-defined]
    assert audit == [("write", "alice"), ("write", "bob"), ("denied", "bob")]
