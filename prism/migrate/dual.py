"""A KeyValue namespace in migration: one backend to the client, two underneath.

``MigratingKeyValue`` is a ``KeyValueBackend`` over the source and the target
backends of a migration (``prism.migrate.state``), doing what its phase says:

| phase | reads answered by | writes answered by | writes also sent to |
|---|---|---|---|
| dual_write, backfill | source | source | target |
| shadow_read | source (a share also compared with the target) | source | target |
| promoted | target | target | source (so ``abort`` loses nothing) |
| finished | target | target | - |
| aborted | source | source | - |

The backend that answers (the primary) is the client's: its answer and its
errors are the call's. Once it has a write, the client is answered and the
write is queued for the other one (the secondary), delivered in the
background by ``run`` (``prism.migrate.retry``: lanes by record id, retries
with backoff, bounded, backpressure past ``PIPELINE_WRITES``; waiting for
room costs a client at most ``SECONDARY_TIMEOUT_S``). The secondary's write
carries the same stamp (time and idempotency token), so both backends decide
alike, whatever the order it arrives in; it never fails the call. A write
whose call is cancelled while the primary has it (its outcome unknown: it
may have committed) is queued for both, so the two agree either way. A
secondary unreachable at ``open`` is the same case: writes queue until it
answers. With journals (``prism.migrate.journal``) every queued write is on
disk before the client's answer; ``open`` queues what a previous run left.

``apply`` moves to a new state in place; ``switch`` does it, for a phase
that moves the primary or ends the migration, once every write acknowledged
is on the backend that answers next (else ``BarrierError``, nothing changed).
``run`` is the background work (deliveries, shadow reads), in the worker's
nursery. ``stats`` is this worker's counters, for ``status``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import trio

from prism.backends.keyvalue import (
    ItemPage,
    ItemWrite,
    KeyValueBackend,
    Mutation,
    Predicate,
    RecordPage,
    Stamp,
)
from prism.migrate.backfill import OpenedBackend, backfill
from prism.migrate.journal import Journal, QueuedWrite
from prism.migrate.retry import PendingWrite, RetryQueue
from prism.migrate.shadow import Shadow, ShadowRead
from prism.migrate.state import ENDED, MigrationState, Phase, Progress

log = logging.getLogger("prism.migrate")

SECONDARY_TIMEOUT_S: Final = 2.0  # past it, the secondary's write is queued and the client answered
CLOSE_DRAIN_S: Final = 5.0  # how long aclose waits for queued writes to be delivered

_SOURCE_FIRST: Final = frozenset({Phase.DUAL_WRITE, Phase.BACKFILL, Phase.SHADOW_READ})


class BarrierError(Exception):
    """A phase change refused: writes taken are not yet on the backend that would answer."""


def _roles(phase: Phase) -> tuple[str, str | None]:
    """The backend that answers in ``phase``, and the one that also gets its writes."""
    if phase in _SOURCE_FIRST:
        return "source", "target"
    if phase is Phase.PROMOTED:
        return "target", "source"
    if phase is Phase.FINISHED:
        return "target", None
    return "source", None


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class MigratingKeyValue:
    """One namespace's KeyValue calls during a migration, as its phase says."""

    def __init__(
        self,
        namespace: str,
        source: KeyValueBackend,
        target: KeyValueBackend,
        state: MigrationState,
        *,
        progress: Progress | None = None,
        clock: Callable[[], int] = _wall_ms,
        rng: random.Random | None = None,
        journals: Mapping[str, Journal] | None = None,
    ) -> None:
        if state.namespace != namespace:
            raise ValueError(f"namespace {namespace!r}: given the migration state of {state.namespace!r}")
        self.namespace = namespace
        self.source = source
        self.target = target
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._opened: dict[str, bool] = {"source": False, "target": False}
        self._open_lock = {"source": trio.Lock(), "target": trio.Lock()}
        journals = journals or {}
        self.queues = {
            role: RetryQueue(f"namespace {namespace!r}: {role}", journal=journals.get(role))
            for role in ("source", "target")
        }
        self._gate: trio.Event | None = None  # set while a phase change waits for writes taken
        self._inflight = 0  # client writes between the gate and their queueing
        self._idle = trio.lowlevel.ParkingLot()
        self.barrier_failed: tuple[int, str] | None = None  # (serial, why) of the last switch refused
        self.shadow = Shadow(
            namespace,
            lambda: self.source,
            lambda: self.target,
            delivered=lambda id: self.queues["target"].wait_record(id),
            epoch=lambda: self.roles_changed,
        )
        seed = progress or Progress()
        self._failures_base = seed.target_failures
        self._closed = False
        self.state = state
        self._primary: str
        self._secondary: str | None
        self._primary, self._secondary = _roles(state.phase)
        self.roles_changed = 0  # times the backend answering, or the one written second, changed
        self._apply_phase(state)

    # --- the state ---------------------------------------------------------

    def apply(self, state: MigrationState) -> None:
        """Follow a new state of the same migration (phase, rate, shadow fraction)."""
        if (state.namespace, state.source, state.target) != (
            self.state.namespace,
            self.state.source,
            self.state.target,
        ):
            raise ValueError(f"namespace {self.namespace!r}: a state of another migration cannot be applied")
        if state.serial < self.state.serial:
            return  # an older state arriving late
        old = self.state.phase
        self.state = state
        self._apply_phase(state)
        if self.barrier_failed is not None and self.barrier_failed[0] < state.serial:
            self.barrier_failed = None  # a newer state (the supervisor went back): applied
        if old != state.phase:
            log.info(
                "namespace %s: migration phase %s -> %s (serial %d)",
                self.namespace,
                old,
                state.phase,
                state.serial,
            )

    def needs_barrier(self, state: MigrationState) -> bool:
        """Whether applying ``state`` must wait for the writes taken (``switch``): the
        backend that answers changes, or the migration ends."""
        if state.serial <= self.state.serial or state.phase == self.state.phase:
            return False
        return _roles(state.phase)[0] != self._primary or state.phase in ENDED

    async def switch(self, state: MigrationState, timeout_s: float) -> None:
        """``apply(state)``, once every write this worker acknowledged to a client is on
        the backend that answers in the new phase: new writes wait meanwhile (at most
        ``timeout_s``), the writes under way finish and that backend's queue is
        delivered. Past ``timeout_s``: BarrierError saying how many writes are not
        there yet, and the old phase stays."""
        if not self.needs_barrier(state):
            self.apply(state)
            return
        role = _roles(state.phase)[0]
        gate = self._gate = trio.Event()
        try:
            with trio.move_on_after(timeout_s):
                while self._inflight:
                    await self._idle.park()
                await self.queues[role].wait_empty()
                self.apply(state)
                self.barrier_failed = None
                return
            pending = len(self.queues[role]) + self._inflight
            why = (
                f"{pending} writes acknowledged to clients were not on the {role} "
                f"({state.source.backend if role == 'source' else state.target.backend}) after {timeout_s:g}s"
            )
            self.barrier_failed = (state.serial, why)
            raise BarrierError(why)
        finally:
            self._gate = None
            gate.set()

    def _apply_phase(self, state: MigrationState) -> None:
        phase = state.phase
        roles = _roles(phase)
        if roles != (self._primary, self._secondary):
            self.roles_changed += 1
        self._primary, self._secondary = roles
        if phase is Phase.ABORTED:
            dropped = self.queues["target"].clear()  # the target is let go
            if dropped:
                log.info(
                    "namespace %s: aborted: %d writes queued for the target let go", self.namespace, dropped
                )
        elif phase is Phase.FINISHED:
            self.queues["source"].clear()

    def _replay(self) -> None:
        for role, queue in self.queues.items():
            journal = queue.journal
            if journal is None:
                continue
            try:
                writes = journal.load()
            except OSError as exc:
                log.error("namespace %s: cannot read %s: %s", self.namespace, journal.path, exc)
                continue
            if role not in (self._primary, self._secondary):
                journal.clear()  # a backend let go
                continue
            queue.journal = None  # they are in the file already
            for write in writes:
                queue.push(PendingWrite(write.id, write.nbytes, write))
            queue.journal = journal
            if writes:
                log.warning(
                    "namespace %s: %d writes a previous run queued for the migration %s: delivering them",
                    self.namespace,
                    len(writes),
                    role,
                )

    def _backend(self, role: str) -> KeyValueBackend:
        return self.source if role == "source" else self.target

    @property
    def primary(self) -> KeyValueBackend:
        """The backend whose answers the client gets now."""
        return self._backend(self._primary)

    def stats(self) -> Progress:
        """This worker's counters (the backfill's own progress is ``backfill``'s)."""
        failures = self._failures_base + self.queues["source"].failed + self.queues["target"].failed
        barrier_serial, barrier = self.barrier_failed or (0, "")
        return Progress(
            target_failures=failures,
            queued=self.queues["source"].backlog() + self.queues["target"].backlog(),
            pending=len(self.queues["source"]) + len(self.queues["target"]),
            barrier_serial=barrier_serial,
            barrier=barrier,
            dropped=self.queues["source"].dropped + self.queues["target"].dropped,
            shadow_reads=self.shadow.reads,
            mismatches=dict(self.shadow.mismatches),
            mismatched_reads=self.shadow.mismatched_reads,
            updated_ms=self._clock(),
        )

    # --- open, close, background -------------------------------------------

    async def _ensure_open(self, role: str) -> None:
        if self._opened[role]:
            return
        async with self._open_lock[role]:
            if not self._opened[role]:
                await self._backend(role).open()
                self._opened[role] = True

    async def open(self) -> None:
        """Open the primary (its failure is the namespace's, as without a
        migration) and try the secondary: one that does not open now is opened
        by the retry of the first write queued for it. Writes a previous run
        of this worker queued and did not deliver (its journals) are queued again."""
        await self._ensure_open(self._primary)
        self._replay()
        other = self._secondary
        if other is None:
            return
        try:
            await self._ensure_open(other)
        except Exception as exc:
            log.warning(
                "namespace %s: migration %s did not open (%s): writes for it are queued until it does",
                self.namespace,
                other,
                exc,
            )

    async def aclose(self) -> None:
        """Close both backends, once the queued writes are delivered (trying for
        at most ``CLOSE_DRAIN_S``); what is still queued then is lost to its
        backend, and said in the log."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if any(len(q) for q in self.queues.values()):
                with trio.move_on_after(CLOSE_DRAIN_S):
                    async with trio.open_nursery() as nursery:
                        for role in ("source", "target"):
                            nursery.start_soon(self._drain, role)
                        await self.settled()
                        nursery.cancel_scope.cancel()
            for role, queue in self.queues.items():
                if len(queue):
                    log.error(
                        "namespace %s: closed with %d writes never delivered to the migration %s: "
                        "it misses them (shadow reads show it); abort the migration and start it again",
                        self.namespace,
                        len(queue),
                        role,
                    )
            for role in ("source", "target"):  # opened or not: one half-opened may hold a connection
                journal = self.queues[role].journal
                if journal is not None:  # what is left stays on disk for the next open
                    journal.close()
                try:
                    await self._backend(role).aclose()
                except Exception as exc:
                    log.warning("namespace %s: error closing the migration %s: %s", self.namespace, role, exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver queued writes to each backend and compare shadow reads, until cancelled."""
        async with trio.open_nursery() as nursery:
            for role in ("source", "target"):
                nursery.start_soon(self._drain, role)
            await nursery.start(self.shadow.run)
            task_status.started()

    async def _drain(self, role: str) -> None:
        await self.queues[role].drain(
            lambda: self._backend(role), lambda: self._ensure_open(role), self._clock, rand=self._rng.random
        )

    async def backfill(self, progress: Progress, save: Callable[[Progress], None]) -> Progress:
        """Copy the source's records to the target (``prism.migrate.backfill``)
        at the rate of the state applied last, from ``progress.cursor``,
        opening either backend first if it is not open yet (a target that did
        not open is waited for, as a failed page is)."""
        return await backfill(
            OpenedBackend(self, "source"),
            OpenedBackend(self, "target"),
            namespace=self.namespace,
            progress=progress,
            rate=lambda: self.state.rate,
            save=save,
            clock=self._clock,
            rand=self._rng.random,
        )

    async def settled(self) -> None:
        """Return once no write waits for either backend."""
        for queue in self.queues.values():
            await queue.wait_empty()

    # --- writes ------------------------------------------------------------
    async def _write(self, write: QueuedWrite, now_ms: int) -> None:
        while self._gate is not None:  # a phase change waits for the writes already taken
            await self._gate.wait()
        self._inflight += 1
        secondary = self._secondary  # (a phase change waits for the writes in flight)
        if secondary is not None:  # (a shadow read's confirmation waits for it: RetryQueue.coming)
            self.queues[secondary].coming(write.id)
        try:
            await self._write_now(write, now_ms)
        finally:
            if secondary is not None:
                self.queues[secondary].arrived(write.id)
            self._inflight -= 1
            if not self._inflight:
                self._idle.unpark_all()

    async def _write_now(self, write: QueuedWrite, now_ms: int) -> None:
        primary, secondary = self._primary, self._secondary
        await self._ensure_open(primary)
        pending = PendingWrite(write.id, write.nbytes, write)
        try:
            await write.apply(self._backend(primary), now_ms)
        except trio.Cancelled:
            # The client gave up while the primary had the write (committed or
            # not): both get it later, same stamp and token, so they agree.
            for role in (primary, secondary):
                if role is not None:
                    self.queues[role].push(pending)
            raise
        if secondary is None:
            return
        # The secondary gets it in the background; the client waits for room, SECONDARY_TIMEOUT_S at most.
        queue = self.queues[secondary]
        try:
            with trio.move_on_after(SECONDARY_TIMEOUT_S):
                await queue.room()
        finally:  # cancelled meanwhile too: the primary has it, so must the secondary
            queue.push(pending)

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        await self._write(QueuedWrite("put", id, stamp, items=tuple(items)), now_ms)

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        await self._write(QueuedWrite("delete", id, stamp, predicate=predicate), now_ms)

    async def mutate_items(self, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int) -> None:
        await self._write(QueuedWrite("mutate", id, stamp, mutations=tuple(mutations)), now_ms)

    # --- reads -------------------------------------------------------------

    async def get_items(
        self,
        id: str,
        predicate: Predicate,
        *,
        reverse: bool,
        after: bytes | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> ItemPage:
        primary = self._primary
        await self._ensure_open(primary)
        read = ShadowRead(id, predicate, reverse, after, limit_items, limit_bytes, now_ms, self.roles_changed)
        page = await read.read(self._backend(primary))
        state = self.state
        if state.phase is Phase.SHADOW_READ and self._rng.random() < state.shadow_fraction:
            self.shadow.submit(read, page)
        return page

    async def scan_items(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> RecordPage:
        primary = self._primary
        await self._ensure_open(primary)
        return await self._backend(primary).scan_items(
            after=after, limit_items=limit_items, limit_bytes=limit_bytes, now_ms=now_ms
        )

    async def ping(self) -> None:
        """The primary's health probe (a backend without one is taken as healthy)."""
        await self._ensure_open(self._primary)
        ping = getattr(self.primary, "ping", None)
        if ping is not None:
            await ping()
