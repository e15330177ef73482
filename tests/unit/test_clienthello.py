"""The ClientHello parser that picks a TLS connection's tenant before the handshake.

Real ClientHellos (Python's ssl, grpcio) give their server name; built ones
cover what real clients rarely send (a hello split over records, extensions
in any order, no SNI); random and mutated bytes never raise, and a prefix of a
ClientHello never asks for more bytes than the whole one has (the server
waits in the kernel for that many).
"""

from __future__ import annotations

import socket
import ssl
import threading

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prism.security.clienthello import Hello, read_client_hello

NAME = "payments.prism.test"


def python_hello(server_name: str | None, *, alpn: list[str] | None = None) -> bytes:
    """The first flight of a Python ssl client (a real OpenSSL ClientHello)."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(alpn)
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:  # it has sent its hello and waits for the server's
        return outgoing.read()
    raise AssertionError("a handshake with no server cannot complete")


def grpcio_hello(**options: str) -> bytes:
    """What a grpcio secure channel sends first, read from a plain TCP socket."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        received = bytearray()

        def read() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                while len(received) < 5 or read_client_hello(bytes(received)).missing:
                    data = conn.recv(65536)
                    if not data:
                        return
                    received.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", grpc.ssl_channel_credentials(), options=list(options.items())
        )
        try:
            # A channel connects on its first call (the server here never answers it).
            channel.unary_unary("/prism.Test/Hello").future(b"", timeout=10)
            reader.join(10)
        finally:
            channel.close()
        assert not reader.is_alive()
    return bytes(received)


# -- ClientHellos built field by field -----------------------------------------


def vector(length_bytes: int, body: bytes) -> bytes:
    return len(body).to_bytes(length_bytes, "big") + body


def extension(kind: int, body: bytes) -> bytes:
    return kind.to_bytes(2, "big") + vector(2, body)


def sni(*names: tuple[int, bytes]) -> bytes:
    return extension(0, vector(2, b"".join(bytes([kind]) + vector(2, name) for kind, name in names)))


def hello_body(
    extensions: list[bytes] | None, *, session_id: bytes = b"", suites: bytes = b"\x13\x01"
) -> bytes:
    body = b"\x03\x03" + bytes(32) + vector(1, session_id) + vector(2, suites) + vector(1, b"\x00")
    if extensions is not None:
        body += vector(2, b"".join(extensions))
    return body


def records(body: bytes, sizes: list[int] | None = None, *, message_type: int = 1) -> bytes:
    """``body`` as a handshake message in TLS records of ``sizes`` bytes each (the last takes the rest)."""
    message = bytes([message_type]) + vector(3, body)
    out, at = bytearray(), 0
    for size in [*(sizes or []), len(message)]:
        fragment = message[at : at + size]
        if not fragment:
            break
        out += b"\x16\x03\x01" + vector(2, fragment)
        at += len(fragment)
    return bytes(out)


host_names = st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,4}", fullmatch=True)
other_extensions = st.lists(
    st.builds(extension, st.integers(1, 0xFFFF), st.binary(max_size=64)),
    max_size=6,
)


@st.composite
def built_hellos(draw: st.DrawFn) -> tuple[bytes, str]:
    name = draw(host_names)
    extensions = draw(other_extensions)
    extensions.insert(draw(st.integers(0, len(extensions))), sni((0, name.encode())))
    body = hello_body(
        extensions,
        session_id=draw(st.binary(max_size=32)),
        suites=draw(st.binary(min_size=1, max_size=40).map(lambda b: b * 2)),
    )
    sizes = draw(st.lists(st.integers(1, 300), max_size=4))
    return records(body, sizes), name


# -- the tests -----------------------------------------------------------------


def test_real_client_hellos_give_their_server_name() -> None:
    assert read_client_hello(python_hello(NAME, alpn=["h2"])) == Hello(NAME, 0)
    assert read_client_hello(python_hello("a.b")) == Hello("a.b", 0)
    assert read_client_hello(python_hello(None)) == Hello(None, 0)  # no SNI sent
    for option in ("grpc.ssl_target_name_override", "grpc.default_authority"):
        assert read_client_hello(grpcio_hello(**{option: NAME})) == Hello(NAME, 0), option


def test_a_prefix_asks_for_no_more_than_the_whole_hello_has() -> None:
    whole = python_hello(NAME)
    for n in range(len(whole)):
        hello = read_client_hello(whole[:n])
        assert hello.server_name is None and 0 < hello.missing <= len(whole) - n, n


