"""An HPACK encoder that sends the fixed gRPC header blocks pre-encoded.

The response headers and trailers of a successful call are the same on every
call, yet h2 HPACK-encodes them each time: on this machine that was about a
third of a trio + h2 server's CPU (PERF-NOTES.md). We encode each fixed block
once, in a form that never touches the HPACK dynamic table (static-table
indexes and "never indexed" literals), so the cached bytes are valid on any
connection at any time. Other header lists go to the real encoder, whose
dynamic table our cached blocks leave untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpack import Encoder, NeverIndexedHeaderTuple


def _stateless_block(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    scratch = Encoder()
    # Pseudo-headers like ":status: 200" hit the static table (indexed, no
    # table change); every other field is a never-indexed literal.
    return scratch.encode(
        [NeverIndexedHeaderTuple(n, v) if n != b":status" else (n, v) for n, v in headers]
    )


class FixedBlockEncoder(Encoder):
    """``hpack.Encoder`` that answers known header tuples from a cache.

    Cached blocks are keyed by the identity of the header tuple object: the
    protocol passes the same module-level constant every time, so the lookup
    is one dict access with no hashing of header contents.
    """

    def __init__(self, fixed: Iterable[tuple[tuple[bytes, bytes], ...]]) -> None:
        super().__init__()
        fixed = list(fixed)
        self._fixed: dict[int, bytes] = {id(h): _stateless_block(h) for h in fixed}
        self._keep = list(fixed)  # keep the keys' objects alive

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        block = self._fixed.get(id(headers))
        if block is not None and not self.header_table.resized:
            return block
        return super().encode(headers, huffman)
