"""Passwords out of text: the one helper for every place a connection string can surface.

Backend settings carry secrets: a PostgreSQL DSN's password (in a URI's
userinfo, ``?password=``, or a ``password=`` keyword), a Redis URL's
password, a NATS URL's password or token. They reach text in log lines,
``/v1/namespaces``, config errors and backend connection errors, sometimes
in a form nobody chose (libpq quotes the part of a DSN it cannot parse).
``redact`` masks them wherever they appear in a text, so each place that
turns settings or foreign errors into text calls it, and the log formatter
calls it on every line as a last line of defence.

It is pattern-based and errs on the side of masking: everything between
``scheme://`` and the last ``@`` before the next blank is userinfo, of which
only the user name before its first ``:`` is kept (a NATS URL's lone
userinfo is a token, masked whole). It imports nothing from Prism, so that
the drivers, the config and the logger can all use it.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "has_secret", "redact"]

MASK = "***"

# NATS URLs (nats://, tls://, and tcp:// as nats-py also takes) may carry a
# bare token as their whole userinfo; elsewhere a bare userinfo is a user name.
_TOKEN_SCHEMES = frozenset({"nats", "tls", "tcp"})
# A URL, up to the next blank or a character a URL cannot hold unencoded
# (a quote ' can be in a password, so a URL quoted with ' ends later: the
# masking then takes more, never less).
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>[^\s\"<>]*)")
# libpq's password parameters in a URI's query string.
_QUERY = re.compile(r"(?P<key>[?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)
# libpq's password keywords in a key=value DSN: a quoted value (backslash
# escapes, perhaps unterminated), else up to a blank that is not escaped.
_KEYWORD = re.compile(
    r"(?P<key>(?<![\w?&])(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|(?:[^\s\\]|\\.)*)",
    re.IGNORECASE,
)


def _masked_key(match: re.Match[str]) -> str:
    return match.group("key") + MASK


def _url(match: re.Match[str]) -> str:
    scheme, rest = match.group("scheme"), match.group("rest")
    at = rest.rfind("@")
    if at >= 0:
        userinfo, host = rest[:at], rest[at:]
        user, colon, _ = userinfo.partition(":")
        if colon:
            userinfo = f"{user}:{MASK}"
        elif scheme.lower() in _TOKEN_SCHEMES and userinfo:
            userinfo = MASK
        rest = userinfo + host
    return f"{scheme}://{_QUERY.sub(_masked_key, rest)}"


def redact(text: str) -> str:
    """``text`` with every URL password (or NATS token) and every
    ``password=``/``sslpassword=`` value replaced by ``***``."""
    return _KEYWORD.sub(_masked_key, _URL.sub(_url, text))


def has_secret(text: str) -> bool:
    """Whether ``redact`` would mask anything in ``text``."""
    return redact(text) != text
