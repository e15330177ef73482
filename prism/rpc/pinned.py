"""The reads that pieces of messages keep views of, bounded (``Requests``' base).

A piece of a message under way is a view of the bytes of the read it came in
(``prism.rpc.inbound``), and a view keeps its whole read alive. So a
connection's pinned reads are kept to at most ``_PIN_FACTOR`` times the
bytes its views hold (which the budget charges for): a peer that sent a byte
of a message in each read of other frames would otherwise hold a whole read
per byte. When a read or a let-go message would pass that, the views of the
reads they hold least of are copied into bytes of their own.
"""

from __future__ import annotations

from typing import Any, Final

from prism.rpc.call import Call
from prism.rpc.pieces import Pieces

# The reads that views pin are kept to at most this many times the bytes the
# views hold. (With large requests interleaved in each read, a read's share
# falls as its other messages end, to about a half on average: at 2, 1 MiB
# PutItems spent ~4% of their CPU copying values out of their reads again.)
_PIN_FACTOR: Final = 4


class _Read:
    """A read whose bytes pieces of messages keep views of: how many bytes
    they hold, and which calls (stream ids: no reference cycle) hold them."""

    __slots__ = ("data", "held", "holders", "size")

    def __init__(self, data: Any, size: int) -> None:
        self.data = data
        self.size = size
        self.held = 0
        self.holders: list[int] = []


class PinnedReads:
    """Which reads the pieces of a connection's messages pin, and the bound."""

    calls: dict[int, Call]
    _viewers: list[Call]  # calls that took views of the current read (``Call._fresh``)
    # The reads that views pin (an ordered set), their sizes, and the bytes the views hold.
    _pinned: dict[_Read, None]
    _pinned_bytes: int
    _view_bytes: int

    def _settle_views(self, read: Any) -> None:
        """At the end of a read: the views of it that pieces still hold pin it
        (``_pinned``); a read that is not ``bytes`` is copied from at once."""
        viewers, self._viewers = self._viewers, []
        pinned = _Read(read.obj if type(read) is memoryview else read, len(read))
        for call in viewers:
            n = call._fresh
            if n:
                call._fresh = 0
                pinned.held += n
                pinned.holders.append(call.stream_id)
                call._holds.append((pinned, n))
        if not pinned.held:
            return
        self._pinned[pinned] = None
        self._pinned_bytes += pinned.size
        self._view_bytes += pinned.held
        if type(read) is not bytes:
            self._own(pinned)
        else:
            self._bound_views()

    def _let_go_views(self, call: Call) -> None:
        """The call's pieces are let go: so are its views of each read."""
        call._fresh = 0  # (of the current read: not counted at its end)
        holds = call._holds
        if holds:
            call._holds = []
            for read, n in holds:
                read.held -= n
                read.holders.remove(call.stream_id)
                self._view_bytes -= n
                if not read.held:
                    del self._pinned[read]
                    self._pinned_bytes -= read.size
            self._bound_views()

    def _bound_views(self) -> None:
        """Keep the reads that views pin to at most ``_PIN_FACTOR`` times the
        bytes the views hold, copying from the reads they hold least of first."""
        if _PIN_FACTOR * self._view_bytes >= self._pinned_bytes:
            return
        for read in sorted(self._pinned, key=lambda r: r.held / r.size):
            self._own(read)
            if _PIN_FACTOR * self._view_bytes >= self._pinned_bytes:
                return

    def _own(self, read: _Read) -> None:
        """Copy the pieces that are views of ``read`` into bytes of their own,
        and let the read go (a byte is copied this way once at most)."""
        data = read.data
        for sid in read.holders:
            call = self.calls.get(sid)
            if call is None:
                continue
            lists = [m.parts for m in call.messages if type(m) is Pieces]
            if call._parts is not None:
                lists.append(call._parts)
            for parts in lists:
                for i, part in enumerate(parts):
                    if type(part) is memoryview and part.obj is data:
                        parts[i] = part.tobytes()
            call._holds = [(r, n) for r, n in call._holds if r is not read]
        del self._pinned[read]
        self._pinned_bytes -= read.size
        self._view_bytes -= read.held
        read.holders = []
        read.held = 0
