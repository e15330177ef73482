"""A worker's migrating namespaces: it holds them as ``MigratingKeyValue`` and runs their work.

The supervisor writes each migration's state (``prism.migrate.state``) in
the tenant's own table, beside the namespaces. When the routing generation
moves, the worker hands the states here (``want``) before ``App.apply``:

- a namespace with a migration is opened as a ``MigratingKeyValue`` over
  the source and the target the state names (``open``, through the App's
  ``_open``); one whose migration went (aborted or finished: removed) or
  changed endpoints is reopened plainly (``stale``);
- a held ``MigratingKeyValue`` whose state's serial moved gets ``apply()``
  (a new phase, rate or shadow fraction; no reopen), before the worker
  reports the generation in its heartbeat: that report is what the
  supervisor waits for before a command returns. A phase that moves the
  backend answering (or ends the migration) goes through ``switch``
  instead: applied once every write this worker acknowledged is on that
  backend (``MigratingKeyValue.switch``, ``BARRIER_TIMEOUT_S``); if it
  cannot be, the old phase stays, the generation is not reported and the
  counters say why, which the supervisor answers by going back;
- each migration's writes not yet on a backend are journaled under
  ``DATA_DIR/migrations/pending/<namespace>/w<worker id>.<role>``
  (``prism.migrate.journal``), replayed when this worker id opens it again;
- in phase BACKFILL, the first worker of the tenant (the lowest id the
  routing table lists for it) runs ``prism.migrate.backfill.backfill``
  from the saved cursor, so a restart resumes where it stopped; a failure
  (the target down) is retried after a delay, from the cursor;
- every second, each held migration's counters (``MigratingKeyValue.stats``)
  go to the worker's stats file (``prism.migrate.requests``), which the
  admin process merges for ``status`` and ``/metrics``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import msgspec
import trio

from prism.backends import registry
from prism.backends.keyvalue import KeyValueBackend, Migratable
from prism.config import NamespaceConfig
from prism.limits import shed
from prism.migrate.backfill import backfill
from prism.migrate.dual import BarrierError, MigratingKeyValue
from prism.migrate.journal import Journal, journal_path
from prism.migrate.requests import write_worker_stats
from prism.migrate.state import MigrationError, MigrationState, MigrationStore, Phase, Progress

__all__ = ["WorkerMigrations"]

log = logging.getLogger("prism.migrate")

STATS_INTERVAL_S: Final = 1.0
BARRIER_TIMEOUT_S: Final = 5.0  # a phase change waits this long for the writes taken (the admin's is 10 s)
BACKFILL_RETRY_S: Final = (1.0, 30.0)  # first delay after a failure, and the cap (doubling)


def _identity(st: MigrationState) -> tuple[Any, ...]:
    """What cannot change without opening the backends again."""
    return (st.source, st.target, st.started_ms)


@dataclass
class _Open:
    kv: MigratingKeyValue
    identity: tuple[Any, ...]
    source: KeyValueBackend
    target: KeyValueBackend
    serial: int
    run: trio.CancelScope = field(default_factory=trio.CancelScope)
    backfill: trio.CancelScope | None = None


class _Saver:
    """The backfill's ``save`` (once a second), off the event loop: the progress file is
    fsynced, and an fsync in the loop's thread would hold every call of the worker meanwhile
    (the p99 ``bench/migration.py`` measures). ``save`` keeps the newest progress and
    returns; a task writes it from a thread, the newest only. A failed write is raised
    by the next ``save`` (the backfill then waits and tries again); a crash loses at
    most the pages since the last write, copied again after the restart (the stamp
    rule makes a second copy harmless)."""

    def __init__(self, store: MigrationStore, namespace: str) -> None:
        self.store, self.namespace = store, namespace
        self.latest: Progress | None = None
        self.error: Exception | None = None
        self.busy = False
        self._wake = trio.Event()

    def save(self, progress: Progress) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        self.latest = msgspec.structs.replace(progress, mismatches=dict(progress.mismatches))
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            progress, self.latest = self.latest, None
            if progress is None:
                continue
            self.busy = True
            try:
                await trio.to_thread.run_sync(self.store.save_progress, self.namespace, progress)
            except Exception as exc:
                self.error = exc
            finally:
                self.busy = False

    async def flush(self) -> None:
        """Return once the newest progress is on disk; raise if writing it failed."""
        while self.latest is not None or self.busy:
            await trio.sleep(0.01)
        if self.error is not None:
            raise self.error


class WorkerMigrations:
    """The migrations of the namespaces this worker holds."""

    def __init__(self, data_dir: Path, worker_id: int) -> None:
        self.data_dir = data_dir
        self.worker_id = worker_id
        self.store = MigrationStore(data_dir)
        self.states: dict[str, MigrationState] = {}
        self._open: dict[str, _Open] = {}
        self._nursery: trio.Nursery | None = None
        self._waiting: list[_Open] = []  # opened before run() started: their tasks wait for it

    def want(self, states: Iterable[MigrationState]) -> None:
        """The migrations of the tenant's table now (before ``App.apply``)."""
        self.states = {st.namespace: st for st in states}

    def stale(self, name: str, backend: object) -> bool:
        """Whether the held ``backend`` of ``name`` must be opened again: a migration
        began, ended, or names other endpoints."""
        st = self.states.get(name)
        opened = self._open.get(name)
        if opened is None or opened.kv is not backend:
            return st is not None
        return st is None or _identity(st) != opened.identity

    async def open(self, ns: NamespaceConfig, data_dir: Path) -> KeyValueBackend | None:
        """``ns`` as a ``MigratingKeyValue`` if it migrates, else None (the App opens it plainly)."""
        st = self.states.get(ns.name)
        if st is None or ns.abstraction != "keyvalue":
            return None
        for backend in (st.source.backend, st.target.backend):
            await registry.import_off_loop("keyvalue", backend)
        source = registry.create(st.source.backend, st.source.options, data_dir=data_dir, namespace=ns.name)
        target = registry.create(st.target.backend, st.target.options, data_dir=data_dir, namespace=ns.name)
        journals = {
            role: Journal(journal_path(self.data_dir, ns.name, self.worker_id, role))
            for role in ("source", "target")
        }
        kv = MigratingKeyValue(ns.name, source, target, st, journals=journals)
        await kv.open()  # a target that cannot be reached queues writes: not a failure here
        old = self._open.get(ns.name)
        if old is not None:
            self._stop(old)
        opened = self._open[ns.name] = _Open(kv, _identity(st), source, target, st.serial)
        if self._nursery is None:
            self._waiting.append(opened)
        else:
            self._nursery.start_soon(self._run, opened)
        log.info(
            "namespace %s: migrating %s -> %s, phase %s",
            ns.name,
            st.source.backend,
            st.target.backend,
            st.phase,
        )
        return kv

    def settle(self, held: dict[str, object], tenant_first: bool) -> list[str]:
        """After ``App.apply``: apply moved serials; start or stop backfills (``tenant_first``:
        this worker runs them). ``held``: namespace -> the backend the App holds now.
        Returns the namespaces whose new phase waits for ``switch`` (the barrier)."""
        waiting = []
        for name, opened in list(self._open.items()):
            st = self.states.get(name)
            if held.get(name) is not opened.kv or st is None:
                self._stop(opened)
                del self._open[name]
                continue
            if st.serial != opened.serial:
                if opened.kv.needs_barrier(st):
                    waiting.append(name)
                else:
                    opened.kv.apply(st)
                    opened.serial = st.serial
            running = opened.backfill is not None
            if st.phase is Phase.BACKFILL and tenant_first and not running and self._nursery is not None:
                opened.backfill = trio.CancelScope()
                self._nursery.start_soon(self._backfill, name, opened, opened.backfill)
            elif running and (st.phase is not Phase.BACKFILL or not tenant_first):
                assert opened.backfill is not None
                opened.backfill.cancel()
                opened.backfill = None
        return waiting

    async def switch(self, names: Iterable[str]) -> bool:
        """Apply the phases ``settle`` left waiting, each once every write this worker
        acknowledged is on the backend that will answer (``MigratingKeyValue.switch``);
        False if one could not be within ``BARRIER_TIMEOUT_S``: it stays in its old
        phase, says why in its counters (the supervisor then goes back to that phase)
        and the worker must not report this generation as applied."""
        done = True
        for name in names:
            opened, st = self._open.get(name), self.states.get(name)
            if opened is None or st is None or st.serial == opened.serial:
                continue
            failed = opened.kv.barrier_failed
            if failed is not None and failed[0] == st.serial:
                done = False  # refused already: the supervisor goes back
                continue
            try:
                await opened.kv.switch(st, BARRIER_TIMEOUT_S)
            except BarrierError as exc:
                log.error(
                    "namespace %s: worker %d cannot apply phase %s (serial %d): %s",
                    name,
                    self.worker_id,
                    st.phase,
                    st.serial,
                    exc,
                )
                done = False
                self.write_stats()
                continue
            opened.serial = st.serial
        return done

    def _stop(self, opened: _Open) -> None:
        opened.run.cancel()
        if opened.backfill is not None:
            opened.backfill.cancel()
            opened.backfill = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The wrappers' background work, the backfill and the stats files, for good."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for opened in self._waiting:
                nursery.start_soon(self._run, opened)
            self._waiting.clear()
            task_status.started()
            while True:
                await trio.sleep(STATS_INTERVAL_S)
                self.write_stats()

    def write_stats(self) -> None:
        for name, opened in self._open.items():
            try:
                stats = opened.kv.stats()
                if stats.barrier:
                    stats.barrier = f"worker {self.worker_id}: {stats.barrier}"
                write_worker_stats(self.data_dir, name, self.worker_id, stats)
            except (OSError, MigrationError) as exc:
                log.warning("namespace %s: cannot write migration counters: %s", name, exc)

    async def _run(self, opened: _Open) -> None:
        with opened.run:
            await opened.kv.run()

    async def _backfill(self, name: str, opened: _Open, scope: trio.CancelScope) -> None:
        delay = BACKFILL_RETRY_S[0]
        with scope:
            while True:
                try:
                    progress = await trio.to_thread.run_sync(self.store.load_progress, name) or Progress()
                    if progress.done:
                        return
                    async with trio.open_nursery() as nursery:
                        saver = _Saver(self.store, name)
                        nursery.start_soon(saver.run)
                        await backfill(
                            cast(Migratable, opened.source),
                            cast(Migratable, opened.target),
                            namespace=name,
                            progress=progress,
                            rate=lambda: self._rate(name),
                            save=saver.save,
                            clock=lambda: int(time.time() * 1000),
                            busy=lambda: shed.SHEDDER.on,  # a worker shedding serves its clients first
                        )
                        await saver.flush()
                        nursery.cancel_scope.cancel()
                    return
                except Exception as exc:
                    log.warning("namespace %s: backfill stopped: %s; again in %.0fs", name, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, BACKFILL_RETRY_S[1])

    def _rate(self, name: str) -> int:
        st = self.states.get(name)
        return st.rate if st is not None else 1
