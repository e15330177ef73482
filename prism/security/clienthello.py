"""The server name (SNI) a TLS ClientHello asks for, read before the handshake.

A TLS session cannot move between processes once its keys are agreed, so a
worker picks a TLS connection's tenant from the ClientHello's ``server_name``
extension (RFC 6066 section 3) while the bytes are still unread in the kernel,
and hands the untouched socket over (``prism.rpc.handshake``). This module
is the parser: bytes in, an answer out, no I/O.

What is parsed (RFC 8446 sections 4.1.2 and 5.1; TLS 1.2's ClientHello has
the same shape): TLS records of type handshake, whose fragments join into
one handshake message; that message's header (type client_hello, 24-bit
length); the ClientHello's fixed fields; its extensions; in the server_name
extension, the first ``host_name`` entry.

Anything malformed, or any length that does not add up, is "no server name",
never an exception: the connection is then served where it landed, and
OpenSSL's handshake judges the bytes. A prefix that could still become a
ClientHello says how many more bytes it needs at least (``missing``), so the
caller knows what to wait for.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_RECORD_HEADER = 5
_HANDSHAKE_RECORD = 22
_MAX_FRAGMENT = 2**14  # TLSPlaintext.length's limit (RFC 8446 section 5.1)
_HANDSHAKE_HEADER = 4
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
# RFC 6066: a DNS host name in ASCII, without a trailing dot. Underscores are
# not valid in host names but do occur; they cannot hurt a tenant lookup.
_HOST = re.compile(rb"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_MAX_HOST = 253


class Hello(NamedTuple):
    """``server_name``: the first host_name asked for, or None. ``missing``:
    0 once there is nothing more to read (a whole ClientHello, or bytes that
    cannot be one); else at least this many more bytes are needed."""

    server_name: str | None
    missing: int


_NONE = Hello(None, 0)


class _Malformed(Exception):
    pass


def read_client_hello(data: bytes) -> Hello:
    """The server name of the ClientHello that ``data`` starts with."""
    message = bytearray()  # the handshake message, joined from its records
    offset = 0
    while True:
        if len(data) < offset + _RECORD_HEADER:
            return Hello(None, _missing(data, offset, message, offset + _RECORD_HEADER))
        kind, major, length = data[offset], data[offset + 1], int.from_bytes(data[offset + 3 : offset + 5])
        if kind != _HANDSHAKE_RECORD or major != 3 or not 0 < length <= _MAX_FRAGMENT:
            return _NONE
        end = offset + _RECORD_HEADER + length
        if len(data) < end:
            return Hello(None, _missing(data, offset, message, end))
        message += data[offset + _RECORD_HEADER : end]
        offset = end
        if len(message) < _HANDSHAKE_HEADER:
            continue
        if message[0] != _CLIENT_HELLO:
            return _NONE
        size = _HANDSHAKE_HEADER + int.from_bytes(message[1:4])
        if len(message) >= size:
            try:
                return Hello(_server_name(memoryview(message)[_HANDSHAKE_HEADER:size]), 0)
            except _Malformed:
                return _NONE


def _missing(data: bytes, offset: int, message: bytearray, end: int) -> int:
    """How many bytes past ``data`` are needed at least: up to ``end`` (the
    record at ``offset``, or its header); once the message's length is known,
    the rest of it too, in at least one more record, so that a declared
    length over the caller's limit is refused at once. Never more than a
    well-formed ClientHello still has to come: the caller waits for them."""
    wanted = end
    if len(message) >= _HANDSHAKE_HEADER:
        rest = _HANDSHAKE_HEADER + int.from_bytes(message[1:4]) - len(message)
        wanted = max(wanted, offset + _RECORD_HEADER + rest)
    return wanted - len(data)


class _Reader:
    """Bounds-checked reads over a ClientHello's body; any overrun is malformed."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.data):
            raise _Malformed
        part = self.data[self.at : self.at + n]
        self.at += n
        return part

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size))

    def vector(self, length_size: int) -> memoryview:
        return self.take(self.number(length_size))

    @property
    def done(self) -> bool:
        return self.at == len(self.data)


def _server_name(body: memoryview) -> str | None:
    hello = _Reader(body)
    hello.take(2 + 32)  # legacy_version, random
    if len(hello.vector(1)) > 32:  # legacy_session_id
        raise _Malformed
    suites = hello.vector(2)
    if not suites or len(suites) % 2:
        raise _Malformed
    if not hello.vector(1):  # legacy_compression_methods
        raise _Malformed
    if hello.done:
        return None  # no extensions at all (TLS 1.2 allows it)
    extensions = _Reader(hello.vector(2))
    if not hello.done:
        raise _Malformed
    name = None
    while not extensions.done:
        kind = extensions.number(2)
        payload = extensions.vector(2)
        if kind == _SERVER_NAME and name is None:
            name = _host_name(_Reader(payload))
    return name


def _host_name(extension: _Reader) -> str | None:
    names = _Reader(extension.vector(2))
    if not extension.done or names.done:
        raise _Malformed
    while not names.done:
        kind = names.number(1)
        name = bytes(names.vector(2))
        if kind == _HOST_NAME:
            if len(name) > _MAX_HOST or not _HOST.fullmatch(name):
                raise _Malformed
            return name.decode("ascii")
    return None
