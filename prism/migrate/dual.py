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
errors are the call's, and a write goes to the other one (the secondary)
only once the primary took it. The secondary's write carries the same stamp
(time and idempotency token), so both backends decide alike; one it refuses
(or does not answer in ``SECONDARY_TIMEOUT_S``, or the client's call is
cancelled meanwhile) is counted and queued (``prism.migrate.retry``) and
never fails the call. A write whose call is cancelled while the primary has
it (its outcome unknown: it may have committed) is queued for both, so the
two agree either way. While writes wait for a backend, new ones queue behind
them without trying it first, so a backend that is down costs the client
nothing per call. A secondary that cannot be reached at ``open`` is the same
case: writes queue until it answers.

``apply`` moves to a new state in place (the phase, the rate, the shadow
fraction); ``run`` is the background work (delivering queued writes,
comparing shadow reads), started in the worker's nursery and cancelled when
the namespace is let go. ``stats`` is this worker's counters, for ``status``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from prism.backends.keyvalue import (
    ExportPage,
    ItemPage,
    ItemWrite,
    KeyValueBackend,
    MatchKeys,
    MatchRange,
    Migratable,
    Mutation,
    Predicate,
    Put,
    RecordPage,
    Stamp,
    StampedItem,
)
from prism.errors import Unimplemented
from prism.migrate.backfill import backfill
from prism.migrate.retry import PendingWrite, RetryQueue
from prism.migrate.shadow import Shadow, ShadowRead
from prism.migrate.state import MigrationState, Phase, Progress

log = logging.getLogger("prism.migrate")

SECONDARY_TIMEOUT_S: Final = 2.0  # past it, the secondary's write is queued and the client answered
CLOSE_DRAIN_S: Final = 5.0  # how long aclose waits for queued writes to be delivered

_SOURCE_FIRST: Final = frozenset({Phase.DUAL_WRITE, Phase.BACKFILL, Phase.SHADOW_READ})


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _predicate_bytes(predicate: Predicate) -> int:
    if isinstance(predicate, MatchKeys):
        return sum(len(k) for k in predicate.keys)
    if isinstance(predicate, MatchRange):
        return len(predicate.start) + len(predicate.end)
    return 0


