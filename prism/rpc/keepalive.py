"""A connection's timers: its handshake, idleness, keepalive PINGs and age.

All on trio's clock and all per connection, never per call: one task per
connection (``watch``) sleeps until the nearest of its deadlines. What the
connection does meanwhile costs it two counter increments, compared when the
task wakes: ``reads`` (a read from the peer) and ``opened`` (a stream
opened). Timing the last read or the end of the last call instead would put
a clock read on every call.

- ``handshake_timeout_s``: the client's preface and its first frame (which
  HTTP/2 makes a SETTINGS) must have arrived by then (``Preface``), else the
  connection is closed. With TLS it starts once the TLS handshake, which has
  its own bound (``prism.rpc.handshake``), is done.
  A plaintext connection's first 24 bytes are read before anything is built
  for it (``prism.rpc.opening``).
- ``idle_timeout_s``: a connection with no stream open this long gets
  GOAWAY(NO_ERROR) and is closed. PINGs and other frames do not keep it
  open; streams do. The task looks every quarter of the timeout, so the
  close comes between one and one and a quarter timeouts after the last
  stream ended.
- ``keepalive_time_s``: a connection the peer has sent nothing on for this
  long gets a PING; if nothing comes back (a live peer's ACK does) within
  ``keepalive_timeout_s`` it is closed, as gRPC's own servers do. Calls
  flowing are frames read: no PING then. The task looks once per
  ``keepalive_time_s``, so a quiet connection's PING goes out between one
  and two of them after its last frame.
- ``max_connection_age_s``: at that age plus up to a tenth more (so that
  connections opened together do not all leave together), GOAWAY(NO_ERROR):
  the client makes its next calls on a new connection, which a load
  balancer may send elsewhere; calls in flight finish, for at most the
  drain timeout (the server's ``graceful_timeout_s``), then it is closed.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from typing import Final, Protocol

import trio

from prism.config.limits import Http2Config
from prism.rpc.protocol import GrpcProtocol

log = logging.getLogger("prism.rpc")

# The client connection preface (RFC 9113 section 3.4), then a frame header.
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FIRST_FRAME_AT: Final = len(PREFACE) + 9
_SETTINGS: Final = 0x4
AGE_JITTER: Final = 0.1  # up to this fraction of max_connection_age_s is added
IDLE_LOOKS: Final = 4  # an idle connection is looked at this many times per idle_timeout_s


class Preface:
    """Whether the client's preface and its first frame, a SETTINGS, have
    arrived in full. Fed every byte read until it says so; sans I/O."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._seen = 0
        self._needed = math.inf
        self.done = False

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Count ``data``; True once the preface and the first SETTINGS are in."""
        self._seen += len(data)
        if len(self._head) < _FIRST_FRAME_AT:
            self._head += data[: _FIRST_FRAME_AT - len(self._head)]
            if len(self._head) == _FIRST_FRAME_AT and self._head[-6] == _SETTINGS:
                # Anything else is a protocol error for h2 to close the
                # connection over; if it does not, the timeout will.
                self._needed = _FIRST_FRAME_AT + int.from_bytes(self._head[-9:-6], "big")
        self.done = self._seen >= self._needed
        return self.done


class Watched(Protocol):
    """What the timers see of a connection (``prism.rpc.server.Connection``)."""

    reads: int  # reads from the peer so far
    opened: int  # streams the peer has opened so far
    proto: GrpcProtocol  # its ``idle``: no stream open

    def ping(self) -> None:
        """Send a PING."""

    def go_away(self, reason: str) -> None:
        """GOAWAY(NO_ERROR): no new streams; close once the open ones are answered."""

    def abort(self, reason: str) -> None:
        """Close now, whatever is in flight."""


class Timers:
    """A connection's deadlines, sans I/O: ``due(now)`` acts on the ones
    reached and returns when to look next."""

    def __init__(self, conn: Watched, http2: Http2Config, drain_timeout_s: float, now: float) -> None:
        self._conn = conn
        self._idle_s = http2.idle_timeout_s
        self._keepalive_s = http2.keepalive_time_s or math.inf
        self._answer_s = http2.keepalive_timeout_s
        self._drain_s = drain_timeout_s
        self._opened = conn.opened
        self._quiet_since: float | None = now if conn.proto.idle else None
        self._reads = conn.reads
        self._ping_at = now + self._keepalive_s
        self._answer_by = math.inf
        age = http2.max_connection_age_s
        self._goaway_at = now + age * (1 + AGE_JITTER * random.random()) if age else math.inf
        self._close_at = math.inf

    def due(self, now: float) -> float:
        return min(self._idle(now), self._keepalive(now), self._age(now))

    def _idle(self, now: float) -> float:
        conn = self._conn
        look = now + self._idle_s / IDLE_LOOKS
        if not conn.proto.idle:
            self._quiet_since = None
            return look
        if self._quiet_since is None or conn.opened != self._opened:
            # The streams seen open last time, or opened since, have ended;
            # exactly when is not recorded: quiet from now.
            self._quiet_since = now
            self._opened = conn.opened
        elif now >= self._quiet_since + self._idle_s:
            conn.go_away("idle")
            return math.inf
        return min(look, self._quiet_since + self._idle_s)

    def _keepalive(self, now: float) -> float:
        conn = self._conn
        if conn.reads != self._reads:  # the peer has spoken: alive, and no PING needed
            self._reads = conn.reads
            self._answer_by = math.inf
            self._ping_at = now + self._keepalive_s
        elif self._answer_by <= now:
            conn.abort("keepalive_timeout")
            return math.inf
        elif self._ping_at <= now and self._answer_by == math.inf:
            conn.ping()
            self._answer_by = now + self._answer_s
        return self._ping_at if self._answer_by == math.inf else self._answer_by

    def _age(self, now: float) -> float:
        if self._close_at <= now:
            self._conn.abort("max_age_drain")
            return math.inf
        if self._goaway_at <= now:
            self._conn.go_away("max_age")
            self._goaway_at = math.inf
            self._close_at = now + self._drain_s
        return min(self._goaway_at, self._close_at)


async def watch(conn: Watched, http2: Http2Config, drain_timeout_s: float) -> None:
    """Run a connection's timers until cancelled (the connection's end)."""
    timers = Timers(conn, http2, drain_timeout_s, trio.current_time())
    wake = timers.due(trio.current_time())
    while True:
        await trio.sleep_until(wake)
        wake = timers.due(trio.current_time())


class Slot:
    """A connection's place in a ``TimerHeap``: its timers, None once it has ended."""

    __slots__ = ("timers",)

    def __init__(self, timers: Timers) -> None:
        self.timers: Timers | None = timers


