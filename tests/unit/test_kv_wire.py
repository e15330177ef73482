"""KeyValue's hand-written wire code agrees with protobuf's own.

``prism.api.keyvalue.encode_get_items`` writes ``GetItemsResponse`` without
building the message (a value copied once, not twice); a client decodes
whatever it gets with protobuf, so the bytes must be the ones protobuf
writes, for every item and token.

``prism.api.kvwire.decode_put_items`` reads a large ``PutItemsRequest`` from
the pieces it arrived in, each value copied once; it must accept exactly
what protobuf's parser accepts, with the same fields, and refuse the rest.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prism.api.keyvalue import encode_get_items
from prism.api.kvwire import PutItemsIn, decode_put_items, read_put_items
from prism.backends.keyvalue import StoredItem
from prism.proto import common_pb2, kv_pb2
from prism.rpc.pieces import Pieces

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
item = st.builds(
    StoredItem,
    key=st.binary(max_size=300),
    value=st.one_of(st.binary(max_size=300), st.sampled_from([b"v" * 127, b"v" * 128, b"v" * 16_384])),
    expires_at_ms=st.one_of(st.just(0), INT64, st.integers(0, 1 << 42)),
)


def protobufs(items: list[StoredItem], token: str) -> bytes:
    return kv_pb2.GetItemsResponse(
        items=[kv_pb2.Item(key=i.key, value=i.value, expires_at_ms=i.expires_at_ms) for i in items],
        next_page_token=token,
    ).SerializeToString()


@given(items=st.lists(item, max_size=5), token=st.text(max_size=200))
@example(items=[], token="")
@example(items=[StoredItem(b"", b"", 0)], token="")  # an all-default item: present, empty
@example(items=[StoredItem(b"k", b"x" * (1 << 20), 1_700_000_000_000)], token="t\u00e9")
@example(items=[StoredItem(b"k", b"v", -1)], token="")  # a negative int64: ten bytes
def test_the_answer_is_protobufs_own(items: list[StoredItem], token: str) -> None:
    encoded = encode_get_items(items, token)
    assert encoded == protobufs(items, token)
    decoded = kv_pb2.GetItemsResponse.FromString(encoded)
    assert [(i.key, i.value, i.expires_at_ms) for i in decoded.items] == [
        (i.key, i.value, i.expires_at_ms) for i in items
    ]
    assert decoded.next_page_token == token


# ---------------------------------------------------------------- PutItemsRequest, read


def varint(n: int, extra: int = 0) -> bytes:
    """``n`` as a varint, with ``extra`` needless continuation bytes (protobuf reads those too)."""
    if n < 0:
        n += 1 << 64  # an int64 as protobuf writes it
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n or extra:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
        if not n:
            extra -= 1
            if not extra:
                out.append(0)
                return bytes(out)


def field(number: int, kind: int, payload: bytes, tag_extra: int = 0) -> bytes:
    """A field as it goes on the wire: payload is the varint, the bytes, or the fixed-width value."""
    tag = varint(number << 3 | kind, tag_extra)
    if kind == 2:
        return tag + varint(len(payload)) + payload
    return tag + payload


TEXT = st.one_of(st.text(max_size=20), st.binary(max_size=6))  # bytes: UTF-8 or not
SCALAR = st.one_of(
    st.integers(0, 300),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.integers(1 << 64, 1 << 66),
    st.integers(0, 1 << 70),
)


@st.composite
def wire_fields(draw: st.DrawFn, fields: dict[int, str], depth: int = 0) -> bytes:
    """Fields of a message whose field numbers are ``fields`` (number -> "text", "bytes",
    "int", "item", "token"), mostly in the plain encoding, sometimes not: a wrong wire
    type, an unknown field, an overlong varint or tag, bad UTF-8, a cut end."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        number = draw(st.sampled_from([*fields, 5, 15, 16, 0, 2047]))
        kind_of = fields.get(number)
        if kind_of is None or draw(st.integers(0, 9)) == 0:  # unknown, or a wrong wire type
            kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
            payload = {0: varint(draw(SCALAR)), 1: b"\x01" * 8, 5: b"\x01" * 4}.get(kind, b"")
            if kind == 2:
                payload = draw(st.binary(max_size=8))
            out += field(number, kind, payload)
            continue
        tag_extra = draw(st.sampled_from([0, 0, 0, 0, 1]))
        if kind_of in ("int",):
            out += field(number, 0, varint(draw(SCALAR), draw(st.sampled_from([0, 0, 0, 1, 3]))), tag_extra)
            continue
        if kind_of == "text":
            raw = draw(TEXT)
            payload = raw.encode() if isinstance(raw, str) else raw
        elif kind_of == "bytes":
            payload = draw(st.binary(max_size=40))
        elif depth < 1:
            inner = {"item": {1: "bytes", 2: "bytes", 3: "int", 4: "int"}, "token": {1: "int", 2: "text"}}
            payload = draw(wire_fields(inner[kind_of], depth + 1))
        else:
            payload = b""
        out += field(number, 2, payload, tag_extra)
    return out


REQUEST_FIELDS = {1: "text", 2: "text", 3: "item", 4: "token"}


