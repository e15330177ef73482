"""prism.rpc.headers against h2's own inbound validation (h2/utilities.py).

h2's checks are switched off in the server for speed; ours must give the
same verdict on any header list, except where RFC 9113 asks for something
else (each such case is tested on its own below).
"""

from __future__ import annotations

import h2.exceptions
import pytest
from h2.utilities import HeaderValidationFlags, validate_headers
from hypothesis import assume, example, given, settings

from prism.rpc.headers import malformed_request

from .test_plain_frames import header_list

REQUEST = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
BASE = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/s/M"),
    (b":authority", b"example.com"),
    (b"content-type", b"application/grpc"),
]


def h2_verdict(headers: list[tuple[bytes, bytes]]) -> str | None:
    try:
        list(validate_headers(headers, REQUEST))
    except h2.exceptions.ProtocolError as exc:
        return str(exc)
    return None


def rfc_differs_from_h2(headers: list[tuple[bytes, bytes]]) -> bool:
    names = [n for n, _ in headers]
    authority = dict(headers).get(b":authority")
    return (
        b":protocol" in names  # h2 allows it on CONNECT; it needs a setting we never send
        or authority is None  # h2 requires :authority or host
        or b"@" in authority  # userinfo: h2 does not look
        or b"host" in names  # h2 compares bytes, not the entities they name
    )


@settings(max_examples=500, deadline=None)
@given(headers=header_list())
@example(headers=[*BASE, (b":path", b"/s/N")])
@example(headers=[(b"x", b"v"), *BASE])
def test_the_same_verdict_as_h2(headers: list[tuple[bytes, bytes]]) -> None:
    assume(not rfc_differs_from_h2(headers))
    ours, theirs = malformed_request(headers), h2_verdict(headers)
    assert (ours is None) == (theirs is None), (ours, theirs)


def test_a_well_formed_request() -> None:
    assert malformed_request(BASE) is None


@pytest.mark.parametrize(
    "host",
    [b"example.com", b"EXAMPLE.com", b"example.com:80", b"example.com:"],
)
def test_host_naming_the_same_entity_as_authority(host: bytes) -> None:
    assert malformed_request([*BASE, (b"host", host)]) is None


@pytest.mark.parametrize("host", [b"example.org", b"example.com:8080", b"example.com:443"])
def test_host_naming_another_entity(host: bytes) -> None:
    assert malformed_request([*BASE, (b"host", host)]) == (
        f"host {host!r} disagrees with :authority {b'example.com'!r}"
    )


def test_https_default_port() -> None:
    https = [(n, b"https" if n == b":scheme" else v) for n, v in BASE]
    assert malformed_request([*https, (b"host", b"example.com:443")]) is None
    assert malformed_request([*https, (b"host", b"example.com:80")]) is not None


def test_no_authority_at_all_is_well_formed() -> None:
    # RFC 9113 8.3.1 lets a client leave authority out; h2 refuses it.
    assert malformed_request([(n, v) for n, v in BASE if n != b":authority"]) is None


def test_userinfo_in_authority() -> None:
    assert malformed_request([(n, b"u@example.com" if n == b":authority" else v) for n, v in BASE]) == (
        ":authority with userinfo"
    )


def test_protocol_pseudo_header_is_not_ours() -> None:
    connect = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *BASE[1:]]
    assert malformed_request(connect) == "pseudo-header b':protocol' is not a request's"


def test_ordinary_connect() -> None:
    assert malformed_request([(b":method", b"CONNECT"), (b":authority", b"example.com:443")]) is None
    assert malformed_request([(b":method", b"CONNECT"), (b"host", b"example.com:443")]) == (
        "CONNECT without :authority"
    )
