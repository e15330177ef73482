"""A migration's phase changes and restarts lose no acknowledged write: the barrier
of ``MigratingKeyValue.switch`` (prism/migrate/dual.py), the supervisor going back
when a worker cannot apply a phase (prism/workers/migrations.py), and the journal
of writes not yet on the second backend (prism/migrate/journal.py)."""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from prism.backends.keyvalue import Delete, ItemWrite, MatchKeys, Put, Stamp
from prism.migrate import journal as jmod
from prism.migrate.dual import BarrierError, MigratingKeyValue
from prism.migrate.journal import Journal, QueuedWrite, journal_path
from prism.migrate.requests import write_worker_stats
from prism.migrate.state import MigrationStore, Phase, Progress, command
from tests.unit.test_migration_control import World, request
from tests.unit.test_migration_dual import NOW, Flaky, dump, items, state, w


class Slow(Flaky):
    """A target that takes each write, ``delay`` seconds later."""

    delay = 1.0

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        await trio.sleep(self.delay)
        await super().put_items(id, items, stamp, now_ms)


def promoted(mkv: MigratingKeyValue) -> object:
    return command(mkv.state, Progress(done=True), "promote", NOW)


async def test_a_write_acknowledged_before_promote_is_on_the_target_once_it_applies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Slow()
    mkv = MigratingKeyValue("ns", source, target, state(Phase.SHADOW_READ), clock=lambda: NOW)
    await mkv.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(mkv.run)
        t0 = trio.current_time()
        await mkv.put_items("r", [w(b"a", b"1")], Stamp(1), NOW)
        assert trio.current_time() == t0 and await items(target) == {}  # answered; the target lags
        await mkv.switch(promoted(mkv), 5.0)  # type: ignore[arg-type]
        assert mkv.state.phase is Phase.PROMOTED
        assert trio.current_time() - t0 == pytest.approx(Slow.delay)  # waited for the delivery
        assert await items(target) == await items(mkv) == {b"a": b"1"}
        nursery.cancel_scope.cancel()
    await mkv.aclose()


async def test_writes_made_during_the_switch_wait_and_go_to_the_new_primary_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Slow()
    mkv = MigratingKeyValue("ns", source, target, state(Phase.SHADOW_READ), clock=lambda: NOW)
    await mkv.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(mkv.run)
        await mkv.put_items("r", [w(b"a", b"1")], Stamp(1), NOW)
        nursery.start_soon(mkv.switch, promoted(mkv), 5.0)
        await trio.sleep(0.1)
        t0 = trio.current_time()
        await mkv.put_items("r", [w(b"b", b"2")], Stamp(2), NOW)  # waits for the switch
        assert mkv.state.phase is Phase.PROMOTED
        # then written to the target (the primary now) before the answer
        assert trio.current_time() - t0 == pytest.approx(Slow.delay - 0.1 + Slow.delay)
        assert await items(mkv) == {b"a": b"1", b"b": b"2"}
        with trio.fail_after(10):
            await mkv.settled()
        assert await dump(source) == await dump(target)
        nursery.cancel_scope.cancel()
    await mkv.aclose()


async def test_a_switch_that_cannot_deliver_in_time_changes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(Phase.SHADOW_READ), clock=lambda: NOW)
    await mkv.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(mkv.run)
        target.down = True
        await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)
        new = promoted(mkv)
        t0 = trio.current_time()
        with pytest.raises(
            BarrierError, match=r"1 writes acknowledged to clients were not on the target \(sqlite\) after 3s"
        ):
            await mkv.switch(new, 3.0)  # type: ignore[arg-type]
        assert trio.current_time() - t0 == pytest.approx(3.0)
        assert mkv.state.phase is Phase.SHADOW_READ  # the source still answers
        assert mkv.stats().barrier_serial == new.serial and "1 writes" in mkv.stats().barrier  # type: ignore[attr-defined]
        await mkv.put_items("r", [w(b"b")], Stamp(2), NOW)  # writes go on as before
        assert await items(mkv) == {b"a": b"v", b"b": b"v"}
        target.down = False
        with trio.fail_after(120):
            await mkv.switch(new, 60.0)  # type: ignore[arg-type]
        assert mkv.state.phase is Phase.PROMOTED and await items(mkv) == {b"a": b"v", b"b": b"v"}
        assert mkv.stats().barrier == ""
        nursery.cancel_scope.cancel()
    await mkv.aclose()


async def test_a_phase_change_that_keeps_the_primary_does_not_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(Phase.BACKFILL), clock=lambda: NOW)
    await mkv.open()
    target.hang = True
    await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)
    new = msgspec.structs.replace(mkv.state, phase=Phase.SHADOW_READ, serial=mkv.state.serial + 1)
    assert not mkv.needs_barrier(new)
    t0 = trio.current_time()
    await mkv.switch(new, 5.0)
    assert trio.current_time() == t0 and mkv.state.phase is Phase.SHADOW_READ
    assert mkv.needs_barrier(promoted(mkv))  # type: ignore[arg-type]
    target.hang = False
    await mkv.aclose()


