"""A large request message as the pieces it arrived in, not yet copied together.

A message larger than a DATA frame arrives in pieces (16 KiB frames, most
clients). ``prism.rpc.inbound`` keeps them as they are (views of the bytes
read, no copy) until the message is whole; then it joins them into one
``bytes`` (one copy), or, for a method whose decoder reads pieces
(``MethodTable``'s ``piecewise_paths``), hands them over as ``Pieces``: that
decoder copies each field once, straight into the value it makes (a 1 MiB
item's value: one copy from the bytes read, not three).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer


class Pieces:
    """A message's bytes: ``parts`` in order, ``size`` bytes in all.
    ``bytes(pieces)`` is the message (a copy of it, for whoever needs it whole)."""

    __slots__ = ("_starts", "parts", "size")

    def __init__(self, parts: list[Buffer], size: int) -> None:
        self.parts = parts
        self.size = size
        self._starts: list[int] | None = None

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"Pieces({len(self.parts)} parts, {self.size} bytes)"

    def take(self, start: int, stop: int) -> bytes:
        """``bytes(self)[start:stop]``, copying only those bytes (``0 <= start <= stop <= size``)."""
        if start == stop:
            return b""
        starts = self._starts
        if starts is None:
            starts = self._starts = [0]
            at = 0
            for part in self.parts:
                at += len(part)  # type: ignore[arg-type]
                starts.append(at)
        i = bisect_right(starts, start) - 1
        part = self.parts[i]
        offset = start - starts[i]
        if stop <= starts[i + 1]:  # within one part: the usual case of a small field
            return bytes(memoryview(part)[offset : offset + stop - start])
        j = bisect_right(starts, stop - 1) - 1
        parts = self.parts[i : j + 1]  # (bytes and views: join takes both as they are)
        parts[0] = memoryview(part)[offset:]
        parts[-1] = memoryview(parts[-1])[: stop - starts[j]]
        return b"".join(parts)
