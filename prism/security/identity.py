"""Who is calling: bearer tokens (JWT) verified against the keys of a JWKS file.

A call's token is the ``authorization: Bearer <JWT>`` metadata. Only
asymmetric signatures are accepted, with the algorithm fixed by the key, not
by the token: RS256, ES256 and EdDSA. A token whose header names another
algorithm (``none``, an HMAC one) is refused before any key is looked at;
RFC 8725 section 2.1 explains why a verifier must not let the token choose.
``exp`` and ``nbf`` are checked here against ``clock`` (so that one clock
decides both validity and the cache), ``iss``, ``aud`` and the signature by
PyJWT.

Verifying a signature costs far more than the rest of a call, so a verified
token is remembered twice: per connection (``PeerIdentity``: the last token
seen on it, compared as a string, for clients that send the same token on
every call of a connection) and per process (``TokenVerifier``: keyed by a
hash of the token, so no token is kept in memory, bounded in size), both
until the token's ``exp``. A token that fails is not remembered: failures
are cheap to find again (the size, shape and header checks come first) or
cost one signature check, like any call with a new token.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from prism.config.security import JwtConfig
from prism.rpc.call import Caller

if TYPE_CHECKING:
    # PyJWT pulls in cryptography: about 10 MB in every process. Imported
    # where a token or a JWKS is first read, so that a server without
    # ``auth`` never loads it.
    import jwt

MAX_TOKEN_BYTES: Final = 8 * 1024
MAX_JWKS_BYTES: Final = 1024 * 1024
# Verified tokens remembered per process; the oldest goes first when full.
TOKEN_CACHE_ENTRIES: Final = 10_000
# Expired entries are swept at most this often (a sweep walks the cache).
_SWEEP_INTERVAL_S: Final = 1.0
ALGORITHMS: Final = ("RS256", "ES256", "EdDSA")
_BEARER: Final = "bearer "
_SLACK: Final = 64  # room for the scheme and spaces around the token


class TokenError(Exception):
    """A token that is not accepted; ``reason`` says why in general terms
    (never the token, never what PyJWT said of it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JwksError(Exception):
    """A JWKS file that does not load; the message is one line and names no key material."""


class Key(NamedTuple):
    algorithm: str
    jwk: jwt.PyJWK


class Verified(NamedTuple):
    principal: str  # the token's ``sub``
    expires: float  # its ``exp``, seconds since the epoch


def load_jwks(path: str) -> dict[str, Key]:
    """The signing keys of a JWKS file, by ``kid``. Keys marked ``"use": "enc"``
    are skipped (they sign nothing); any other key must have a ``kid`` and
    one of ``ALGORITHMS``, or the file does not load."""
    import jwt  # see the import under TYPE_CHECKING

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise JwksError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_JWKS_BYTES:
        raise JwksError(f"{path}: larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        raise JwksError(f"{path}: not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksError(f'{path}: not a JWKS (no "keys" list)')
    keys: dict[str, Key] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("use") == "enc":
            continue
        kid = entry.get("kid")
        where = f"{path}: keys[{n}]"
        if not isinstance(kid, str) or not kid:
            raise JwksError(f"{where}: no kid (tokens name their key by kid)")
        try:
            # PyJWK's own messages may quote the key (private parts too, if
            # someone put them there): none of its text reaches the log.
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise JwksError(f"{where} (kid {kid!r}): not a key PyJWT can use") from None
        if jwk.algorithm_name not in ALGORITHMS:
            raise JwksError(
                f"{where} (kid {kid!r}): algorithm {jwk.algorithm_name} is not one of {', '.join(ALGORITHMS)}"
            )
        if kid in keys:
            raise JwksError(f"{where}: kid {kid!r} appears twice")
        keys[kid] = Key(jwk.algorithm_name, jwk)
    return keys


def bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The ``authorization`` metadata value (``Bearer <JWT>``, whole), or None
    without one. Sent twice, it is refused: which one would count is a guess."""
    found: str | bytes | None = None
    for key, value in metadata:
        if key == "authorization":
            if found is not None:
                raise TokenError("more than one authorization header")
            found = value
    if found is None:
        return None
    if not isinstance(found, str):  # pragma: no cover - only -bin keys carry bytes
        raise TokenError("not a bearer token")
    return found


class TokenVerifier:
    """Verifies tokens for one ``[auth] jwt`` section and one set of keys, and
    remembers those that passed (see the module docstring)."""

    def __init__(
        self,
        config: JwtConfig,
        keys: dict[str, Key],
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = TOKEN_CACHE_ENTRIES,
    ) -> None:
        self.config = config
        self.keys = keys
        self.clock = clock
        self._max_entries = max_entries
        self._cache: dict[bytes, Verified] = {}
        self._next_sweep = -math.inf
        self._options: Any = {
            "require": ["exp", "iss", "aud", "sub"],
            # exp and nbf: checked in _times, against self.clock.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }

    def verify(self, header: str) -> Verified:
        """The principal of an ``authorization`` value, or TokenError."""
        # The length first: a token over the limit is refused without a copy.
        if len(header) > MAX_TOKEN_BYTES + _SLACK:
            raise TokenError("too large")
        if header[:7].lower() != _BEARER:
            raise TokenError("not a bearer token")
        token = header[7:].strip()
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("too large")
        now = self.clock()
        digest = hashlib.blake2b(token.encode(), digest_size=16).digest()
        verified = self._cache.get(digest)
        if verified is not None and now < verified.expires:
            return verified
        verified = self._verify(token, now)
        if now < verified.expires:
            self._remember(digest, verified, now)
        return verified

    def _verify(self, token: str, now: float) -> Verified:
        import jwt  # loaded by load_jwks already: a dict lookup

        if token.count(".") != 2:
            raise TokenError("not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("not a JWT") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise TokenError("unsupported algorithm")
        kid = header.get("kid")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenError("unknown key")
        if key.algorithm != algorithm:
            raise TokenError("algorithm does not match the key")
        config = self.config
        try:
            claims = jwt.decode(
                token,
                key.jwk,
                algorithms=[key.algorithm],
                audience=config.audience,
                issuer=config.issuer,
                options=self._options,
            )
        except jwt.InvalidSignatureError:
            raise TokenError("bad signature") from None
        except (jwt.InvalidIssuerError, jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
            raise TokenError(_claim_reason(exc)) from None
        except jwt.PyJWTError:
            raise TokenError("not a JWT") from None
        return Verified(_subject(claims), _times(claims, now, config.leeway_s))

    def _remember(self, digest: bytes, verified: Verified, now: float) -> None:
        cache = self._cache
        if len(cache) >= self._max_entries:
            if now >= self._next_sweep:
                self._next_sweep = now + _SWEEP_INTERVAL_S
                for stale in [d for d, v in cache.items() if v.expires <= now]:
                    del cache[stale]
            if len(cache) >= self._max_entries:
                del cache[next(iter(cache))]  # the oldest verified
        cache[digest] = verified

    def __len__(self) -> int:
        return len(self._cache)


def _claim_reason(exc: jwt.PyJWTError) -> str:
    import jwt

    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"no {exc.claim} claim"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    return "wrong audience"


def _subject(claims: dict[str, Any]) -> str:
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise TokenError("no sub claim")
    return sub


def _times(claims: dict[str, Any], now: float, leeway_s: float) -> float:
    exp = _number(claims["exp"], "exp")
    if exp <= now - leeway_s:
        raise TokenError("expired")
    if "nbf" in claims and _number(claims["nbf"], "nbf") > now + leeway_s:
        raise TokenError("not yet valid")
    return exp


def _number(value: object, claim: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenError(f"{claim} is not a number")
    return float(value)


class PeerIdentity:
    """One client connection as the access check knows it: its address, and
    the last token verified on it with the caller it made, until that token's
    ``exp`` or until the verifier is replaced (a reload)."""

    __slots__ = ("_caller", "_certificate", "_expires", "_header", "_verifier", "address")

    def __init__(self, address: str) -> None:
        self.address = address  # the client's "host:port" ("" if unknown)
        self._header: str | None = None
        self._verifier: TokenVerifier | None = None
        self._caller: Caller | None = None
        self._expires = 0.0
        self._certificate: Caller | None = None

    def token_caller(self, header: str, verifier: TokenVerifier) -> Caller:
        """The caller an ``authorization`` value stands for on this connection; TokenError if none."""
        if header == self._header and verifier is self._verifier and verifier.clock() < self._expires:
            assert self._caller is not None
            return self._caller
        verified = verifier.verify(header)
        caller = Caller(verified.principal, self.address)
        self._header, self._verifier, self._caller, self._expires = header, verifier, caller, verified.expires
        return caller

    def certificate_caller(self, principal: str) -> Caller:
        """The caller a client certificate's principal stands for on this connection."""
        caller = self._certificate
        if caller is None or caller.principal != principal:
            caller = self._certificate = Caller(principal, self.address)
        return caller