def _mutation_bytes(mutations: Sequence[Mutation]) -> int:
    return sum(
        len(m.item.key) + len(m.item.value) if isinstance(m, Put) else _predicate_bytes(m.predicate)
        for m in mutations
    )


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
        self.queues = {
            "source": RetryQueue(f"namespace {namespace!r}: source"),
            "target": RetryQueue(f"namespace {namespace!r}: target"),
        }
        self.shadow = Shadow(namespace, lambda: self.source, lambda: self.target)
        seed = progress or Progress()
        self._failures = {"source": 0, "target": 0}
        self._failures_base = seed.target_failures
        self._closed = False
        self.state = state
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
        if old != state.phase:
            log.info(
                "namespace %s: migration phase %s -> %s (serial %d)",
                self.namespace,
                old,
                state.phase,
                state.serial,
            )

    def _apply_phase(self, state: MigrationState) -> None:
        phase = state.phase
        self._primary: str
        self._secondary: str | None
        if phase in _SOURCE_FIRST:
            self._primary, self._secondary = "source", "target"
        elif phase is Phase.PROMOTED:
            self._primary, self._secondary = "target", "source"
        elif phase is Phase.FINISHED:
            self._primary, self._secondary = "target", None
        else:
            self._primary, self._secondary = "source", None
        if phase is Phase.ABORTED:
            dropped = self.queues["target"].clear()  # the target is let go
            if dropped:
                log.info(
                    "namespace %s: aborted: %d writes queued for the target let go", self.namespace, dropped
                )
        elif phase is Phase.FINISHED:
            self.queues["source"].clear()

    def _backend(self, role: str) -> KeyValueBackend:
        return self.source if role == "source" else self.target

    @property
    def primary(self) -> KeyValueBackend:
        """The backend whose answers the client gets now."""
        return self._backend(self._primary)

    def stats(self) -> Progress:
        """This worker's counters (the backfill's own progress is ``backfill``'s)."""
        failures = self._failures_base + self._failures["source"] + self._failures["target"]
        return Progress(
            target_failures=failures,
            queued=len(self.queues["source"]) + len(self.queues["target"]),
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
        by the retry of the first write queued for it."""
        await self._ensure_open(self._primary)
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
            _Opened(self, "source"),
            _Opened(self, "target"),
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

    async def _write(
        self, id: str, nbytes: int, now_ms: int, apply: Callable[[KeyValueBackend, int], Awaitable[None]]
    ) -> None:
        primary, secondary = self._primary, self._secondary
        await self._ensure_open(primary)
        pending = PendingWrite(id, nbytes, apply)
        try:
            await apply(self._backend(primary), now_ms)
        except trio.Cancelled:
            # The client gave up (deadline, reset) while the primary had the
            # write: it may have committed it or not. Deliver it to both later
            # (the same stamp and token: at most once each), so the backends
            # agree whichever it was.
            for role in (primary, secondary):
                if role is not None:
                    self.queues[role].push(pending)
            raise
        if secondary is None:
            return
        queue = self.queues[secondary]
        if len(queue) or not self._opened[secondary]:
            self._failures[secondary] += 1
            queue.push(pending)
            return
        try:
            with trio.fail_after(SECONDARY_TIMEOUT_S):
                await apply(self._backend(secondary), now_ms)
        except trio.Cancelled:
            self._failures[secondary] += 1
            queue.push(pending)
            raise
        except Exception as exc:
            self._failures[secondary] += 1
            if queue.push(pending) and len(queue) == 1:
                log.warning(
                    "namespace %s: the migration %s refused a write (%s): queued for retry",
                    self.namespace,
                    secondary,
                    exc,
                )

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        async def apply(backend: KeyValueBackend, now: int) -> None:
            await backend.put_items(id, items, stamp, now)

        await self._write(id, sum(len(i.key) + len(i.value) for i in items), now_ms, apply)

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        async def apply(backend: KeyValueBackend, now: int) -> None:
            await backend.delete_items(id, predicate, stamp, now)

        await self._write(id, _predicate_bytes(predicate), now_ms, apply)

    async def mutate_items(self, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int) -> None:
        async def apply(backend: KeyValueBackend, now: int) -> None:
            await backend.mutate_items(id, mutations, stamp, now)

        await self._write(id, _mutation_bytes(mutations), now_ms, apply)

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
        page = await self._backend(primary).get_items(
            id,
            predicate,
            reverse=reverse,
            after=after,
            limit_items=limit_items,
            limit_bytes=limit_bytes,
            now_ms=now_ms,
        )
        state = self.state
        if state.phase is Phase.SHADOW_READ and self._rng.random() < state.shadow_fraction:
            self.shadow.submit(
                ShadowRead(id, predicate, reverse, after, limit_items, limit_bytes, now_ms, page)
            )
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


class _Opened:
    """One backend of a migration as ``Migratable``, opened before each use."""

    def __init__(self, mkv: MigratingKeyValue, role: str) -> None:
        self._mkv = mkv
        self._role = role

    def _backend(self) -> Migratable:
        backend = self._mkv._backend(self._role)
        if not isinstance(backend, Migratable):
            raise Unimplemented(f"the migration {self._role}'s backend cannot export or import records")
        return backend

    async def export_records(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> ExportPage:
        await self._mkv._ensure_open(self._role)
        return await self._backend().export_records(
            after=after, limit_items=limit_items, limit_bytes=limit_bytes, now_ms=now_ms
        )

    async def import_records(self, records: Sequence[tuple[str, Sequence[StampedItem]]], now_ms: int) -> None:
        await self._mkv._ensure_open(self._role)
        await self._backend().import_records(records, now_ms)

    async def count_records(self, now_ms: int) -> int:
        await self._mkv._ensure_open(self._role)
        return await self._backend().count_records(now_ms)
