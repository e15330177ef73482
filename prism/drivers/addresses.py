"""Server addresses parsed from URLs, for the drivers and for config checks.

Plain parsing (``urllib`` only, no trio, no sockets), so that config loading
in the supervisor process checks a namespace's URL with exactly the parser
its worker will connect with, without importing a driver. Error texts never
repeat the URL: it may hold a password, and they end up in logs.
"""

from __future__ import annotations

from urllib.parse import SplitResult, unquote, urlsplit


def _port(parts: SplitResult, default: int) -> int:
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = 0
    if port == 0:
        raise ValueError("the port is not a number in 1-65535")
    return port or default


class RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, or ``rediss://`` for
    TLS (``tls``); ValueError if not such a URL."""

    __slots__ = ("db", "host", "password", "port", "tls", "username")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"expected a redis:// or rediss:// URL, got scheme {parts.scheme!r}")
        self.tls = parts.scheme == "rediss"
        self.host = parts.hostname or "127.0.0.1"
        self.port = _port(parts, 6379)
        path = parts.path.lstrip("/")
        if path and not (path.isascii() and path.isdigit()):
            raise ValueError(f"the database {path!r} is not a number")
        self.db = int(path) if path else 0
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None


class NatsAddress:
    """``nats://[token@|user:password@]host[:port]`` (or ``tcp://``), or
    ``tls://`` to require TLS (``tls``); ValueError otherwise."""

    __slots__ = ("host", "password", "port", "tls", "token", "user")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tcp", "tls"):
            raise ValueError(f"expected a nats:// or tls:// URL, got scheme {parts.scheme!r}")
        self.tls = parts.scheme == "tls"
        self.host = parts.hostname or "127.0.0.1"
        self.port = _port(parts, 4222)
        self.token: str | None = None
        self.user: str | None = None
        self.password: str | None = None
        if parts.username and parts.password is None:
            self.token = unquote(parts.username)
        elif parts.username:
            self.user, self.password = unquote(parts.username), unquote(parts.password or "")
