"""Bearer tokens: what is accepted, why the rest is refused, the caches, the JWKS file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jwt
import pytest

from prism.config import ServerConfig
from prism.config.security import AccessRule, AuthConfig, JwtConfig
from prism.errors import ConfigError, PermissionDenied
from prism.rpc.call import Call
from prism.rpc.methods import UNARY, Method
from prism.security.identity import (
    MAX_TOKEN_BYTES,
    JwksError,
    PeerIdentity,
    TokenError,
    TokenVerifier,
    bearer,
    load_jwks,
)
from prism.security.runtime import Security
from prism.security.section import SecuritySection
from prism.workers.preflight import check_deployable
from tests.tokens import AUDIENCE, ISSUER, Issuer


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()  # RSA key generation is slow: one per module


def verifier(issuer: Issuer, tmp_path: Path, *, clock: FakeClock | None = None, **kw: int) -> TokenVerifier:
    config = JwtConfig(issuer.write_jwks(tmp_path / "jwks.json"), ISSUER, AUDIENCE, leeway_s=30)
    extra = {"clock": clock} if clock is not None else {}
    return TokenVerifier(config, load_jwks(config.jwks_file), **extra, **kw)  # type: ignore[arg-type]


def reason(v: TokenVerifier, header: str) -> str:
    with pytest.raises(TokenError) as info:
        v.verify(header)
    return info.value.reason


@pytest.mark.parametrize("kid", ["rsa", "ec", "ed"])
def test_a_valid_token_of_each_algorithm_gives_its_subject(issuer: Issuer, tmp_path: Path, kid: str) -> None:
    v = verifier(issuer, tmp_path)
    verified = v.verify(f"Bearer {issuer.token('alice', kid=kid)}")
    assert verified.principal == "alice"
    assert v.verify(f"bearer {issuer.token('bob', kid=kid)}").principal == "bob"  # the scheme is caseless


def test_each_bad_token_is_refused_with_its_reason(issuer: Issuer, tmp_path: Path) -> None:
    v = verifier(issuer, tmp_path)
    now = int(v.clock())
    other = Issuer()  # the same kids, other keys
    cases = {
        "expired": issuer.token(exp=now - 60),  # well past the 30 s leeway (the test may be slow)
        "not yet valid": issuer.token(nbf=now + 60),
        "wrong issuer": issuer.token(iss="https://evil.test"),
        "wrong audience": issuer.token(aud="not-prism"),
        "bad signature": other.token(kid="ec"),
        "unknown key": issuer.token(named="nope"),
        "unsupported algorithm": issuer.unsigned(alg="none"),
        "not a JWT": "hello",
        "no exp claim": issuer.token(exp=None),
        "no sub claim": issuer.token(sub=None),  # type: ignore[arg-type]
        "algorithm does not match the key": issuer.unsigned(alg="ES256", kid="rsa"),
    }
    for expected, token in cases.items():
        assert reason(v, f"Bearer {token}") == expected, expected
    assert reason(v, f"Bearer {issuer.hmac_signed()}") == "unsupported algorithm"
    assert reason(v, f"Bearer {issuer.unsigned(alg='HS512')}") == "unsupported algorithm"
    assert reason(v, "Bearer a.b.c") == "not a JWT"
    assert reason(v, f"Basic {issuer.token()}") == "not a bearer token"
    assert len(v) == 0  # nothing refused is remembered


def test_a_signed_token_with_a_malformed_payload_or_times_is_refused(issuer: Issuer, tmp_path: Path) -> None:
    v = verifier(issuer, tmp_path)
    not_json = jwt.api_jws.encode(
        b"not json", issuer.keys["rsa"][1], algorithm="RS256", headers={"kid": "rsa"}
    )
    assert reason(v, f"Bearer {not_json}") == "not a JWT"
    assert reason(v, f"Bearer {issuer.token(exp='tomorrow')}") == "exp is not a number"
    assert reason(v, f"Bearer {issuer.token(nbf=True)}") == "nbf is not a number"
    assert reason(v, f"Bearer {issuer.token(sub='')}") == "no sub claim"


def test_leeway_accepts_a_token_just_expired_or_just_not_yet_valid(issuer: Issuer, tmp_path: Path) -> None:
    v = verifier(issuer, tmp_path)
    now = int(v.clock())
    assert v.verify(f"Bearer {issuer.token(exp=now - 20)}").principal == "alice"
    assert v.verify(f"Bearer {issuer.token(nbf=now + 20)}").principal == "alice"


def test_a_token_over_8_kib_is_refused_before_it_is_parsed(issuer: Issuer, tmp_path: Path) -> None:
    v = verifier(issuer, tmp_path)
    big = issuer.token(pad="x" * MAX_TOKEN_BYTES)  # validly signed, but too large
    assert reason(v, f"Bearer {big}") == "too large"
    assert reason(v, "Bearer " + "x" * (MAX_TOKEN_BYTES + 1)) == "too large"  # not even a JWT
    fits = issuer.token(pad="x" * (MAX_TOKEN_BYTES // 2))  # base64 makes it 4/3 as long
    assert len(fits) <= MAX_TOKEN_BYTES and v.verify(f"Bearer {fits}").principal == "alice"


def test_a_verified_token_is_remembered_until_its_exp(issuer: Issuer, tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    v = verifier(issuer, tmp_path, clock=clock)
    header = f"Bearer {issuer.token(iat=None, exp=1_000_100)}"
    assert v.verify(header).expires == 1_000_100
    assert len(v) == 1
    v.keys = {}  # were it verified again, it would now fail: the cache answers
    clock.now = 1_000_099.0
    assert v.verify(header).principal == "alice"
    clock.now = 1_000_100.0  # its exp: no longer from the cache (and now the keys are gone)
    assert reason(v, header) == "unknown key"


def test_the_token_cache_is_bounded_and_sweeps_expired_entries_first(issuer: Issuer, tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    v = verifier(issuer, tmp_path, clock=clock, max_entries=3)
    short = [f"Bearer {issuer.token(f'u{n}', kid='ed', iat=None, exp=1_000_010)}" for n in range(2)]
    long = [f"Bearer {issuer.token(f'v{n}', kid='ed', iat=None, exp=1_000_500)}" for n in range(3)]
    for header in short + long[:1]:
        v.verify(header)
    assert len(v) == 3
    clock.now = 1_000_020.0  # the short ones have expired
    v.verify(long[1])
    v.verify(long[2])
    assert len(v) == 3  # the two expired entries went, not the live one
    keys = v.keys
    v.keys = {}
    assert [v.verify(h).principal for h in long] == ["v0", "v1", "v2"]  # all three from the cache
    v.keys = keys
    v.verify(f"Bearer {issuer.token('w', kid='ed', iat=None, exp=1_000_500)}")  # full, none expired
    v.keys = {}
    assert reason(v, long[0]) == "unknown key"  # the oldest went
    assert v.verify(long[2]).principal == "v2"


def test_a_connection_pays_once_for_a_repeated_token(issuer: Issuer, tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    v = verifier(issuer, tmp_path, clock=clock)
    peer = PeerIdentity("")
    header = f"Bearer {issuer.token(iat=None, exp=1_000_100)}"
    first = peer.token_caller(header, v)
    assert (first.principal, first.address) == ("alice", "")
    v._cache.clear()
    v.keys = {}
    assert peer.token_caller(header, v) is first  # neither verified nor looked up again
    reloaded = TokenVerifier(v.config, {}, clock=clock)  # a reload whose JWKS lost the key
    with pytest.raises(TokenError, match="unknown key"):
        peer.token_caller(header, reloaded)
    clock.now = 1_000_100.0  # the token's exp: the memo ends
    with pytest.raises(TokenError, match="unknown key"):
        peer.token_caller(header, v)


def test_bearer_finds_the_one_authorization_value() -> None:
    assert bearer([("x-a", "1"), ("authorization", "Bearer t")]) == "Bearer t"
    assert bearer([("x-a", "1")]) is None
    with pytest.raises(TokenError, match="more than one authorization header"):
        bearer([("authorization", "Bearer t"), ("authorization", "Bearer u")])


def test_jwks_problems_are_one_line_and_quote_no_key(issuer: Issuer, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"

    def error(document: object) -> str:
        path.write_text(document if isinstance(document, str) else json.dumps(document))
        with pytest.raises(JwksError) as info:
            load_jwks(str(path))
        assert "\n" not in str(info.value)
        return str(info.value)

    key = issuer.jwks("rsa")["keys"][0]
    assert error("{not json") == f"{path}: not JSON"
    assert error({"keys": {}}) == f'{path}: not a JWKS (no "keys" list)'
    assert error({"keys": [{**key, "kid": ""}]}) == f"{path}: keys[0]: no kid (tokens name their key by kid)"
    secret = {"kty": "oct", "k": "c2VjcmV0LXNlY3JldA", "kid": "h", "alg": "HS256"}
    assert "HS256 is not one of RS256, ES256, EdDSA" in error({"keys": [secret]})
    broken = {"kty": "RSA", "kid": "r", "n": "AQAB", "d": "TOP-SECRET-PRIVATE-PART"}
    message = error({"keys": [broken]})
    assert message == f"{path}: keys[0] (kid 'r'): not a key PyJWT can use"
    assert "TOP-SECRET" not in message
    assert "appears twice" in error({"keys": [key, key]})
    with pytest.raises(JwksError, match="cannot read"):
        load_jwks(str(tmp_path / "missing.json"))
    # An encryption key signs nothing: skipped, not an error.
    enc = {**issuer.jwks("ec")["keys"][0], "use": "enc", "kid": "e"}
    path.write_text(json.dumps({"keys": [key, enc]}))
    assert set(load_jwks(str(path))) == {"rsa"}


def test_preflight_refuses_a_jwks_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text("{}")
    auth = AuthConfig(JwtConfig(str(tmp_path / "jwks.json"), ISSUER, AUDIENCE))
    with pytest.raises(ConfigError) as info:
        check_deployable(ServerConfig(auth=auth))
    assert str(info.value) == f'auth.jwt.jwks_file: {tmp_path}/jwks.json: not a JWKS (no "keys" list)'


def test_a_reload_reads_the_jwks_again_and_keeps_the_old_keys_if_it_does_not_load(
    issuer: Issuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwks.json"
    auth = AuthConfig(JwtConfig(issuer.write_jwks(path, "rsa"), ISSUER, AUDIENCE))
    security = Security()
    security.apply(SecuritySection(1, auth=auth))
    assert security.verifier is not None and set(security.verifier.keys) == {"rsa"}
    issuer.write_jwks(path, "rsa", "ec")  # a key added, then a reload
    security.apply(SecuritySection(2, auth=auth))
    assert set(security.verifier.keys) == {"rsa", "ec"}
    caplog.set_level(logging.ERROR, logger="prism.security")
    path.write_text('{"keys": [')  # half-written
    security.apply(SecuritySection(3, auth=auth))
    assert set(security.verifier.keys) == {"rsa", "ec"}
    assert security.verifier.verify(f"Bearer {issuer.token(kid='ec')}").principal == "alice"
    assert [r.getMessage() for r in caplog.records] == [
        f"jwt: keeping the previous keys (2): {path}: not JSON"
    ]
    security.apply(SecuritySection(4))  # [auth] removed
    assert security.verifier is None and not security.secured


def test_a_client_certificate_is_the_principal_when_the_call_carries_no_token(
    issuer: Issuer, tmp_path: Path
) -> None:
    rules = (AccessRule(("spiffe://corp/svc/payments",), ("ledger",), ("read",)),)
    auth = AuthConfig(JwtConfig(issuer.write_jwks(tmp_path / "jwks.json"), ISSUER, AUDIENCE))
    security = Security()
    security.apply(SecuritySection(1, auth=auth, access=rules))
    read = Method(UNARY, bytes, None, "KeyValue/GetItems", action="read")
    peer = PeerIdentity("10.0.0.7:51000")
    call = Call(1)
    caller = security.check_call(call, read, "ledger", peer, "spiffe://corp/svc/payments")
    assert caller == ("spiffe://corp/svc/payments", "10.0.0.7:51000")
    assert security.check_call(call, read, "ledger", peer, "spiffe://corp/svc/payments") is caller
    # A token, when there is one, names the principal instead: here one no rule allows.
    call.metadata = [("authorization", f"Bearer {issuer.token('alice')}")]
    with pytest.raises(PermissionDenied, match="'alice' may not read this namespace"):
        security.check_call(call, read, "ledger", peer, "spiffe://corp/svc/payments")
    # Without [auth], a token is not Prism's to judge: the certificate decides.
    security.apply(SecuritySection(2, access=rules))
    assert security.check_call(call, read, "ledger", peer, "spiffe://corp/svc/payments").principal == (
        "spiffe://corp/svc/payments"
    )