def request_bytes() -> st.SearchStrategy[bytes]:
    """PutItemsRequest encodings: protobuf's own, hand-made ones, and both cut or changed."""
    serialized = st.builds(
        lambda ns, rid, items, token: kv_pb2.PutItemsRequest(
            namespace=ns, id=rid, items=items, idempotency_token=token
        ).SerializeToString(),
        st.text(max_size=12),
        st.text(max_size=12),
        st.lists(
            st.builds(
                kv_pb2.Item,
                key=st.binary(max_size=20),
                value=st.binary(max_size=60),
                ttl_ms=INT64,
                expires_at_ms=INT64,
            ),
            max_size=3,
        ),
        st.one_of(
            st.none(), st.builds(common_pb2.IdempotencyToken, generation_time_us=INT64, token=st.text())
        ),
    )
    whole = st.one_of(serialized, wire_fields(REQUEST_FIELDS))

    @st.composite
    def changed(draw: st.DrawFn) -> bytes:
        raw = draw(whole)
        how = draw(st.sampled_from(["as is", "as is", "cut", "flip"]))
        if how == "cut" and raw:
            return raw[: draw(st.integers(0, len(raw) - 1))]
        if how == "flip" and raw:
            at = draw(st.integers(0, len(raw) - 1))
            return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
        return raw

    return changed()


def split(raw: bytes, cuts: list[int]) -> Pieces:
    """``raw`` as pieces cut at ``cuts``: views of it, as they come from reads, and bytes."""
    points = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    view = memoryview(raw)
    parts: list[Any] = [
        view[a:b] if i % 2 else bytes(view[a:b]) for i, (a, b) in enumerate(itertools.pairwise(points))
    ]
    return Pieces(parts, len(raw))


def outcome(decode: Callable[[], Any]) -> tuple[Any, ...]:
    """What a decoder made of a message, field by field, or that it refused it."""
    try:
        r = decode()
    except DecodeError:
        return ("refused",)
    token = r.idempotency_token
    return (
        r.namespace,
        r.id,
        [(i.key, i.value, i.ttl_ms, i.expires_at_ms) for i in r.items],
        (token.generation_time_us, token.token),
    )


@settings(max_examples=1500)
@given(raw=request_bytes(), cuts=st.lists(st.integers(0, 400), max_size=6))
@example(raw=b"\x0a\x02\xed\xa0", cuts=[])  # a surrogate: not UTF-8
@example(raw=b"\x1a\x0b\x18" + b"\xff" * 9 + b"\x7f", cuts=[])  # a varint past 64 bits
@example(raw=b"\x1a\x0b\x18" + b"\x81" + b"\x80" * 8 + b"\x04", cuts=[])  # 2**65 + 1: protobuf keeps 64 bits
@example(raw=b"\x0a\x80\x00", cuts=[1])  # an overlong length
@example(raw=b"\x8a\x00\x00", cuts=[])  # an overlong tag
@example(raw=b"\x22\x02\x08\x01\x22\x02\x12\x00", cuts=[3])  # a token twice: merged
def test_the_put_items_reader_reads_what_protobuf_reads(raw: bytes, cuts: list[int]) -> None:
    # The reader either declines (protobuf decides) or answers what protobuf
    # does; split anywhere, as a request arrives; and decode_put_items, which
    # uses it, accepts and refuses exactly what protobuf's parser does.
    expected = outcome(lambda: kv_pb2.PutItemsRequest.FromString(raw))
    pieces = split(raw, cuts)
    read = read_put_items(pieces)
    if read is not None:
        assert outcome(lambda: read) == expected
    assert outcome(lambda: decode_put_items(pieces)) == expected
    assert outcome(lambda: decode_put_items(raw)) == expected


@given(
    ns=st.text(max_size=12),
    items=st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=60), INT64), max_size=3),
    token=st.tuples(INT64, st.text(max_size=12)),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_the_reader_reads_every_request_protobuf_writes(
    ns: str, items: list[tuple[bytes, bytes, int]], token: tuple[int, str], cuts: list[int]
) -> None:
    raw = kv_pb2.PutItemsRequest(
        namespace=ns,
        id="r",
        items=[kv_pb2.Item(key=k, value=v, ttl_ms=t) for k, v, t in items],
        idempotency_token=common_pb2.IdempotencyToken(generation_time_us=token[0], token=token[1]),
    ).SerializeToString()
    read = read_put_items(split(raw, cuts))
    assert read is not None
    assert outcome(lambda: read) == outcome(lambda: kv_pb2.PutItemsRequest.FromString(raw))


@pytest.mark.parametrize("cuts", [[], [3], list(range(0, 1 << 20, 16_384)), list(range(7, 1 << 20, 16_393))])
def test_a_large_value_is_read_whole_and_once(cuts: list[int]) -> None:
    value = bytes((i * 131 + 7) % 251 for i in range(1 << 20))
    raw = kv_pb2.PutItemsRequest(
        namespace="ns", id="r", items=[kv_pb2.Item(key=b"k", value=value, ttl_ms=5)]
    ).SerializeToString()
    pieces = split(raw, cuts)
    request = decode_put_items(pieces)
    assert type(request) is PutItemsIn  # read here, not by protobuf
    assert outcome(lambda: request) == ("ns", "r", [(b"k", value, 5, 0)], (0, ""))
    assert type(request.items[0].value) is bytes
