"""Concurrent calls of one kind become one batched call.

A backend whose round trip (or thread hop, or fsync) costs far more than the
work per call lets concurrent calls share it: PostgreSQL answers concurrent
whole-record reads with one statement and concurrent PutItems without a
token with one upsert; Redis pipelines concurrent reads and writes on one
connection (each still its own script run); SQLite runs concurrent reads in
one thread hop and concurrent writes in one transaction. ``bench/backends.py``
measures what that saves per call (``bench/results/backends.json``).

``Coalescer.get(key)`` joins the batch that is collecting, if any, or starts
one and leads it: the leader waits for one of ``slots`` batch slots
(followers keep joining meanwhile), closes the batch and runs ``fetch`` once
for every key in it. Under light load a call goes out alone and at once (the
slot is free); under load, calls pile up behind the batches in flight, so
batches grow with load and the round trips per call fall.

Keys are not deduplicated: each caller gets the answer computed for its own
position, so the work per call (rows decoded, writes applied) is what it
would be alone.

A batch whose leader waits longer than ``wait_timeout_s`` for a slot fails
every caller in it with ``timeout_error()`` (for PostgreSQL and Redis: the
pool's RESOURCE_EXHAUSTED), so calls behind stuck batches fail fast instead
of queueing without bound.

Cancellation: a follower that is cancelled just stops waiting. A leader that
is cancelled before its batch has an answer abandons it; every follower of
an abandoned batch tries again (one of them leads the next batch), so one
caller's deadline never fails another caller's call. An error from ``fetch``
(``Exception``) fails every caller of that batch with a copy of it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

from prism.limits import shed
from prism.tracing.context import child

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_SLOTS = 2
DEFAULT_MAX_BATCH = 128


class _Batch(Generic[K, V]):
    __slots__ = ("done", "error", "keys", "result")

    def __init__(self, key: K) -> None:
        self.keys: list[K] = [key]
        self.done = trio.Event()
        self.result: Sequence[V] | None = None
        self.error: Exception | None = None


class Coalescer(Generic[K, V]):
    """``fetch(keys)`` returns one value per key, in the same order."""

    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[Sequence[V]]],
        *,
        slots: int = DEFAULT_SLOTS,
        max_batch: int = DEFAULT_MAX_BATCH,
        wait_timeout_s: float = math.inf,
        timeout_error: Callable[[], Exception] = lambda: TimeoutError("no batch slot came free"),
    ) -> None:
        self._fetch = fetch
        self._wait_timeout_s = wait_timeout_s
        self._timeout_error = timeout_error
        self._slots = trio.Semaphore(slots)
        self._max_batch = max_batch
        self._open: _Batch[K, V] | None = None
        self.batches = 0  # fetches run (for tests and benchmarks)
        self.calls = 0  # keys answered by them

    async def get(self, key: K) -> V:
        while True:
            batch = self._open
            if batch is not None and len(batch.keys) < self._max_batch:
                position = len(batch.keys)
                batch.keys.append(key)
                with child("prism.coalesce.wait", **{"prism.batch_position": position}):
                    await batch.done.wait()
            else:
                position = 0
                batch = self._open = _Batch(key)
                await self._lead(batch)
            if batch.result is not None:
                return batch.result[position]
            if batch.error is not None:
                raise copy.copy(batch.error).with_traceback(None)
            # Abandoned by a cancelled leader: go again.

    async def _lead(self, batch: _Batch[K, V]) -> None:
        try:
            got_slot = False
            began = trio.current_time()
            with child("prism.coalesce.slot_wait"), trio.move_on_after(self._wait_timeout_s):
                await self._slots.acquire()
                got_slot = True
            shed.observe(trio.current_time() - began)  # a batch's wait for a slot is queueing
            if self._open is batch:
                self._open = None  # closed: later callers start the next batch
            if not got_slot:
                batch.error = self._timeout_error()
                raise batch.error
            try:
                batch.result = await self._fetch(batch.keys)
            except Exception as exc:
                batch.error = exc
                raise
            finally:
                self._slots.release()
            self.batches += 1
            self.calls += len(batch.keys)
        finally:
            if self._open is batch:
                self._open = None
            batch.done.set()
