"""The writes one backend of a migration refused, kept until it takes them.

During a migration every write goes to two backends; the one whose answer
the client gets (the primary) must take it, the other (the secondary: the
target before ``promote``, the source after) must not fail the client's
call. A write the secondary refuses, or that finds writes already waiting
for it, waits here and is delivered in order by ``drain`` once the backend
answers again (``retry_delay``'s exponential backoff with jitter between
attempts). Delivering late, or twice, is harmless: the write carries the
stamp and the idempotency token the client's call had, so the backend's stamp
rule and token check decide as they would have at once.

The queue is bounded (``MAX_WRITES`` writes and ``MAX_BYTES`` of keys and
values): past either, a write is dropped and counted, and the migration
cannot be promoted (the target would miss it): the copy has to start again.
A write the backend refuses for what it is, not for being down (an
``InvalidArgument``, say), would be refused forever: it is dropped and
counted too, after one line in the log.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from prism.errors import DeadlineExceeded, Internal, PrismError, ResourceExhausted, Unavailable
from prism.workers.reopen import retry_delay

log = logging.getLogger("prism.migrate")

MAX_WRITES: Final = 100_000
MAX_BYTES: Final = 64 << 20
ATTEMPT_TIMEOUT_S: Final = 5.0  # one delivery; a backend that hangs is retried like one that refuses
# Errors that say the backend could not take a write now (down, busy, slow, a
# fault of its own): worth trying again. Any other PrismError is about the write.
RETRYABLE: Final = (Unavailable, ResourceExhausted, DeadlineExceeded, Internal)

# A write as a call on a backend at a time: (backend, now_ms) -> done.
Apply = Callable[[Any, int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PendingWrite:
    id: str
    nbytes: int  # keys and values it holds: what the queue's byte budget counts
    apply: Apply


def is_retryable(exc: BaseException) -> bool:
    """Whether a write that failed with ``exc`` may succeed later."""
    if isinstance(exc, PrismError):
        return isinstance(exc, RETRYABLE)
    return isinstance(exc, Exception)  # a driver's or the network's: the backend's state, not the write's


class RetryQueue:
    """Writes waiting for one backend, oldest first."""

    def __init__(self, what: str, *, max_writes: int = MAX_WRITES, max_bytes: int = MAX_BYTES) -> None:
        self.what = what  # "namespace 'x': target", for the log
        self.max_writes = max_writes
        self.max_bytes = max_bytes
        self._writes: deque[PendingWrite] = deque()
        self._bytes = 0
        self.dropped = 0  # let go: the queue was full, or the backend refused the write itself
        self.delivered = 0
        self._changed = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._writes)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def push(self, write: PendingWrite) -> bool:
        """Queue ``write``; False (and counted as dropped) when the queue is full."""
        if len(self._writes) >= self.max_writes or self._bytes + write.nbytes > self.max_bytes:
            if not self.dropped:
                log.error(
                    "%s: retry queue full (%d writes, %d bytes): writes are dropped; "
                    "the migration must be aborted and started again",
                    self.what,
                    len(self._writes),
                    self._bytes,
                )
            self.dropped += 1
            return False
        self._writes.append(write)
        self._bytes += write.nbytes
        self._changed.unpark_all()
        return True

    def clear(self) -> int:
        """Let every queued write go (its backend is let go); how many there were."""
        n = len(self._writes)
        self._writes.clear()
        self._bytes = 0
        return n

    async def drain(
        self,
        backend: Callable[[], Any],
        ready: Callable[[], Awaitable[None]],
        now_ms: Callable[[], int],
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """Deliver queued writes to ``backend()``, oldest first, for good (until
        cancelled). ``ready()`` runs before each attempt (it opens the backend if
        it is not open yet); a failed attempt is tried again after a backoff."""
        failures = 0
        while True:
            while not self._writes:
                await self._changed.park()
            write = self._writes[0]
            try:
                with trio.fail_after(ATTEMPT_TIMEOUT_S):
                    await ready()
                    await write.apply(backend(), now_ms())
            except Exception as exc:  # trio.TooSlowError too: a backend that hangs
                if is_retryable(exc):
                    failures += 1
                    if failures == 1:
                        log.warning("%s: %d writes wait for it: %s", self.what, len(self._writes), exc)
                    await trio.sleep(retry_delay(failures, rand))
                    continue
                log.error("%s: a write of id %r was refused, dropped: %s", self.what, write.id, exc)
                self.dropped += 1
            else:
                if failures:
                    log.warning(
                        "%s: answers again; delivering %d queued writes", self.what, len(self._writes)
                    )
                failures = 0
                self.delivered += 1
            if self._writes and self._writes[0] is write:  # not cleared meanwhile
                self._writes.popleft()
                self._bytes -= write.nbytes
                self._changed.unpark_all()

    async def wait_empty(self) -> None:
        """Return once nothing is queued."""
        while self._writes:
            await self._changed.park()
