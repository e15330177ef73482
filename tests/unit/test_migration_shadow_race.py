"""A shadow read's confirmation waits for the writes of its record still on
their way to the target's queue (``RetryQueue.coming``).

A client's write reaches the source, and then its writer may wait for room in
the target's queue (``SECONDARY_TIMEOUT_S`` at most) before the write is
queued. A read of the source meanwhile sees the write, the target's does
not; confirmed before the write was even queued, that was counted a
mismatch that was none (seen under load in CI:
``test_under_load_sqlite_moves_to_postgres_through_every_phase``).
"""

from __future__ import annotations

import trio
import trio.testing

from prism.backends.keyvalue import Stamp
from prism.migrate import dual
from prism.migrate.dual import MigratingKeyValue
from prism.migrate.state import Phase

from .test_migration_dual import NOW, Flaky, items, moved, pair, w

__all__ = ["pair"]  # (the fixture)


async def test_a_write_waiting_for_room_is_waited_for_before_a_difference_counts(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    source, target, mkv = pair
    moved(mkv, Phase.SHADOW_READ)
    mkv.queues["target"].pipeline = 0  # every writer waits for room, SECONDARY_TIMEOUT_S
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mkv.put_items, "r", [w(b"a", b"new")], Stamp(2), NOW)
        await trio.testing.wait_all_tasks_blocked()
        assert await items(source) == {b"a": b"new"} and await items(target) == {}
        assert await items(mkv) == {b"a": b"new"}  # the client's read, compared in the background
    assert trio.current_time() >= dual.SECONDARY_TIMEOUT_S  # the writer waited for room
    await trio.sleep(10)
    assert await items(target) == {b"a": b"new"}
    assert (mkv.stats().shadow_reads, mkv.stats().mismatches) == (1, {})
