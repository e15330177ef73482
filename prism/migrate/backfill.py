"""The backfill: copying a namespace's existing records from the source to the target.

While it runs, every new write already reaches both backends (dual write), so
the copy only has to bring over what was there before. It pages through the
source in id order (``Migratable.export_records``: whole records, each item
with its stamp) and imports each page into the target
(``Migratable.import_records``), which applies every item under the stamp
rule: an item written (or deleted) during dual write is newer than the copy
of it read a moment before, and the copy is skipped. That is why the copy can
run beside live traffic and needs no lock.

Every ``SAVE_EVERY_S`` (and at the end), ``save(progress)`` records the
cursor (the last id copied), so a restart resumes after it; copying a page
twice is harmless. The pace is ``rate()`` records a second, read before each
page, so a change takes effect at the next one.

The copy shares the worker's CPU (and the machine's) with the clients'
calls, so it goes in small pages spread evenly: ``PAGE_S`` worth of the rate
each (50 records every 50 ms at the default 1000/s, not 500 every half
second). And a page is read and written in slices (``SLICE_ITEMS`` items,
more at a high rate so that a page is ``SLICES_MAX`` slices at most), each
read and each write a step of the event loop of its own: what the copy holds
the loop for at once (reading a slice, converting it, sending it) is short,
and a client's call that arrives meanwhile waits for that, not for a page.
In one step, a SQLite page of 50 (read on the loop's thread) and its
PostgreSQL write took about 0.7 ms of the loop's CPU, at every page: the
clients' read p99 rose from 1.5 ms to 2-4 ms during the copy
(``bench/migration.py``). And the copy yields to the clients: while
``busy()`` (the worker's shedder sees a standing queue,
``prism.limits.shed``) a page waits, ``PAGE_S`` at a time and at most
``YIELD_MAX_S`` in a row, so that an overloaded worker serves its clients
first and the copy still moves. The rate is a ceiling: time spent waiting is
not made up by faster pages.

A page that fails (either backend down) is tried again after a backoff,
from the cursor (each slice written moves it), until it goes through or the
backfill is cancelled.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio

from prism.backends.keyvalue import ExportPage, Migratable, StampedItem
from prism.errors import Unimplemented
from prism.migrate.state import Progress
from prism.workers.reopen import retry_delay

log = logging.getLogger("prism.migrate")

PAGE_ITEMS: Final = 500  # items per page at most
PAGE_S: Final = 0.05  # a page is this long's worth of the rate (at least one record)
SLICE_ITEMS: Final = 25  # a page is read and written this many items at a time at least (whole records)
SLICES_MAX: Final = 4  # and in this many slices at most (larger slices at a high rate)
YIELD_MAX_S: Final = 1.0  # a page waits for a busy worker this long at most
SAVE_EVERY_S: Final = 1.0  # the progress is saved this often (and at the end)
PAGE_BYTES: Final = 4 << 20
RATE_WINDOW_S: Final = 5.0  # records_per_s is measured over this much of the recent past
LOG_EVERY_S: Final = 30.0
COUNT_TIMEOUT_S: Final = 30.0  # counting the source's records, once, at the start


async def backfill(
    source: Migratable,
    target: Migratable,
    *,
    namespace: str,
    progress: Progress,
    rate: Callable[[], int],
    save: Callable[[Progress], None],
    clock: Callable[[], int],
    rand: Callable[[], float] = random.random,
    busy: Callable[[], bool] = lambda: False,
) -> Progress:
    """Copy every record after ``progress.cursor`` from ``source`` to ``target``;
    ``progress`` is updated in place (and returned) with ``done`` set at the end.
    ``clock()`` is the time in ms the backends judge expiry by; pacing and the
    measured rate use trio's clock. ``busy()``: whether the worker's clients
    should go first now (a page waits)."""
    if progress.done:
        return progress
    log.info(
        "namespace %s: backfill %s at %d records/s",
        namespace,
        "starts" if progress.cursor is None else f"resumes after id {progress.cursor!r}",
        rate(),
    )
    if progress.total is None:
        progress.total = await _count(source, namespace, clock())
    history: deque[tuple[float, int]] = deque([(trio.current_time(), progress.copied)])
    next_at = trio.current_time()
    logged_at = saved_at = trio.current_time()
    failures = 0
    while True:
        waited = 0.0
        while busy() and waited < YIELD_MAX_S:
            await trio.sleep(PAGE_S)
            waited += PAGE_S
        per_s = max(1, rate())
        started = trio.current_time()
        try:
            copied, done = await _copy_page(
                source, target, progress, max(1, min(PAGE_ITEMS, int(per_s * PAGE_S))), clock
            )
        except Exception as exc:
            failures += 1
            if failures == 1 or failures % 10 == 0:
                log.warning(
                    "namespace %s: backfill page after id %r failed (%d in a row), retrying: %s",
                    namespace,
                    progress.cursor,
                    failures,
                    exc,
                )
            await trio.sleep(retry_delay(failures, rand))
            continue
        failures = 0
        now = trio.current_time()
        history.append((now, progress.copied))
        while len(history) > 2 and history[1][0] <= now - RATE_WINDOW_S:
            history.popleft()
        t0, c0 = history[0]
        progress.records_per_s = (progress.copied - c0) / (now - t0) if now > t0 else 0.0
        progress.done = done
        progress.updated_ms = clock()
        if progress.done or now - saved_at >= SAVE_EVERY_S:
            await _save(save, progress, namespace, rand)
            saved_at = now
        if progress.done:
            log.info("namespace %s: backfill done: %d records copied", namespace, progress.copied)
            return progress
        if now - logged_at >= LOG_EVERY_S:
            log.info(
                "namespace %s: backfill at id %r: %d records copied, %.0f records/s",
                namespace,
                progress.cursor,
                progress.copied,
                progress.records_per_s,
            )
            logged_at = now
        next_at = max(next_at, started) + copied / per_s
        await trio.sleep_until(next_at)


async def _copy_page(
    source: Migratable, target: Migratable, progress: Progress, items: int, clock: Callable[[], int]
) -> tuple[int, bool]:
    """Copy up to ``items`` items after ``progress.cursor`` (whole records, at
    least one), in slices (``SLICE_ITEMS``, ``SLICES_MAX``): each slice is
    read, then written in a step of its own, and moves the cursor once
    written. Returns the records copied and whether the source has no more."""
    per_slice = max(SLICE_ITEMS, -(-items // SLICES_MAX))
    copied = 0
    while True:
        page = await source.export_records(
            after=progress.cursor, limit_items=min(per_slice, items), limit_bytes=PAGE_BYTES, now_ms=clock()
        )
        # A read (SQLite's, on the loop's thread) or a write may return
        # without a checkpoint: each is a step of its own all the same.
        await trio.lowlevel.checkpoint()
        if not page.records:
            return copied, page.last_id is None
        await target.import_records(page.records, clock())
        await trio.lowlevel.checkpoint()
        progress.cursor = page.records[-1][0]
        progress.copied += len(page.records)
        copied += len(page.records)
        items -= sum(len(record_items) for _, record_items in page.records)
        if page.last_id is None or items <= 0:
            return copied, page.last_id is None


async def _count(source: Migratable, namespace: str, now_ms: int) -> int | None:
    """The source's records, for the share copied and the time left; None if
    it cannot be counted now (the copy does not wait for a figure to show)."""
    try:
        with trio.fail_after(COUNT_TIMEOUT_S):
            return await source.count_records(now_ms)
    except Exception as exc:  # (trio.TooSlowError included)
        log.warning(
            "namespace %s: cannot count the records to copy (status shows no share or time left): %s",
            namespace,
            exc,
        )
        return None


async def _save(
    save: Callable[[Progress], None], progress: Progress, namespace: str, rand: Callable[[], float]
) -> None:
    """``save(progress)``, tried again after a backoff while it fails (a full
    disk): the copy goes on only once a restart would resume from here."""
    failures = 0
    while True:
        try:
            save(progress)
            return
        except Exception as exc:
            failures += 1
            if failures == 1:
                log.error("namespace %s: cannot save the backfill's progress, retrying: %s", namespace, exc)
            await trio.sleep(retry_delay(failures, rand))


class OpenedBackend:
    """One backend of a migration as ``Migratable``, opened before each use."""

    def __init__(self, mkv: Any, role: str) -> None:
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
