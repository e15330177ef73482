"""The writes one backend of a migration has not taken yet, delivered in the background.

During a migration every write goes to two backends; the one whose answer
the client gets (the primary) must take it before the client is answered,
the other (the secondary: the target before ``promote``, the source after)
gets it from here, after the answer, so its latency is not the client's.
``drain`` delivers the queue over ``LANES`` tasks: a write goes to the lane
its record id hashes to, so the writes of one record reach the backend one
at a time, in the order the primary acknowledged them; different records go
in parallel (at most ``LANES`` deliveries in flight to the backend). To a
backend that takes several puts in one go (``BatchWritable``: PostgreSQL
applies them in one statement, one round trip, where one by one costs the
worker and the server several times the CPU), a lane that finds several
writes queued delivers the puts at its head together (``take_batch``: up
to ``BATCH_WRITES``, stopping before a write that is not a put or is of a
record already in the batch, so a record's writes still go one at a time,
in order), each with its own stamp and token. So that a steady trickle of
writes (one client, say) makes batches too, such a lane, woken by a write,
waits ``LINGER_S`` (20 ms) for the writes that follow before it delivers:
the second backend lags that much more, and takes a few puts per round trip
instead of one. A batch the backend refuses
for what it holds is delivered again one write at a time, so only the
write refused is dropped. A lane whose delivery fails waits
(``retry_delay``'s exponential backoff with jitter) and tries it again (a
batch whole), and the writes behind it wait with it. Delivering late, or
twice, is harmless: the write carries the stamp and the idempotency
token the client's call had, so the backend's stamp rule (tombstones
included: a delete delivered before an older put keeps it out) and token
check decide as they would have at once.

Bounds. ``room`` is the backpressure: a client's write waits (at most the
caller's timeout) while ``PIPELINE_WRITES`` writes wait here and the backend
is taking them, so a secondary slower than the primary slows the writers
instead of growing the queue. While the backend fails, writes queue without
waiting, up to ``MAX_WRITES`` writes and ``MAX_BYTES`` of keys and values:
past either, a write is dropped and counted, and the migration cannot be
promoted (the target would miss it): the copy has to start again. A write
the backend refuses for what it is, not for being down (an
``InvalidArgument``, say), would be refused forever: it is dropped and
counted too, after one line in the log.

With a ``Journal`` (``prism.migrate.journal``) every write is appended to it
before ``push`` returns, and the file is emptied whenever the queue is: a
restart delivers what the file holds.
"""

from __future__ import annotations

import itertools
import logging
import random
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import trio

from prism.backends.keyvalue import BatchWritable
from prism.errors import DeadlineExceeded, Internal, PrismError, ResourceExhausted, Unavailable
from prism.migrate.journal import Journal, QueuedWrite
from prism.workers.reopen import retry_delay

log = logging.getLogger("prism.migrate")

MAX_WRITES: Final = 100_000
MAX_BYTES: Final = 64 << 20
LANES: Final = 4  # writes in flight to one backend at most (a pool's default is 8 connections)
BATCH_WRITES: Final = 64  # puts a lane delivers in one call at most (a BatchWritable backend)
LINGER_S: Final = 0.02  # a lane to a BatchWritable backend waits this long for more writes to batch
PIPELINE_WRITES: Final = 1024  # past this many queued (backend answering), writers wait for room
ATTEMPT_TIMEOUT_S: Final = 5.0  # one delivery; a backend that hangs is retried like one that refuses
# Errors that say the backend could not take a write now (down, busy, slow, a
# fault of its own): worth trying again. Any other PrismError is about the write.
RETRYABLE: Final = (Unavailable, ResourceExhausted, DeadlineExceeded, Internal)


@dataclass(frozen=True, slots=True)
class PendingWrite:
    id: str
    nbytes: int  # keys and values it holds: what the queue's byte budget counts
    write: QueuedWrite

    async def apply(self, backend: Any, now_ms: int) -> None:
        await self.write.apply(backend, now_ms)


def take_batch(lane: deque[PendingWrite], limit: int) -> list[PendingWrite]:
    """The writes at the head of ``lane`` that go to the backend together: the
    puts before the first write that is not a put or is of a record already in
    the batch (a record's next write waits for the one before it), at most
    ``limit``; at least the head itself."""
    batch = [lane[0]]
    if limit > 1 and batch[0].write.kind == "put":
        ids = {batch[0].id}
        for write in itertools.islice(lane, 1, limit):
            if write.write.kind != "put" or write.id in ids:
                break
            ids.add(write.id)
            batch.append(write)
    return batch


