"""What every part of the config uses to refuse a value: the error that names
its field, and the address syntaxes that more than one field shares."""

from __future__ import annotations

from urllib.parse import urlsplit

from prism.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class FieldError(ConfigError):
    """A ConfigError that remembers its field, so the loader can name its source."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


def parse_host_port(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT``; raises ValueError saying what is wrong.

    Brackets are required around IPv6 hosts because ``::1:8980`` has no single
    reading. The returned host has its brackets removed, ready for ``bind``.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"empty IPv6 address in {address!r}")
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"IPv6 hosts need brackets, e.g. [::1]:8980, got {address!r}")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range (1-65535)")
    return host, port


def check_redis_url(url: str) -> None:
    """``redis://[[user]:password@]host[:port][/db]`` (``rediss://``: over TLS),
    or ValueError saying what is wrong (never echoing the URL, which may hold a password)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"expected a redis:// or rediss:// URL, got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a number in 1-65535") from None
    if port == 0:
        raise ValueError("the port is not a number in 1-65535")
    db = parts.path.lstrip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"the database {db!r} is not a number")
    if parts.query or parts.fragment:
        raise ValueError("query strings and fragments are not supported")