class TimerHeap:
    """The timers of every connection of a listener, run by one task (``run``).

    A connection costs a heap entry, not a task of its own: that task (its
    start, its cancel scope, its cancellation at the connection's end) was
    ~70 us of CPU and ~4 KB per connection, a fifth of what a connection that
    only says hello cost the worker. ``add`` takes a connection's ``Timers``;
    the connection ``end``s its slot when it closes, and the entry is dropped
    when it comes up (holding nothing but the empty slot meanwhile).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Slot]] = []
        self._seq = 0
        self._scope: trio.CancelScope | None = None

    def add(self, timers: Timers, now: float) -> Slot:
        slot = Slot(timers)
        self._push(timers.due(now), slot)
        return slot

    def _push(self, wake: float, slot: Slot) -> None:
        if wake == math.inf:
            return
        self._seq += 1
        heapq.heappush(self._heap, (wake, self._seq, slot))
        scope = self._scope
        if scope is not None and wake < scope.deadline:
            scope.deadline = wake

    async def run(self) -> None:
        """Act on the timers as they come due, until cancelled."""
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                slot = heapq.heappop(heap)[2]
                timers = slot.timers
                if timers is None:
                    continue  # its connection has ended
                try:
                    wake = timers.due(now)
                except Exception:  # one connection's failure stops no other's timers
                    log.exception("connection timers failed")
                    continue
                self._push(wake, slot)