async def deliver(backend: Any, batch: Sequence[PendingWrite], now_ms: int) -> None:
    """``batch`` (from ``take_batch``) to ``backend``: one write as it was
    made, several puts in one ``put_batch`` (``BatchWritable``)."""
    if len(batch) == 1:
        await batch[0].apply(backend, now_ms)
    else:
        await backend.put_batch([(p.id, p.write.items, p.write.stamp) for p in batch], now_ms)


def is_retryable(exc: BaseException) -> bool:
    """Whether a write that failed with ``exc`` may succeed later."""
    if isinstance(exc, PrismError):
        return isinstance(exc, RETRYABLE)
    return isinstance(exc, Exception)  # a driver's or the network's: the backend's state, not the write's


class RetryQueue:
    """Writes waiting for one backend, in ``LANES`` lanes by record id, oldest first in each."""

    def __init__(
        self,
        what: str,
        *,
        max_writes: int = MAX_WRITES,
        max_bytes: int = MAX_BYTES,
        lanes: int = LANES,
        pipeline: int = PIPELINE_WRITES,
        batch: int = BATCH_WRITES,
        linger: float = LINGER_S,
        journal: Journal | None = None,
    ) -> None:
        self.what = what  # "namespace 'x': target", for the log
        self.max_writes = max_writes
        self.max_bytes = max_bytes
        self.pipeline = pipeline
        self.batch = batch
        self.linger = linger
        self.journal = journal
        self._lanes: list[deque[PendingWrite]] = [deque() for _ in range(lanes)]
        self._count = 0
        self._bytes = 0
        self.dropped = 0  # let go: the queue was full, or the backend refused the write itself
        self.delivered = 0
        self.failed = 0  # writes that waited for the backend failing (each counted once)
        self._counted: set[int] = set()  # id() of the queued writes ``failed`` counts
        self._records: dict[str, int] = {}  # record id -> writes of it queued
        self._coming: dict[str, int] = {}  # record id -> writes of it on their way (``coming``)
        self._failing: set[int] = set()  # lanes in backoff
        self._changed = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def failing(self) -> bool:
        """Whether the backend refused (or did not answer) the last write tried."""
        return bool(self._failing)

    def backlog(self) -> int:
        """Writes waiting because the backend fails (0 while it takes them)."""
        return self._count if self._failing else 0

    def writes(self) -> Iterator[QueuedWrite]:
        for lane in self._lanes:
            for pending in lane:
                yield pending.write

    def push(self, write: PendingWrite) -> bool:
        """Queue ``write`` (in the journal first); False (and counted as dropped) when full."""
        if self._count >= self.max_writes or self._bytes + write.nbytes > self.max_bytes:
            if not self.dropped:
                log.error(
                    "%s: retry queue full (%d writes, %d bytes): writes are dropped; "
                    "the migration must be aborted and started again",
                    self.what,
                    self._count,
                    self._bytes,
                )
            self.dropped += 1
            return False
        if self.journal is not None:
            try:
                self.journal.append(write.write)
            except OSError as exc:
                log.error("%s: cannot append to %s: %s", self.what, self.journal.path, exc)
        if self._failing:
            self.failed += 1
            self._counted.add(id(write))
        self._lanes[zlib.crc32(write.id.encode()) % len(self._lanes)].append(write)
        self._records[write.id] = self._records.get(write.id, 0) + 1
        self._count += 1
        self._bytes += write.nbytes
        self._changed.unpark_all()
        return True

    def clear(self) -> int:
        """Let every queued write go (its backend is let go); how many there were."""
        n = self._count
        for lane in self._lanes:
            lane.clear()
        self._count = self._bytes = 0
        self._counted.clear()
        self._records.clear()
        self._emptied()
        self._changed.unpark_all()
        return n

    def _emptied(self) -> None:
        if self.journal is not None:
            try:
                self.journal.clear()
            except OSError as exc:
                log.error("%s: cannot empty %s: %s", self.what, self.journal.path, exc)

    async def room(self) -> None:
        """Return once the queue has room for a writer: at once while the backend fails
        (writes queue up to the bound then), else once fewer than ``pipeline`` wait."""
        while self._count >= self.pipeline and not self._failing:
            await self._changed.park()

    async def drain(
        self,
        backend: Callable[[], Any],
        ready: Callable[[], Awaitable[None]],
        now_ms: Callable[[], int],
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """Deliver queued writes to ``backend()``, for good (until cancelled), one
        task per lane. ``ready()`` runs before each attempt (it opens the backend
        if it is not open yet); a failed attempt is tried again after a backoff."""
        async with trio.open_nursery() as nursery:
            for i in range(len(self._lanes)):
                nursery.start_soon(self._lane, i, backend, ready, now_ms, rand)

    async def _lane(
        self,
        i: int,
        backend: Callable[[], Any],
        ready: Callable[[], Awaitable[None]],
        now_ms: Callable[[], int],
        rand: Callable[[], float],
    ) -> None:
        lane = self._lanes[i]
        failures = 0
        alone = 0  # after a batch refused for one of its writes: these many go one at a time
        while True:
            while not lane:
                await self._changed.park()
            batching = not alone and isinstance(backend(), BatchWritable)
            if batching and self.linger and len(lane) < self.batch:
                await trio.sleep(self.linger)  # the writes of the next moment go in the same batch
                if not lane:  # cleared meanwhile (the backend let go)
                    continue
            limit = self.batch if batching else 1
            batch = take_batch(lane, limit)
            try:
                with trio.fail_after(ATTEMPT_TIMEOUT_S):
                    await ready()
                    await deliver(backend(), batch, now_ms())
            except Exception as exc:  # trio.TooSlowError too: a backend that hangs
                if is_retryable(exc):
                    failures += 1
                    if failures == 1:
                        self._count_waiting()
                        if not self._failing:
                            log.warning("%s: %d writes wait for it: %s", self.what, self._count, exc)
                    self._failing.add(i)
                    self._changed.unpark_all()  # writers waiting for room: queue without waiting
                    await trio.sleep(retry_delay(failures, rand))
                    continue
                if len(batch) > 1:  # which write is refused? Each alone finds it
                    alone = len(batch)
                    continue
                log.error("%s: a write of id %r was refused, dropped: %s", self.what, batch[0].id, exc)
                self.dropped += 1
            else:
                self.delivered += len(batch)
            alone = max(0, alone - 1)
            if failures:
                self._failing.discard(i)
                if not self._failing:
                    log.warning("%s: answers again; delivering %d queued writes", self.what, self._count)
            failures = 0
            self._done(lane, batch)

    def _done(self, lane: deque[PendingWrite], batch: list[PendingWrite]) -> None:
        """``batch``, at the head of ``lane``, has gone (delivered or dropped)."""
        for write in batch:
            if not lane or lane[0] is not write:  # cleared meanwhile
                return
            lane.popleft()
            self._counted.discard(id(write))
            left = self._records.pop(write.id, 1) - 1
            if left:
                self._records[write.id] = left
            self._count -= 1
            self._bytes -= write.nbytes
        if not self._count:
            self._emptied()
        elif self.journal is not None:
            self._compact()
        self._changed.unpark_all()

    def _count_waiting(self) -> None:
        """The backend failed: every write waiting for it counts as a failure, once."""
        for lane in self._lanes:
            for pending in lane:
                if id(pending) not in self._counted:
                    self._counted.add(id(pending))
                    self.failed += 1

    def _compact(self) -> None:
        assert self.journal is not None
        try:
            self.journal.compact(self.writes(), self._bytes)
        except OSError as exc:
            log.error("%s: cannot rewrite %s: %s", self.what, self.journal.path, exc)

    def coming(self, id: str) -> None:
        """A client's write of record ``id`` is on its way here: the primary takes
        it first, then the writer may wait for room (``room``) before it is
        queued, or it is never queued (the primary refused it): ``arrived``
        says when that is over. Meanwhile the primary may have it and this
        backend not, and ``wait_record`` waits for it too: a shadow read that
        confirmed a difference without it counted one that was none (the
        source read after the write, the target before it, the write not
        queued yet: seen under load in CI)."""
        self._coming[id] = self._coming.get(id, 0) + 1

    def arrived(self, id: str) -> None:
        """The write ``coming`` announced is queued, or will not be."""
        left = self._coming.pop(id, 1) - 1
        if left:
            self._coming[id] = left
        else:  # (a queued one woke the waiters as it was pushed, just before)
            self._changed.unpark_all()

    async def wait_record(self, id: str) -> None:
        """Return once no write of record ``id`` is queued or on its way (``coming``)."""
        while self._records.get(id) or self._coming.get(id):
            await self._changed.park()

    async def wait_empty(self) -> None:
        """Return once nothing is queued."""
        while self._count:
            await self._changed.park()
