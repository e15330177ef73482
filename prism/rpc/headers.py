"""Is a request's header list well-formed HTTP/2? RFC 9113 sections 8.2 and 8.3.

h2's inbound header validation is off (it was a quarter of a call's CPU),
so the rules it would apply are applied here instead, to each distinct header
block once: ``CachingDecoder`` (``prism.rpc.hpack_cache``) asks when it
decodes a block and keeps the verdict with the decoding, so a block seen
before costs nothing more. The verdict reaches both request paths: a block
that is malformed is never read by the plain path (``prism.rpc.h2conn``),
and the h2-event path hands its verdict to ``GrpcProtocol._start_call``,
which answers RST_STREAM(PROTOCOL_ERROR) for that stream alone (RFC 9113
8.1.1: a malformed request is a stream error). The connection goes on.
A request's trailers (``malformed_trailers``) are judged by h2conn when h2
reads them, and malformed ones reset the stream the same way.

A header list over ``SETTINGS_MAX_HEADER_LIST_SIZE`` is not judged here:
the HPACK decoder stops at the limit, which leaves the compression state
unusable, so that one is a connection error (see ``h2conn``).

What is checked beyond h2's own rules, and what is not:

- a Host that disagrees with ``:authority`` is compared after RFC 3986's
  normalisation (case, default port) as RFC 9113 8.3.1 asks, where h2
  compares bytes;
- ``:protocol`` is unknown here: it needs SETTINGS_ENABLE_CONNECT_PROTOCOL
  (RFC 8441), which this server never sends;
- a request with neither ``:authority`` nor Host is well-formed (RFC 9113
  8.3.1 lets a client leave authority out; h2 refuses it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

# RFC 9113 8.2.1: a field name is visible ASCII, no uppercase, no colon
# (a pseudo-header's leading one aside); these are the bytes it may hold.
_NAME_BYTES: Final = bytes(c for c in range(0x21, 0x7F) if not 0x41 <= c <= 0x5A and c != 0x3A)
# RFC 9113 8.2.1: no NUL, CR or LF anywhere in a value; no SP or HTAB at
# either end.
_BAD_VALUE: Final = re.compile(rb"[\0\r\n]|\A[ \t]|[ \t]\Z")
# RFC 9113 8.2.2.
_CONNECTION_SPECIFIC: Final = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)
# RFC 9113 8.3.1: the request pseudo-headers (":status" is a response's).
_REQUEST_PSEUDO: Final = frozenset((b":method", b":scheme", b":authority", b":path"))
_DEFAULT_PORTS: Final = {b"http": b":80", b"https": b":443"}


def malformed_request(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request's header list is malformed under RFC 9113 8.2-8.3, or
    None if it is well-formed. Whether gRPC can serve it (method, path,
    content-type) is ``GrpcProtocol``'s question, answered with a status."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    host: bytes | None = None
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return f"pseudo-header {name!r} after a regular field"
            if name not in _REQUEST_PSEUDO:
                return f"pseudo-header {name!r} is not a request's"
            if name in pseudo:
                return f"pseudo-header {name!r} repeated"
            pseudo[name] = value
        else:
            regular = True
            why = _malformed_field(name, value)
            if why is not None:
                return why
            if name == b"host":
                if host is not None:
                    return "host repeated"
                host = value
        if value and _BAD_VALUE.search(value):
            return _BAD_VALUE_REASON % name
    return _malformed_pseudo(pseudo, host)


def malformed_trailers(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request's trailers are malformed, or None: RFC 9113 8.1 allows
    no pseudo-header in trailers, and their fields follow the same rules as
    a request's (8.2). Unlike request blocks these are judged each time they
    come, not once per distinct block: gRPC clients send no trailers, so no
    ordinary call pays for it."""
    for name, value in headers:
        if name[:1] == b":":
            return f"pseudo-header {name!r} in trailers"
        why = _malformed_field(name, value)
        if why is not None:
            return why
        if value and _BAD_VALUE.search(value):
            return _BAD_VALUE_REASON % name
    return None


_BAD_VALUE_REASON: Final = "value of %r holds NUL, CR or LF, or starts or ends with whitespace"


def _malformed_field(name: bytes, value: bytes) -> str | None:
    """RFC 9113 8.2.1-8.2.2 for one regular field (its value aside)."""
    if not name or name.translate(None, _NAME_BYTES):
        return f"field name {name!r} is not lowercase visible ASCII"
    if name in _CONNECTION_SPECIFIC:
        return f"connection-specific field {name!r}"
    if name == b"te" and value.lower() != b"trailers":
        return f"te {value!r} is not trailers"
    return None


def _malformed_pseudo(pseudo: dict[bytes, bytes], host: bytes | None) -> str | None:
    method = pseudo.get(b":method")
    scheme = pseudo.get(b":scheme")
    authority = pseudo.get(b":authority")
    if method is None:
        return "no :method"
    if method == b"CONNECT":  # RFC 9113 8.5: authority only
        if scheme is not None or b":path" in pseudo:
            return "CONNECT with :scheme or :path"
        if authority is None:
            return "CONNECT without :authority"
    elif scheme is None:
        return "no :scheme"
    elif not pseudo.get(b":path"):
        return "no :path, or an empty one"
    if authority is None:
        return None
    if scheme in _DEFAULT_PORTS and b"@" in authority:
        return ":authority with userinfo"
    if host is not None and _normal_authority(host, scheme) != _normal_authority(authority, scheme):
        return f"host {host!r} disagrees with :authority {authority!r}"
    return None


def _normal_authority(value: bytes, scheme: bytes | None) -> bytes:
    """RFC 3986 6.2.2-6.2.3: the host's case and the scheme's default port
    (or an empty one) do not change the entity an authority names."""
    value = value.lower()
    port = _DEFAULT_PORTS.get(scheme or b"")
    if port is not None and value.endswith(port):
        return value[: -len(port)]
    return value[:-1] if value.endswith(b":") else value


_TIMEOUT_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def parse_timeout(value: bytes) -> float:
    """Seconds in a ``grpc-timeout`` value: 1-8 ASCII digits and a unit."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        raise ValueError(value)
    unit = _TIMEOUT_UNITS.get(value[-1])
    if unit is None:
        raise ValueError(value)
    return int(value[:-1]) * unit
