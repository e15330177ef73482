"""Bearer tokens and access rules through a real ``prism serve`` and a stock grpcio client.

The tokens are made by PyJWT with keys made by ``cryptography`` here, and
the server reads the JWKS this module writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from prism.proto import kv_pb2, kv_pb2_grpc, pubsub_pb2, pubsub_pb2_grpc
from tests.tokens import AUDIENCE, ISSUER, Issuer, bearer

from .conftest import PrismProcess

NO_CREDENTIALS = "no credentials: send a bearer token (authorization metadata) or a client certificate"

CONFIG = """
[auth]
jwt = {{ jwks_file = "{jwks}", issuer = "{issuer}", audience = "{audience}", leeway_s = 30 }}

[[access]]
principals = ["alice", "team-*"]
namespaces = ["default", "orders-*", "topics"]
allow = ["read", "write"]

[[access]]
principals = ["bob"]
namespaces = ["default", "topics"]
allow = ["read"]

[[namespaces]]
name = "default"
backend = "sqlite"

[[namespaces]]
name = "orders-eu"
backend = "memory"

[[namespaces]]
name = "secret"
backend = "memory"

[[namespaces]]
name = "topics"
abstraction = "pubsub"
backend = "memory"
"""


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def server(issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismProcess]:
    root = tmp_path_factory.mktemp("access")
    jwks = issuer.write_jwks(root / "jwks.json")
    process = PrismProcess(root / "data", CONFIG.format(jwks=jwks, issuer=ISSUER, audience=AUDIENCE))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def channel(server: PrismProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.endpoint) as ch:
        yield ch


@pytest.fixture(scope="module")
def kv(channel: grpc.Channel) -> kv_pb2_grpc.KeyValueStub:
    return kv_pb2_grpc.KeyValueStub(channel)


def put_request(namespace: str) -> kv_pb2.PutItemsRequest:
    return kv_pb2.PutItemsRequest(namespace=namespace, id="r1", items=[kv_pb2.Item(key=b"k", value=b"v")])


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_a_valid_token_with_a_rule_is_allowed(issuer: Issuer, kv: kv_pb2_grpc.KeyValueStub) -> None:
    for kid in ("rsa", "ec", "ed"):
        token = bearer(issuer.token("alice", kid=kid))
        kv.PutItems(put_request("default"), metadata=token, timeout=10)
        got = kv.GetItems(kv_pb2.GetItemsRequest(namespace="default", id="r1"), metadata=token, timeout=10)
        assert [(i.key, i.value) for i in got.items] == [(b"k", b"v")]


def _bad_tokens(issuer: Issuer) -> dict[str, str]:
    now = int(time.time())
    return {
        "expired": issuer.token(exp=now - 60),
        "not yet valid": issuer.token(nbf=now + 600),
        "wrong issuer": issuer.token(iss="https://someone-else.test"),
        "wrong audience": issuer.token(aud="another-service"),
        "bad signature": Issuer().token(kid="ec"),  # the same kid, another key
        "unknown key": issuer.token(named="retired-2019"),
        "unsupported algorithm": issuer.unsigned(alg="none"),
        "too large": issuer.token(pad="x" * 7000),
        "not a JWT": "this-is-not-a-jwt",
    }


def test_each_bad_token_is_unauthenticated_and_says_what_was_wrong(
    issuer: Issuer, kv: kv_pb2_grpc.KeyValueStub
) -> None:
    tokens = _bad_tokens(issuer)
    for why, token in tokens.items():
        metadata = bearer(token)
        assert refused(lambda: kv.PutItems(put_request("default"), metadata=metadata, timeout=10)) == (  # noqa: B023
            grpc.StatusCode.UNAUTHENTICATED,
            f"invalid bearer token: {why}",
        ), why
    # HS256 signed with the public key's text: the algorithm confusion attack.
    assert refused(
        lambda: kv.PutItems(put_request("default"), metadata=bearer(issuer.hmac_signed()), timeout=10)
    ) == (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token: unsupported algorithm")
    assert refused(lambda: kv.PutItems(put_request("default"), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        NO_CREDENTIALS,
    )


def test_a_principal_without_the_action_is_permission_denied(
    issuer: Issuer, kv: kv_pb2_grpc.KeyValueStub
) -> None:
    bob = bearer(issuer.token("bob"))
    kv.GetItems(kv_pb2.GetItemsRequest(namespace="default", id="r1"), metadata=bob, timeout=10)
    assert refused(lambda: kv.PutItems(put_request("default"), metadata=bob, timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "permission denied: 'bob' may not write this namespace",
    )
    assert refused(
        lambda: kv.GetItems(kv_pb2.GetItemsRequest(namespace="orders-eu", id="r1"), metadata=bob, timeout=10)
    ) == (grpc.StatusCode.PERMISSION_DENIED, "permission denied: 'bob' may not read this namespace")


def test_glob_rules_match_principals_and_namespaces_by_prefix(
    issuer: Issuer, kv: kv_pb2_grpc.KeyValueStub
) -> None:
    team = bearer(issuer.token("team-payments"))
    kv.PutItems(put_request("orders-eu"), metadata=team, timeout=10)
    assert refused(lambda: kv.PutItems(put_request("secret"), metadata=team, timeout=10))[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # "team-*" does not match "team", nor "orders-*" "orders".
    assert refused(
        lambda: kv.PutItems(put_request("orders-eu"), metadata=bearer(issuer.token("team")), timeout=10)
    )[0] == (grpc.StatusCode.PERMISSION_DENIED)
    assert refused(lambda: kv.PutItems(put_request("orders"), metadata=team, timeout=10))[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # An allowed namespace that does not exist is looked up, and is unknown.
    assert refused(lambda: kv.PutItems(put_request("orders-us"), metadata=team, timeout=10)) == (
        grpc.StatusCode.NOT_FOUND,
        "unknown namespace 'orders-us'",
    )


def test_a_forbidden_unknown_namespace_is_refused_like_a_forbidden_existing_one(
    issuer: Issuer, kv: kv_pb2_grpc.KeyValueStub
) -> None:
    bob = bearer(issuer.token("bob"))
    existing = refused(lambda: kv.PutItems(put_request("secret"), metadata=bob, timeout=10))
    unknown = refused(lambda: kv.PutItems(put_request("no-such-namespace"), metadata=bob, timeout=10))
    assert (
        existing
        == unknown
        == (
            grpc.StatusCode.PERMISSION_DENIED,
            "permission denied: 'bob' may not write this namespace",
        )
    )


def test_health_and_reflection_need_no_credentials(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "prism.kv.v1.KeyValue" in services


def test_subscribe_is_checked(issuer: Issuer, channel: grpc.Channel) -> None:
    pubsub = pubsub_pb2_grpc.PubSubStub(channel)
    request = pubsub_pb2.SubscribeRequest(namespace="topics", topic="t")

    def first(metadata: list[tuple[str, str]]) -> object:
        return next(iter(pubsub.Subscribe(request, metadata=metadata, timeout=10)))

    assert refused(lambda: first([])) == (grpc.StatusCode.UNAUTHENTICATED, NO_CREDENTIALS)
    team = bearer(issuer.token("team-x"))
    assert refused(lambda: first(bearer(issuer.token("carol")))) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "permission denied: 'carol' may not read this namespace",
    )
    # bob may read topics: his stream starts, and its first message is what alice publishes.
    stream = pubsub.Subscribe(request, metadata=bearer(issuer.token("bob")), timeout=10)
    stream.initial_metadata()  # the subscription is in place
    pubsub.Publish(pubsub_pb2.PublishRequest(namespace="topics", topic="t", payload=b"hi"), metadata=team)
    assert next(iter(stream)).payload == b"hi"
    stream.cancel()


def test_a_jwks_that_does_not_load_stops_start_up_with_one_line(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("badjwks")
    (root / "jwks.json").write_text('{"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0", "alg": "HS256"}]}')
    config = CONFIG.format(jwks=root / "jwks.json", issuer=ISSUER, audience=AUDIENCE)
    process = PrismProcess(root / "data", config)
    with pytest.raises(RuntimeError) as info:
        process.start()
    assert str(info.value) == (
        f"prism serve exited 2: prism: config error: auth.jwt.jwks_file: {root}/jwks.json: "
        "keys[0] (kid 'h'): algorithm HS256 is not one of RS256, ES256, EdDSA\n"
    )
