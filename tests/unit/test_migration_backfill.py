"""The backfill (prism/migrate/backfill.py) between two in-memory backends, on
trio's MockClock: it copies everything in small pages, saves its cursor
every second and at the end, resumes from it, keeps to its rate, yields to
a busy worker, never undoes a newer write, and outlasts a backend that
fails. (Every ordered pair of real engines:
tests/integration/test_migration_pairs.py.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec
import pytest
import trio
import trio.testing

from prism.backends.keyvalue import ExportPage, ItemWrite, MatchKeys, Stamp, StampedItem
from prism.backends.memory.keyvalue import MemoryBackend
from prism.errors import Unavailable
from prism.migrate import backfill as backfill_module
from prism.migrate.backfill import backfill
from prism.migrate.state import MigrationError, Progress

NOW = 1_700_000_000_000
BIG = 1 << 30


class Flaky(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.pages = 0
        self.limits: list[int] = []  # limit_items of each read (a slice of a page) asked for
        self.exported = 0  # records read

    async def export_records(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> ExportPage:
        if self.down:
            raise Unavailable("source down")
        self.pages += 1
        self.limits.append(limit_items)
        page = await super().export_records(
            after=after, limit_items=limit_items, limit_bytes=limit_bytes, now_ms=now_ms
        )
        self.exported += len(page.records)
        return page

    async def import_records(self, records: Sequence[tuple[str, Sequence[StampedItem]]], now_ms: int) -> None:
        if self.down:
            raise Unavailable("target down")
        await super().import_records(records, now_ms)


async def fill(backend: MemoryBackend, n: int) -> None:
    for i in range(n):
        await backend.put_items(f"id{i:04}", [ItemWrite(b"k", b"v%d" % i)], Stamp(10), NOW)


async def dump(backend: MemoryBackend) -> list[tuple[str, list[StampedItem]]]:
    return (await backend.export_records(after=None, limit_items=BIG, limit_bytes=BIG, now_ms=NOW)).records


class Saved:
    def __init__(self) -> None:
        self.saves: list[Progress] = []

    def __call__(self, progress: Progress) -> None:
        self.saves.append(msgspec.structs.replace(progress))


async def run(
    source: MemoryBackend,
    target: MemoryBackend,
    progress: Progress,
    rate: int = 1_000_000,
    save: Saved | None = None,
) -> Progress:
    return await backfill(
        source,
        target,
        namespace="ns",
        progress=progress,
        rate=lambda: rate,
        save=save or Saved(),
        clock=lambda: NOW,
    )


async def test_copies_everything_and_saves_every_second_and_at_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 1200)
    saved = Saved()
    progress = await run(source, target, Progress(), save=saved)
    assert source.limits == [125] * 10  # PAGE_ITEMS a page at most, in SLICES_MAX slices
    assert (progress.done, progress.copied, progress.cursor) == (True, 1200, "id1199")
    assert await dump(target) == await dump(source)
    assert [(s.copied, s.done) for s in saved.saves] == [(1200, True)]  # well within a second
    assert await run(source, target, progress) is progress  # done: nothing more
    slow, saved = Flaky(), Saved()
    await fill(slow, 300)
    await run(slow, Flaky(), Progress(), rate=100, save=saved)  # 3 s: pages of 5 every 50 ms
    assert [s.copied // 10 for s in saved.saves] == [10, 20, 30] and saved.saves[-1].done


async def test_an_empty_source_is_done_at_once(autojump_clock: trio.testing.MockClock) -> None:
    progress = await run(Flaky(), Flaky(), Progress())
    assert (progress.done, progress.copied, progress.cursor) == (True, 0, None)


async def test_resumes_from_the_saved_cursor(autojump_clock: trio.testing.MockClock) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 100)
    saved = Saved()
    with trio.move_on_after(3.5):  # a restart of prism serve part-way: 10 records/s, pages of 10
        await run(source, target, Progress(), rate=10, save=saved)
    last = saved.saves[-1]
    assert not last.done and last.cursor == f"id{last.copied - 1:04}" and 20 <= last.copied <= 50
    assert last.copied <= len(await dump(target)) < last.copied + 10  # a second's pages not saved yet
    exported_before = source.exported
    progress = await run(source, target, msgspec.structs.replace(last), rate=2000)
    assert progress.done and progress.copied == 100
    assert source.exported - exported_before == 100 - last.copied  # none read twice
    assert await dump(target) == await dump(source)


async def test_a_copy_never_overwrites_a_newer_dual_written_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 10)
    # written during dual write, to both, after the copy was read: newer stamps
    for backend in (source, target):
        await backend.put_items("id0003", [ItemWrite(b"k", b"new")], Stamp(20), NOW)
        await backend.delete_items("id0005", MatchKeys((b"k",)), Stamp(20), NOW)
    stale = [
        ("id0003", [StampedItem(b"k", b"v3", 0, 10, "")]),
        ("id0005", [StampedItem(b"k", b"v5", 0, 10, "")]),
    ]
    await target.import_records(stale, NOW)  # as a page read before those writes would be
    await run(source, target, Progress())
    assert await dump(target) == await dump(source)
    rows = dict(await dump(target))
    assert rows["id0003"] == [StampedItem(b"k", b"new", 0, 20, "")] and "id0005" not in rows


async def test_keeps_to_its_rate(autojump_clock: trio.testing.MockClock) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 200)
    t0 = trio.current_time()
    await run(source, target, Progress(), rate=20)  # a record every 50 ms
    elapsed = trio.current_time() - t0
    assert 9.0 <= elapsed <= 10.5  # 200 records at 20/s (no wait after the last page)
    assert set(source.limits) == {1}


async def test_a_rate_change_takes_effect_at_the_next_page(autojump_clock: trio.testing.MockClock) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 300)
    rate = [10]
    seen: list[tuple[float, int, float]] = []

    def save(progress: Progress) -> None:
        seen.append((trio.current_time(), progress.copied, progress.records_per_s))
        if progress.copied >= 50:
            rate[0] = 100

    t0 = trio.current_time()
    await backfill(
        source,
        target,
        namespace="ns",
        progress=Progress(),
        rate=lambda: rate[0],
        save=save,
        clock=lambda: NOW,
    )
    elapsed = trio.current_time() - t0
    # 50 records at 10/s (5 s), then 250 at 100/s (2.5 s)
    assert 6.5 <= elapsed <= 8.0
    assert seen[4][2] == pytest.approx(10, rel=0.3)  # records_per_s measured at the slow pace
    assert seen[-1][2] > 40  # over the last RATE_WINDOW_S: part slow, part fast
    assert [c // 10 for _, c, _ in seen] == [1, 2, 3, 4, 5, 15, 25, 30]  # saved every second


async def test_a_backend_down_is_waited_out(autojump_clock: trio.testing.MockClock) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 30)
    target.down = True
    saved = Saved()

    async def come_back() -> None:
        await trio.sleep(20)
        target.down = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(come_back)
        progress = await run(source, target, Progress(), save=saved)
    assert progress.done and trio.current_time() >= 20
    assert await dump(target) == await dump(source)


async def test_a_progress_file_that_cannot_be_written_is_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 3)
    failures = [3]
    saved = Saved()

    def save(progress: Progress) -> None:
        if failures[0]:
            failures[0] -= 1
            raise MigrationError(
                "migration state /data/migrations/progress/ns.json: cannot write: No space left"
            )
        saved(progress)

    progress = await backfill(
        source, target, namespace="ns", progress=Progress(), rate=lambda: 1000, save=save, clock=lambda: NOW
    )
    assert progress.done and saved.saves[-1].done


async def test_a_page_is_a_twentieth_of_a_seconds_worth_read_and_written_in_slices(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 3)
    t0 = trio.current_time()
    await run(source, target, Progress(), rate=1)
    assert trio.current_time() - t0 == pytest.approx(2.0)  # a record a second
    assert backfill_module.PAGE_S == 0.05 and backfill_module.PAGE_ITEMS == 500
    assert backfill_module.SLICE_ITEMS == 25 and backfill_module.SLICES_MAX == 4
    await fill(source, 1000)
    for rate, slices in (
        (1, [1]),
        (39, [1]),
        (40, [2]),
        (1000, [25, 25]),
        (2000, [25, 25, 25, 25]),
        (9999, [125, 125, 125, 124]),
        (20_000, [125] * 4),
        (10**6, [125] * 4),
    ):
        source.limits.clear()
        with trio.move_on_after(1e-4):  # the first page (no time passes within it), not the next
            await run(source, Flaky(), Progress(), rate=rate)
        assert source.limits == slices


async def test_a_page_is_copied_a_slice_a_step(autojump_clock: trio.testing.MockClock) -> None:
    """Between two checkpoints, the copy reads or writes one slice at most: a
    client's call that arrives meanwhile waits for that, not for a page (a
    SQLite read runs on the loop's thread and returns without a checkpoint,
    as the in-memory backend's calls here)."""
    step = [0]
    touched: dict[int, int] = {}  # step of the backfill's task -> items read or written in it

    class Counted(Flaky):
        async def export_records(
            self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
        ) -> ExportPage:
            page = await super().export_records(
                after=after, limit_items=limit_items, limit_bytes=limit_bytes, now_ms=now_ms
            )
            touched[step[0]] = touched.get(step[0], 0) + sum(len(items) for _, items in page.records)
            return page

        async def import_records(
            self, records: Sequence[tuple[str, Sequence[StampedItem]]], now_ms: int
        ) -> None:
            await super().import_records(records, now_ms)
            touched[step[0]] = touched.get(step[0], 0) + sum(len(items) for _, items in records)

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name == "copy":
                step[0] += 1

    source, target = Counted(), Counted()
    await fill(source, 200)
    trio.lowlevel.add_instrument(Steps())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, source, target, Progress(), 1000, None, name="copy")
    assert source.limits == [25] * 8  # pages of 50 (1000/s), two slices each
    assert sum(touched.values()) == 2 * 200 and max(touched.values()) == 25
    assert await dump(target) == await dump(source)


