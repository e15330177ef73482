"""How many connections each worker of a tenant holds, in shared memory, so
that a burst of connections is spread over the tenant's workers.

Every worker accepts on the one listening socket the supervisor bound. A
connection arriving wakes every worker waiting on it (trio's epoll waits are
not exclusive) and the first to run takes it. Without more, that was nearly
always the same one: 8 connections opened at once to a 2-worker tenant went
all 8 to one worker in 9 tries out of 20, and 6 or more in 18 of 20 (an idle
worker wakes in microseconds; one whose CPU also runs the client, or that is
busy, wakes late and finds the queue empty). A worker that waited a little
after each accept (the earlier ``accept_backoff_s``) counted only connections
past their preface (none, in a burst) and took 4 per wake-up: no help.

So each worker publishes the connections it holds (accepted here, not yet
closed: ``ServerSettings.accepted``) in this table, and takes a waiting
connection only while it holds no more than the fewest any sibling of its
tenant accepting now holds (plus an eighth of that, so that a storm of a thousand goes
in batches, not one at a time; see ``AcceptShare.may_take``). A worker ahead
of its siblings leaves the connection to them for up to ``LEAVE_S``; a sibling
that is busy or stalled longer does not hold connections back: the worker
takes the connection then, and, siblings late k times in a row, up to
2**k - 1 more queued behind it (a stalled sibling costs a storm of a
thousand ten ``LEAVE_S``, not one per connection; a sibling merely slow to
wake, under load, loses its turn for a connection or two, not the burst).
N connections opened at once to W workers end with no worker holding more
than ceil(N/W) + 1 of them, whichever wakes first, unless a sibling runs
more than ``LEAVE_S`` late. A sibling starved of CPU for many ``LEAVE_S``
(its CPU taken by other processes) loses its share of a storm to the
workers that run: latency first; the counts only even out as connections
close and new ones come.

Why not the alternatives:

- SO_REUSEPORT, one listening socket per worker: the kernel hashes each
  connection to a socket, so 8 connections over 2 workers still put 6 or more
  on one in 29% of bursts (binomial), and the connections queued on a worker
  that dies are reset (``net.ipv4.tcp_migrate_req`` is off by default), where
  one shared queue loses none.
- EPOLLEXCLUSIVE: the kernel then wakes one waiter, mostly the same one; the
  spread would still be the wake order's (and trio's epoll does not offer it).
- Handing surplus connections to a sibling (``prism.router.handoff``): a
  sendmsg per connection, and the worker to hand to is chosen by these same
  counts; leaving the connection in the queue costs nothing.

The table: a memfd the supervisor creates (``WorkerSpec.accepts_fd``),
``CELLS`` cells of 8 bytes. Worker ID writes cell ``ID % CELLS`` alone, as
``(ID + 1) << 32 | held`` (0: no worker), one aligned 8-byte store (a
memoryview item: one machine store on x86-64 and arm64), so a reader sees the
old value or the new one; were a value ever misread, one connection would be
misjudged (left to a sibling for up to ``LEAVE_S``, or taken early), nothing
more. A worker claims its cell when it starts accepting and clears it when it stops
(draining, stopping); the supervisor clears the cell of a worker it reaps (a
crash). A sibling is any worker of the tenant the routing table lists, so a
worker booting with its siblings knows them before they serve; one whose cell
is clear, or holds another ID (a slot that reused the cell), is not waited for.
"""

from __future__ import annotations

import mmap
from typing import Final

CELLS: Final = 1024
TABLE_BYTES: Final = CELLS * 8
# How long a worker ahead of its siblings leaves a waiting connection to
# them before it takes it itself (a sibling busy or stalled), and how often
# it looks again meanwhile (trio's sleeps are whole milliseconds on epoll).
# 5 ms was too short on a loaded machine (load average 7 on 2 CPUs: a woken
# sibling often ran 15 ms later, and one worker took 6 to 8 of 8
# connections in 4 tries of 6); 20 ms spread them in 6 of 6.
LEAVE_S: Final = 0.02
LOOK_AGAIN_S: Final = 0.001
_COUNT_MASK: Final = 0xFFFF_FFFF


class AcceptShare:
    """One worker's view of its tenant's counts: its own cell, its siblings' ids."""

    def __init__(self, buffer: mmap.mmap | bytearray, worker_id: int) -> None:
        if len(buffer) < TABLE_BYTES:
            raise ValueError(f"accept table: {len(buffer)} bytes, {TABLE_BYTES} needed")
        self._cells = memoryview(buffer).cast("Q")
        self._id = worker_id
        self._siblings: tuple[int, ...] = ()
        self._joined = False

    @property
    def siblings(self) -> tuple[int, ...]:
        """The ids of the other workers of this tenant (empty: accept alone)."""
        return self._siblings

    @siblings.setter
    def siblings(self, ids: tuple[int, ...]) -> None:
        self._siblings = tuple(i for i in ids if i != self._id)

    def join(self, held: int) -> None:
        """This worker accepts from now on, holding ``held`` connections."""
        self._joined = True
        self.publish(held)

    def publish(self, held: int) -> None:
        """Say this worker holds ``held`` connections (only between ``join`` and ``leave``)."""
        if self._joined:
            self._cells[self._id % CELLS] = (self._id + 1) << 32 | (held & _COUNT_MASK)

    def leave(self) -> None:
        """This worker accepts no more (draining, stopping): siblings stop waiting for it,
        and the connections it still holds publish nothing as they close."""
        self._joined = False
        forget(self._cells, self._id)

    def held_by(self, worker_id: int) -> int | None:
        """What ``worker_id`` last published; None if its cell holds another worker's (or none)."""
        value = self._cells[worker_id % CELLS]
        if value >> 32 != worker_id + 1:
            return None
        return value & _COUNT_MASK

    def may_take(self, held: int) -> bool:
        """Whether a worker holding ``held`` connections takes the next one now.

        True while it holds no more than the fewest a sibling holds, plus an
        eighth of that: with a few connections the workers take turns; in a
        storm of a thousand each takes dozens per turn, so the turns cost no
        waiting (a worker's scheduler pass is long then, and each turn is one).
        """
        least = -1
        for sibling in self._siblings:
            count = self.held_by(sibling)
            if count is not None and (least < 0 or count < least):
                least = count
        return least < 0 or held <= least + least // 8


def forget(table: memoryview | mmap.mmap | bytearray, worker_id: int) -> None:
    """Clear ``worker_id``'s cell, if it still holds it: it left, or (the
    supervisor, reaping it) it died; no sibling waits for it any more."""
    if isinstance(table, memoryview):
        _clear(table, worker_id)
        return
    with memoryview(table) as raw, raw.cast("Q") as cells:
        _clear(cells, worker_id)


def _clear(cells: memoryview, worker_id: int) -> None:
    cell = worker_id % CELLS
    if cells[cell] >> 32 == worker_id + 1:
        cells[cell] = 0
