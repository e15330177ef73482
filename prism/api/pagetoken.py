"""Opaque, tamper-proof page tokens.

A token carries the cursor (the last key or id returned) and a fingerprint of
the request it continues, sealed with an HMAC under the server's key. A token
we did not issue, one altered in transit, or one presented with a different
request (namespace, id, predicate, direction) is INVALID_ARGUMENT, never a
wrong page. The key lives in the data directory so tokens stay valid across
restarts and across the workers of one deployment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

import msgspec

from prism.errors import InvalidArgument

_MAC_BYTES = 16
_KEY_FILE = "page-token.key"


def load_or_create_key(data_dir: Path) -> bytes:
    """The deployment's token key, created (mode 0600, in a data directory
    created 0700 if missing) on first use.

    Workers starting together may all find no key: the first to link its
    complete file in place wins, and the others read its key, so that every
    worker opens the tokens any of them seals. (A key file too short to be
    one is replaced.)"""
    path = data_dir / _KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) >= 32:
            return key
        missing = False
    except FileNotFoundError:
        missing = True
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    if not missing:
        os.replace(tmp, path)
        return key
    try:
        os.link(tmp, path)  # fails if another worker's key got there first
    except FileExistsError:
        key = path.read_bytes()
    finally:
        os.unlink(tmp)
    return key


class PageTokens:
    """Seals and opens page tokens with one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._encoder = msgspec.msgpack.Encoder()
        # msgpack keeps bin and str apart, so the cursor's type survives.
        self._decoder = msgspec.msgpack.Decoder(tuple[bytes, Any])

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def seal(self, fingerprint: bytes, cursor: bytes | str) -> str:
        body = self._encoder.encode((fingerprint, cursor))
        return base64.urlsafe_b64encode(body + self._mac(body)).decode("ascii")

    def open(self, token: str, fingerprint: bytes) -> bytes | str:
        """The cursor in ``token``, if we issued it for this request."""
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise InvalidArgument("invalid page_token") from None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(body)):
            raise InvalidArgument("invalid page_token") from None
        issued_for, cursor = self._decoder.decode(body)
        if issued_for != fingerprint or not isinstance(cursor, bytes | str):
            raise InvalidArgument("page_token was issued for another request")
        return cursor
