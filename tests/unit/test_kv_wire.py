"""KeyValue's hand-written GetItems answer is byte for byte protobuf's own.

``prism.api.keyvalue.encode_get_items`` writes ``GetItemsResponse`` without
building the message (a value copied once, not twice); a client decodes
whatever it gets with protobuf, so the bytes must be the ones protobuf
writes, for every item and token.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from prism.api.keyvalue import encode_get_items
from prism.backends.keyvalue import StoredItem
from prism.proto import kv_pb2

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