async def test_a_busy_worker_is_served_first_and_the_copy_still_moves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 4)
    busy_until = trio.current_time() + 0.3

    async def copy(busy: Callable[[], bool]) -> float:
        t0 = trio.current_time()
        await backfill(
            source,
            target,
            namespace="ns",
            progress=Progress(),
            rate=lambda: 20,  # a record every 50 ms
            save=Saved(),
            clock=lambda: NOW,
            busy=busy,
        )
        return trio.current_time() - t0

    # Busy for 0.3 s: the first page waits for it, the others keep the pace.
    assert await copy(lambda: trio.current_time() < busy_until) == pytest.approx(0.3 + 3 * 0.05)
    # Busy for good: each page waits YIELD_MAX_S, then goes.
    assert await copy(lambda: True) == pytest.approx(4 * backfill_module.YIELD_MAX_S + 3 * 0.05)
    assert await dump(target) == await dump(source)


async def test_the_total_is_counted_once_and_a_count_that_fails_does_not_stop_the_copy(
    mock_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    await fill(source, 30)
    done = await run(source, target, Progress())
    assert (done.total, done.copied, done.done) == (30, 30, True)
    # A resumed copy keeps the total it saved (the source has grown since: an estimate).
    await fill(source, 40)
    resumed = await run(source, Flaky(), Progress(cursor="id0029", copied=30, total=30))
    assert (resumed.total, resumed.copied) == (30, 40)

    class Uncountable(Flaky):
        async def count_records(self, now_ms: int) -> int:
            raise Unavailable("source down")

    blind = Uncountable()
    await fill(blind, 5)
    copied = await run(blind, Flaky(), Progress())
    assert (copied.total, copied.copied, copied.done) == (None, 5, True)