@given(built_hellos())
def test_built_hellos_in_any_record_split(case: tuple[bytes, str]) -> None:
    whole, name = case
    assert read_client_hello(whole) == Hello(name, 0)
    assert read_client_hello(whole + b"\x17\x03\x03\x00\x01x") == Hello(name, 0)  # whatever follows
    for n in sorted({0, 1, 4, 5, 6, len(whole) // 2, len(whole) - 1}):
        hello = read_client_hello(whole[:n])
        assert hello.server_name is None and 0 < hello.missing <= len(whole) - n, n


@given(st.binary(max_size=2048))
def test_random_bytes_never_raise(data: bytes) -> None:
    hello = read_client_hello(data)
    assert hello.server_name is None or isinstance(hello.server_name, str)
    assert hello.missing >= 0


REAL = python_hello(NAME, alpn=["h2"])


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete", "cut"]),
            st.integers(0, len(REAL)),
            st.binary(min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_real_hellos_never_raise(mutations: list[tuple[str, int, bytes]]) -> None:
    data = bytearray(REAL)
    for how, at, noise in mutations:
        at = min(at, len(data))
        if how == "flip" and at < len(data):
            data[at] ^= noise[0] or 1
        elif how == "insert":
            data[at:at] = noise
        elif how == "delete":
            del data[at : at + len(noise)]
        else:
            del data[at:]
    hello = read_client_hello(bytes(data))
    assert hello.missing >= 0
    if hello.server_name is not None:
        assert hello.server_name.isascii() and hello.server_name  # never garbage as a name


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="an HTTP/2 preface"),
        pytest.param(b"GET / HTTP/1.1\r\n", id="HTTP/1.1"),
        pytest.param(b"\x17\x03\x03\x00\x05hello", id="application data record"),
        pytest.param(b"\x16\x02\x00\x00\x05hello", id="not TLS 1.x"),
        pytest.param(b"\x16\x03\x01\x00\x00", id="empty record"),
        pytest.param(b"\x16\x03\x01\x40\x01" + bytes(16385), id="record over 2^14"),
        pytest.param(records(hello_body([sni((0, NAME.encode()))]), message_type=2), id="a ServerHello"),
        pytest.param(records(hello_body(None)), id="no extensions"),
        pytest.param(records(hello_body([extension(16, b"\x00\x03\x02h2")])), id="no server_name"),
        pytest.param(records(hello_body([sni((1, NAME.encode()))])), id="no host_name entry"),
        pytest.param(records(hello_body([sni((0, b"a.b."))])), id="trailing dot"),
        pytest.param(records(hello_body([sni((0, "ü.b".encode()))])), id="not ASCII"),
        pytest.param(records(hello_body([sni((0, b"a b"))])), id="a space"),
        pytest.param(records(hello_body([sni((0, b""))])), id="empty name"),
        pytest.param(records(hello_body([sni((0, b"a" * 254))])), id="name over 253"),
        pytest.param(records(hello_body([sni()])), id="empty name list"),
        pytest.param(
            records(hello_body([sni((0, NAME.encode()))], session_id=bytes(33))), id="session id over 32"
        ),
        pytest.param(records(hello_body([sni((0, NAME.encode()))], suites=b"\x13")), id="odd cipher suites"),
        pytest.param(records(hello_body([sni((0, NAME.encode()))], suites=b"")), id="no cipher suites"),
        pytest.param(records(hello_body([sni((0, NAME.encode()))]) + b"\x00"), id="bytes after extensions"),
        pytest.param(records(hello_body([b"\x00\x00\x00\x10abc"])), id="extension overrun"),
    ],
)
def test_what_is_not_a_client_hello_with_a_server_name_has_none(data: bytes) -> None:
    assert read_client_hello(data) == Hello(None, 0)


def test_the_first_host_name_counts() -> None:
    two = records(hello_body([sni((1, b"other"), (0, b"a.x"), (0, b"b.x")), sni((0, b"c.x"))]))
    assert read_client_hello(two) == Hello("a.x", 0)


def test_a_declared_length_says_at_once_how_much_is_missing() -> None:
    # A handshake header claiming 1 MiB: the caller (limited to 16 KiB) can give up on the first peek.
    huge = b"\x16\x03\x01\x00\x04" + b"\x01" + (1 << 20).to_bytes(3, "big")
    assert read_client_hello(huge).missing >= 1 << 20
