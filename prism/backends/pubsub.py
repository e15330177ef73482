"""The PubSub backend Protocol and its plain data types.

Backends see neither protobuf nor gRPC. Semantics every backend implements
(tests/integration/test_pubsub_contract.py checks them against each backend):

- ``publish`` stores a message on a topic and returns its sequence.
  Sequences increase per topic (not necessarily by one: a backend may number
  all of a namespace's topics from one counter).
- A non-empty ``message_id`` published again on the same topic within
  ``dedup_window_s`` is not stored again: ``publish`` returns the sequence of
  the first one.
- Every group receives every message of its topic published from its start
  position on (fan-out). The members of one group (concurrent ``subscribe``
  contexts with the same topic and group) share its messages: each message
  is delivered to one member at a time.
- A named group is durable. A delivered message stays pending until ``ack``;
  a pending delivery is redelivered (to any member) ``ack_wait_ms`` after it
  was delivered. When a member's ``subscribe`` context exits, the messages
  delivered to it and not acknowledged become deliverable again at once.
  When the group already exists, ``start`` is ignored: the group resumes
  where it left off (the memory backend forgets its groups on restart; a
  durable backend keeps them, and an ``ack`` that returned is never undone).
- An empty group is an ephemeral subscription: it receives every message
  from ``start`` on, needs no acks, and is forgotten when its context exits.
- ``ack`` of a sequence that is not pending (already acknowledged, never
  delivered, unknown group) does nothing and is not an error.
- Start positions: LATEST delivers only messages published after the
  subscription starts; EARLIEST from the first retained message; SEQUENCE
  from ``sequence`` inclusive.
- Backend unreachable: ``publish``/``ack`` raise ``Unavailable``; a
  subscription's ``receive`` raises ``Unavailable`` too (the stream ends and
  the client resubscribes; a durable group loses nothing).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

import msgspec


class StartKind(enum.IntEnum):
    LATEST = 0
    EARLIEST = 1
    SEQUENCE = 2


class Start(msgspec.Struct, frozen=True):
    kind: StartKind = StartKind.LATEST
    sequence: int = 0  # only for SEQUENCE


class Message(msgspec.Struct, frozen=True):
    topic: str
    sequence: int
    payload: bytes = b""
    headers: dict[str, str] = {}
    message_id: str = ""


@runtime_checkable
class Subscription(Protocol):
    """One member of a group (or one ephemeral subscriber)."""

    async def receive(self) -> Message:
        """The next message for this member; waits until there is one."""
        ...


@runtime_checkable
class PubSubBackend(Protocol):
    """What a PubSub backend provides. One instance serves one namespace."""

    async def publish(self, topic: str, payload: bytes, headers: Mapping[str, str], message_id: str) -> int:
        """Store a message (or find its duplicate) and return its sequence."""
        ...

    def subscribe(self, topic: str, group: str, start: Start) -> AbstractAsyncContextManager[Subscription]:
        """Join ``group`` on ``topic`` (create it at ``start`` if new), or an
        ephemeral subscription for an empty ``group``."""
        ...

    async def ack(self, topic: str, group: str, sequences: Sequence[int]) -> None:
        """Acknowledge deliveries of ``group``: they are never delivered again."""
        ...

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...
