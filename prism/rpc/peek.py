"""A request's namespace, read from its bytes before any Call is made.

A quota's refusal made through a Call cost about four times the overload
door's (``Calls._limit_new``): the call's object, its request decoded,
an exception, the trailers through h2's state machine, its metrics one by
one. For a call whose whole request came in the read that opened it (the
common case: HEADERS and one DATA frame that ends the stream), the
namespace can be read first, from the gRPC message's protobuf bytes: every
data request of the API has ``string namespace = 1`` (``docs/api.md``).

Only what a full decode would read the same is answered: one uncompressed
message filling the stream's DATA, top-level fields that parse, field 1 a
length-delimited UTF-8 string (its last occurrence, as protobuf's "last one
wins"). Anything else is None, and the call takes its ordinary path.
"""

from __future__ import annotations

from typing import Any

from prism.rpc.h2read import DATA_READ, PlainFrame


def first_data(plain: list[PlainFrame]) -> dict[int, PlainFrame]:
    """Stream id -> its first DATA entry among a read's frames (``prism.rpc.h2read``)."""
    found: dict[int, PlainFrame] = {}
    for entry in plain:
        if entry[0] == DATA_READ and entry[1] not in found:
            found[entry[1]] = entry
    return found


def namespace(entry: PlainFrame) -> str | None:
    """The namespace of the request of a stream whose first DATA entry in
    the read is ``entry`` (see the module docstring)."""
    data, ended = entry[2], entry[4]
    if not ended or type(data) is list:
        return None  # more to come, or several frames
    end = len(data)
    if end < 5 or data[0] != 0 or int.from_bytes(data[1:5], "big") != end - 5:
        return None  # compressed, or not one whole message
    return field_1(data, 5, end)


def field_1(data: Any, pos: int, end: int) -> str | None:
    """Field 1 of the protobuf message ``data[pos:end]``, a UTF-8 string, or None."""
    found: tuple[int, int] | None = None
    while pos < end:
        key, pos = _varint(data, pos, end)
        wire = key & 7
        if wire == 2:
            length, pos = _varint(data, pos, end)
            if length < 0 or pos + length > end:
                return None
            if key >> 3 == 1:
                found = pos, pos + length
            pos += length
        elif key < 0 or key >> 3 == 1:
            return None  # malformed, or field 1 of another wire type
        elif wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            return None  # groups (deprecated), or no wire type at all
        if pos < 0:
            return None
    if pos != end or found is None:
        return None
    try:
        return bytes(data[found[0] : found[1]]).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _varint(data: Any, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; (-1, -1) if there is none."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, -1
