"""``PutItemsRequest`` read off the wire with each item's value copied once.

protobuf's parser copies a ``bytes`` field into its arena, and reading
``item.value`` copies it again into a Python ``bytes``; before that, the
message's pieces were copied together. For a 1 MiB value those three copies
(and a zero-fill) were a third of a PutItems' CPU. ``decode_put_items``
reads a large request itself, from the pieces it arrived in
(``prism.rpc.pieces``): each field is copied once, out of those pieces, into
the value the backend stores.

It reads only the plain encoding protobuf writes (one-byte tags of the
request's own fields with their own wire types); anything else, and
anything it cannot read (a bad length, bad UTF-8, a varint past 64 bits),
goes to protobuf's own parser, which accepts or rejects it as it always did
(``tests/unit/test_kv_wire.py`` holds the two to the same answers).
Small requests go to protobuf at once: its C parser is faster there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, cast

from prism.proto import kv_pb2
from prism.rpc.pieces import Pieces

# At this size and above a request is read here (a value's copies cost more
# than this reader's Python does).
FAST_FROM: Final = 64 * 1024

# (protobuf parses any buffer; its stubs say bytes.)
_FromString = cast(Callable[[bytes | bytearray], kv_pb2.PutItemsRequest], kv_pb2.PutItemsRequest.FromString)
_HEAD: Final = 11  # a one-byte tag and a varint of at most ten bytes
_INT64: Final = 1 << 64


class TokenIn:
    """``common_pb2.IdempotencyToken``'s fields, as PutItems reads them."""

    __slots__ = ("generation_time_us", "token")

    def __init__(self) -> None:
        self.generation_time_us = 0
        self.token = ""


class ItemIn:
    """``kv_pb2.Item``'s fields, as PutItems reads them."""

    __slots__ = ("expires_at_ms", "key", "ttl_ms", "value")

    def __init__(self) -> None:
        self.key = b""
        self.value = b""
        self.ttl_ms = 0
        self.expires_at_ms = 0


class PutItemsIn:
    """``kv_pb2.PutItemsRequest``'s fields, as PutItems reads them."""

    __slots__ = ("id", "idempotency_token", "items", "namespace")

    def __init__(self) -> None:
        self.namespace = ""
        self.id = ""
        self.items: list[ItemIn] = []
        self.idempotency_token = TokenIn()


class _Unusual(Exception):
    """Not the plain encoding: protobuf's parser decides."""


def decode_put_items(message: bytes | bytearray | Pieces) -> kv_pb2.PutItemsRequest | PutItemsIn:
    """The request in ``message``; raises protobuf's ``DecodeError`` for one
    protobuf does not accept."""
    if len(message) >= FAST_FROM:
        request = read_put_items(message if isinstance(message, Pieces) else Pieces([message], len(message)))
        if request is not None:
            return request
    return _FromString(bytes(message) if isinstance(message, Pieces) else message)


def read_put_items(message: Pieces) -> PutItemsIn | None:
    """The request, if ``message`` is in the plain encoding; else None."""
    try:
        return _request(message)
    except _Unusual:
        return None


def _request(message: Pieces) -> PutItemsIn:
    request = PutItemsIn()
    pos, end = 0, message.size
    while pos < end:
        tag, start, stop = _field(message, pos, end)
        if tag == 0x1A:  # items = 3
            request.items.append(_item(message, start, stop))
        elif tag == 0x0A:  # namespace = 1
            request.namespace = _text(message, start, stop)
        elif tag == 0x12:  # id = 2
            request.id = _text(message, start, stop)
        elif tag == 0x22:  # idempotency_token = 4: a repeated one merges into the first
            _token(message, start, stop, request.idempotency_token)
        else:
            raise _Unusual
        pos = stop
    return request


def _item(message: Pieces, pos: int, end: int) -> ItemIn:
    item = ItemIn()
    while pos < end:
        tag, start, stop = _field(message, pos, end)
        if tag == 0x12:  # value = 2
            item.value = message.take(start, stop)
        elif tag == 0x0A:  # key = 1
            item.key = message.take(start, stop)
        elif tag == 0x18:  # ttl_ms = 3
            item.ttl_ms = _int64(start)
        elif tag == 0x20:  # expires_at_ms = 4
            item.expires_at_ms = _int64(start)
        else:
            raise _Unusual
        pos = stop
    return item


def _token(message: Pieces, pos: int, end: int, token: TokenIn) -> None:
    while pos < end:
        tag, start, stop = _field(message, pos, end)
        if tag == 0x08:  # generation_time_us = 1
            token.generation_time_us = _int64(start)
        elif tag == 0x12:  # token = 2
            token.token = _text(message, start, stop)
        else:
            raise _Unusual
        pos = stop


def _field(message: Pieces, pos: int, end: int) -> tuple[int, int, int]:
    """The field at ``pos``: its tag, and for a length-delimited one (even
    tag wire type 2) where its bytes start and stop; for a varint one, its
    value and where it stops."""
    head = message.take(pos, min(pos + _HEAD, end))
    tag = head[0]  # (a tag of more than one byte, 0x80 set, is none of the callers')
    value = shift = 0
    i = 1
    while True:
        if i == len(head):
            raise _Unusual  # runs past the end (or past ten bytes)
        byte = head[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    if value >= _INT64:
        raise _Unusual  # protobuf drops the bits past 64: let it
    kind = tag & 7
    if kind == 2:
        start = pos + i
        stop = start + value
        if stop > end:
            raise _Unusual
        return tag, start, stop
    if kind == 0:
        return tag, value, pos + i
    raise _Unusual


def _int64(value: int) -> int:
    return value - _INT64 if value >= _INT64 >> 1 else value


def _text(message: Pieces, start: int, stop: int) -> str:
    try:
        return message.take(start, stop).decode()
    except UnicodeDecodeError:
        raise _Unusual from None  # protobuf rejects it