def test_the_supervisor_goes_back_when_a_worker_cannot_apply_promote(tmp_path: Path) -> None:
    world = World(tmp_path)
    assert world.send(request("ledger", "start", to="postgres", rate=50))[1] == 200
    world.beat()
    MigrationStore(world.data).save_progress("ledger", Progress(copied=7, done=True))
    world.beat()
    world.turn()
    world.beat()
    assert world.routes.migrations["ledger"].phase == "shadow_read"
    promote = request("ledger", "promote")
    serial, code, _ = world.send(promote)
    assert code == 200 and world.routes.migrations["ledger"].phase == "promoted"
    # worker 2 (the tenant's one) could not deliver its writes to the target in time
    why = "worker 2: 12 writes acknowledged to clients were not on the target (postgres) after 5s"
    write_worker_stats(world.data, "ledger", 2, Progress(barrier_serial=serial, barrier=why))
    world.turn()
    entry = world.routes.migrations["ledger"]
    assert entry.phase == "shadow_read" and entry.serial == serial + 1
    assert MigrationStore(world.data).load("ledger").phase is Phase.SHADOW_READ  # type: ignore[union-attr]
    answer = world.routes.migration_answers[promote.id]
    assert (
        answer[1] == 409
        and "12 writes acknowledged" in answer[2]
        and "stays in phase shadow_read" in answer[2]
    )
    world.turn()  # the report of the old serial changes nothing more
    assert world.routes.migrations["ledger"].serial == serial + 1
    world.beat()
    assert world.send(request("ledger", "promote"))[1] == 200  # once the backend keeps up, again


# --- the journal ---------------------------------------------------------------


def journals(data: Path) -> dict[str, Journal]:
    return {role: Journal(journal_path(data, "ns", 3, role)) for role in ("source", "target")}


async def test_writes_queued_when_the_process_dies_reach_the_target_after_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW, journals=journals(tmp_path))
    await mkv.open()
    target.down = True
    await mkv.put_items("r", [w(b"a", b"1"), w(b"b", b"2")], Stamp(10, "t1"), NOW)
    await mkv.delete_items("r", MatchKeys((b"a",)), Stamp(11, "t2"), NOW)
    await mkv.mutate_items("q", [Put(w(b"c", b"3")), Delete(MatchKeys((b"x",)))], Stamp(12, "t3"), NOW)
    path = journal_path(tmp_path, "ns", 3, "target")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size > 0
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # the process dies here: nothing closed, nothing delivered
    target.down = False
    again = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW, journals=journals(tmp_path))
    await again.open()
    assert again.stats().pending == 3
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        with trio.fail_after(60):
            await again.settled()
        nursery.cancel_scope.cancel()
    assert await dump(target) == await dump(source)
    assert await items(target) == {b"b": b"2"} and await items(target, "q") == {b"c": b"3"}
    assert path.stat().st_size == 0  # delivered: emptied
    await again.aclose()
    third = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW, journals=journals(tmp_path))
    await third.open()
    assert third.stats().pending == 0
    await third.aclose()


async def test_a_restart_in_a_phase_that_let_a_backend_go_forgets_its_writes(tmp_path: Path) -> None:
    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW, journals=journals(tmp_path))
    await mkv.open()
    target.down = True
    await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)
    aborted = command(mkv.state, None, "abort", NOW)
    again = MigratingKeyValue("ns", source, target, aborted, clock=lambda: NOW, journals=journals(tmp_path))
    await again.open()
    assert again.stats().pending == 0
    assert journal_path(tmp_path, "ns", 3, "target").stat().st_size == 0


def test_a_torn_or_foreign_tail_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path / "j")
    one = QueuedWrite("put", "r", Stamp(1, "t"), items=(w(b"k"),))
    journal.append(one)
    journal.append(QueuedWrite("delete", "r", Stamp(2), predicate=MatchKeys((b"k",))))
    with open(tmp_path / "j", "ab") as f:
        f.write(jmod.frame(one)[:-3])  # killed in the middle of a write
    assert [x.kind for x in journal.load()] == ["put", "delete"]
    assert "bytes at the end are not a whole write" in caplog.text
    (tmp_path / "k").write_bytes(b"\xff\xff\xff\xff" + os.urandom(20))
    assert Journal(tmp_path / "k").load() == []
    (tmp_path / "m").write_bytes(b"\x00\x00\x00\x03abc")
    assert Journal(tmp_path / "m").load() == []
    assert Journal(tmp_path / "absent").load() == []


def test_the_journal_is_rewritten_once_it_outgrows_what_is_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jmod, "COMPACT_BYTES", 1000)
    journal = Journal(tmp_path / "j")
    writes = [
        QueuedWrite("put", f"r{i}", Stamp(i), items=(w(b"k", bytes(random.randrange(50))),))
        for i in range(100)
    ]
    for x in writes:
        journal.append(x)
    big = journal.size
    journal.compact(writes[-2:], 100)
    assert journal.size < big // 10 and journal.load() == writes[-2:]
    journal.append(writes[0])
    assert journal.load() == [*writes[-2:], writes[0]]
    journal.compact(writes, 10**9)  # what is queued is as large: not rewritten
    assert len(journal.load()) == 3
    journal.clear()
    assert journal.load() == [] and journal.size == 0
    journal.remove()
    assert not (tmp_path / "j").exists()
