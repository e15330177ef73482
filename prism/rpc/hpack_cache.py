"""HPACK work done once instead of on every call.

The response headers and trailers of a successful call are the same on every
call, and a client's request header blocks repeat byte for byte once its
HPACK dynamic table has warmed up. Yet h2 encodes and decodes each of them in
full every time, and for calls as small as a KeyValue read that repeated work
was about a third of the server's CPU when profiled: the single largest
cost after the backend itself. Both caches here are exact, never approximate:

- ``FixedBlockEncoder`` encodes each fixed header list once, in a form that
  never touches the dynamic table (static-table indexes and never-indexed
  literals), so the cached bytes are right on any connection at any time and
  leave the real encoder's table untouched for everything else.
- ``CachingDecoder`` remembers the decoding of header blocks that did not
  change the dynamic table. Such a block decodes the same for as long as the
  table stays as it was, so the cache is emptied whenever any block changes
  the table (or its size). Each block is judged once, when it is decoded
  (``prism.rpc.headers``), and the verdict is kept with the decoding:
  ``verdict`` is that of the block decoded last. ``plain(block)`` answers
  from the cache alone, for well-formed requests whose headers need nothing
  from h2 beyond the stream state (``prism.rpc.h2conn``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

from prism.rpc.headers import malformed_request

_MAX_DECODED_BLOCKS = 256


def stateless_block(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Encode a header list without touching any HPACK dynamic table."""
    scratch = Encoder()
    # ":status: 200" hits the static table (an index, no table change); every
    # other field is a never-indexed literal.
    return scratch.encode([NeverIndexedHeaderTuple(n, v) if n != b":status" else (n, v) for n, v in headers])


@functools.lru_cache(maxsize=8)
def _fixed_blocks(
    fixed: tuple[tuple[tuple[bytes, bytes], ...], ...],
) -> dict[tuple[tuple[bytes, bytes], ...], bytes]:
    # Encoded once per process, not per connection (HPACK encoding them was
    # over half of what setting up a connection cost).
    return {tuple(h): stateless_block(h) for h in fixed}


class FixedBlockEncoder(Encoder):
    """``hpack.Encoder`` that answers known header lists from a cache."""

    def __init__(self, fixed: Iterable[tuple[tuple[bytes, bytes], ...]]) -> None:
        super().__init__()
        self._fixed = _fixed_blocks(tuple(fixed))

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        # h2 hands over a new list of the same (bytes, bytes) pairs each time;
        # the bytes objects are ours, so hashing them is cached by Python.
        block = self._fixed.get(tuple(headers))
        if block is not None and not self.header_table.resized:
            return block
        return super().encode(headers, huffman)


class CachingDecoder(Decoder):
    """``hpack.Decoder`` that skips decoding of repeated, table-neutral blocks."""

    def __init__(self) -> None:
        super().__init__()
        self._decoded: dict[bytes, tuple[Any, str | None]] = {}
        self._plain: dict[bytes, Any] = {}
        # Why the block decoded last is a malformed request, or None.
        self.verdict: str | None = None

    def _table_state(self) -> tuple[int, object, int]:
        entries = self.header_table.dynamic_entries
        return len(entries), entries[0] if entries else None, self.header_table.maxsize

    def decode(self, data: bytes, raw: bool = False) -> Any:
        key = bytes(data)
        hit = self._decoded.get(key)
        if hit is not None and raw:
            headers, self.verdict = hit
            return headers
        before = self._table_state()
        headers = super().decode(data, raw)
        changed = self._table_state() != before
        if changed or len(self._decoded) >= _MAX_DECODED_BLOCKS:
            self._decoded.clear()
            self._plain.clear()
        if raw:
            self.verdict = verdict = malformed_request(headers)
            if not changed:
                self._decoded[key] = headers, verdict
                entry = _plain_request(headers) if verdict is None else None
                if entry is not None:
                    self._plain[key] = entry
        return headers

    def plain(self, block: bytes) -> tuple[Any, int | None] | None:
        """``(headers, content-length or None)`` of ``block`` if it was decoded
        before without changing the table and is a well-formed request; else None."""
        return self._plain.get(block)


def _plain_request(headers: Any) -> tuple[Any, int | None] | None:
    """What h2 takes from a well-formed request's headers when it receives
    them: the content-length it will hold the body to (read as h2 reads it).
    None for a block h2 would treat otherwise: a content-length that is not
    digits, or two that differ (h2 refuses those)."""
    length: int | None = None
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                return None
            length = int(value)
    return headers, length
