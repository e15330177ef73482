"""An identity provider for tests: signing keys made by ``cryptography``, a
JWKS file of their public halves, and tokens (good and bad) made by PyJWT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://idp.test"
AUDIENCE = "prism"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """Three signing keys, one per accepted algorithm, with kids ``rsa``, ``ec`` and ``ed``."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, Any]] = {
            "rsa": ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "ec": ("ES256", ec.generate_private_key(ec.SECP256R1())),
            "ed": ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
        }

    def jwks(self, *kids: str) -> dict[str, Any]:
        """The JWKS of ``kids`` (all keys by default): public halves only."""
        out = []
        for kid in kids or tuple(self.keys):
            algorithm, private = self.keys[kid]
            jwk = json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(private.public_key()))
            jwk.update(kid=kid, alg=algorithm, use="sig")
            out.append(jwk)
        return {"keys": out}

    def write_jwks(self, path: Path, *kids: str) -> str:
        path.write_text(json.dumps(self.jwks(*kids)))
        return str(path)

    def claims(self, sub: str = "alice", **more: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
        claims.update(more)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, sub: str = "alice", *, kid: str = "rsa", named: str | None = None, **claims: Any) -> str:
        """A token for ``sub`` signed with ``kid``'s key, naming it ``named`` (default: ``kid``).
        A claim given as None is left out."""
        algorithm, private = self.keys[kid]
        headers = {"kid": named or kid}
        return jwt.encode(self.claims(sub, **claims), private, algorithm=algorithm, headers=headers)

    def unsigned(self, sub: str = "alice", *, alg: str = "none", kid: str = "rsa") -> str:
        """A token with ``alg`` in its header and no real signature (``alg: none``)."""
        header = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
        payload = _b64(json.dumps(self.claims(sub)).encode())
        return f"{header}.{payload}."

    def hmac_signed(self, sub: str = "alice", *, kid: str = "rsa") -> str:
        """HS256 keyed with the public key's JWK text: the classic algorithm
        confusion, which a verifier that lets the token pick its algorithm accepts."""
        secret = json.dumps(self.jwks(kid)["keys"][0]).encode()
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        payload = _b64(json.dumps(self.claims(sub)).encode())
        signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(signature)}"


def bearer(token: str) -> list[tuple[str, str]]:
    """grpcio metadata carrying ``token``."""
    return [("authorization", f"Bearer {token}")]
