"""An in-process PubSub backend: the reference for the contract
(prism/backends/pubsub.py) and the store for tests and development.
Everything, groups included, is lost on restart.

Per topic: a log ``sequence -> Message`` (sequences 1, 2, ... with no gaps;
the oldest are dropped past ``max_messages``), a dedup map ``message_id ->
(sequence, expiry)`` in publication order, so expired ids are cut off its
front, and the groups. A group has a cursor (the next new sequence to hand
out) and its pending deliveries ``sequence -> (deadline, member)``; a heap of
``(deadline, sequence)`` finds the due ones (an entry whose deadline is no
longer the pending one is stale and skipped). A member leaving makes its
deliveries due at once. Waiting members sleep on the topic's ``trio.Event``,
replaced at every change, or until the earliest pending deadline. All times
are ``trio.current_time()``, so tests can run on a fake clock.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import trio

from prism.backends.memory.options import MemoryPubSubOptions
from prism.backends.pubsub import Message, Start, StartKind

_DEFAULTS = MemoryPubSubOptions()  # frozen: one instance serves every default


class _Group:
    __slots__ = ("cursor", "due", "pending")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.pending: dict[int, tuple[float, object]] = {}  # sequence -> (deadline, member)
        self.due: list[tuple[float, int]] = []  # heap of (deadline, sequence), may be stale

    def set_pending(self, seq: int, deadline: float, member: object) -> None:
        self.pending[seq] = (deadline, member)
        heapq.heappush(self.due, (deadline, seq))

    def next_deadline(self) -> float:
        """The earliest pending deadline (dropping stale heap entries), or inf."""
        while self.due:
            deadline, seq = self.due[0]
            entry = self.pending.get(seq)
            if entry is not None and entry[0] == deadline:
                return deadline
            heapq.heappop(self.due)
        return math.inf


class _Topic:
    __slots__ = ("changed", "dedup", "groups", "log", "next_seq")

    def __init__(self) -> None:
        self.log: dict[int, Message] = {}
        self.next_seq = 1
        self.dedup: dict[str, tuple[int, float]] = {}  # message_id -> (sequence, expiry)
        self.groups: dict[str, _Group] = {}
        self.changed = trio.Event()

    @property
    def first(self) -> int:
        """The first retained sequence (``next_seq`` when the log is empty)."""
        return self.next_seq - len(self.log)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def position(self, start: Start) -> int:
        if start.kind == StartKind.EARLIEST:
            return self.first
        if start.kind == StartKind.SEQUENCE:
            return start.sequence
        return self.next_seq


class _Subscription:
    """One member of a group, or an ephemeral subscriber (``group is None``)."""

    def __init__(self, topic: _Topic, group: _Group | None, cursor: int, ack_wait_s: float) -> None:
        self._topic = topic
        self._group = group
        self._cursor = cursor  # only for an ephemeral subscription
        self._ack_wait_s = ack_wait_s

    async def receive(self) -> Message:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            msg = self._take()
            if msg is not None:
                # A schedule point that cannot cancel: a taken message is never lost.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return msg
            changed = self._topic.changed
            deadline = math.inf if self._group is None else self._group.next_deadline()
            with trio.move_on_at(deadline):
                await changed.wait()

    def _take(self) -> Message | None:
        topic, group = self._topic, self._group
        if group is None:
            self._cursor = max(self._cursor, topic.first)
            if self._cursor >= topic.next_seq:
                return None
            self._cursor += 1
            return topic.log[self._cursor - 1]
        now = trio.current_time()
        while group.next_deadline() <= now:  # due redeliveries first
            _, seq = heapq.heappop(group.due)
            msg = topic.log.get(seq)
            if msg is None:  # dropped from the log meanwhile
                del group.pending[seq]
                continue
            group.set_pending(seq, now + self._ack_wait_s, self)
            return msg
        group.cursor = max(group.cursor, topic.first)
        if group.cursor >= topic.next_seq:
            return None
        seq = group.cursor
        group.cursor += 1
        group.set_pending(seq, now + self._ack_wait_s, self)
        return topic.log[seq]

    def release(self) -> None:
        """Make this member's unacknowledged deliveries due at once."""
        group = self._group
        if group is None:
            return
        now = trio.current_time()
        mine = [seq for seq, (_, member) in group.pending.items() if member is self]
        for seq in mine:
            group.set_pending(seq, now, None)
        if mine:
            self._topic.notify()


class MemoryPubSubBackend:
    """Options: ``MemoryPubSubOptions`` (``ack_wait_ms``, ``dedup_window_s``
    and ``max_messages``)."""

    def __init__(self, options: MemoryPubSubOptions = _DEFAULTS) -> None:
        self.ack_wait_s = options.ack_wait_ms / 1000
        self.dedup_window_s = options.dedup_window_s
        self.max_messages = options.max_messages
        self._topics: dict[str, _Topic] = {}

    async def open(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic()
        return topic

    async def publish(self, topic: str, payload: bytes, headers: Mapping[str, str], message_id: str) -> int:
        await trio.lowlevel.checkpoint()
        t = self._topic(topic)
        now = trio.current_time()
        while t.dedup:  # expiries grow in insertion order: cut the expired front
            oldest = next(iter(t.dedup))
            if t.dedup[oldest][1] > now:
                break
            del t.dedup[oldest]
        if message_id and message_id in t.dedup:
            return t.dedup[message_id][0]
        seq = t.next_seq
        t.next_seq += 1
        t.log[seq] = Message(topic, seq, bytes(payload), dict(headers), message_id)
        if len(t.log) > self.max_messages:
            del t.log[t.first]
        if message_id:
            t.dedup[message_id] = (seq, now + self.dedup_window_s)
        t.notify()
        return seq

    @asynccontextmanager
    async def subscribe(self, topic: str, group: str, start: Start) -> AsyncIterator[_Subscription]:
        await trio.lowlevel.checkpoint()
        t = self._topic(topic)
        g = None
        if group:
            g = t.groups.get(group)
            if g is None:
                g = t.groups[group] = _Group(t.position(start))
        sub = _Subscription(t, g, t.position(start), self.ack_wait_s)
        try:
            yield sub
        finally:
            sub.release()

    async def ack(self, topic: str, group: str, sequences: Sequence[int]) -> None:
        await trio.lowlevel.checkpoint()
        t = self._topics.get(topic)
        g = t.groups.get(group) if t is not None else None
        if g is not None:
            for seq in sequences:
                g.pending.pop(seq, None)  # its heap entries become stale
