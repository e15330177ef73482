"""``MigratingKeyValue`` (prism/migrate/dual.py) over two in-memory backends:
what each phase answers and writes, the retry queue, shadow reads.

The same paths over real SQLite, PostgreSQL and Redis (every ordered pair)
are tests/integration/test_migration_pairs.py; here a backend can be made to
fail or hang on demand, and time is trio's MockClock."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence

import msgspec
import pytest
import trio
import trio.testing

from prism.backends.keyvalue import (
    Delete,
    ItemPage,
    ItemWrite,
    MatchAll,
    MatchKeys,
    Predicate,
    Put,
    Stamp,
    StampedItem,
)
from prism.backends.memory.keyvalue import MemoryBackend
from prism.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    PrismError,
    ResourceExhausted,
    Unavailable,
)
from prism.migrate import dual, retry
from prism.migrate.dual import MigratingKeyValue
from prism.migrate.journal import QueuedWrite
from prism.migrate.state import Endpoint, MigrationError, MigrationState, Phase, Progress, command, start

NOW = 1_700_000_000_000
BIG = 1 << 30


class Flaky(MemoryBackend):
    """A memory backend that can be made to refuse (down), hang, or refuse
    writes for what they are; counts the write attempts it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.hang = False
        self.refuse = False
        self.open_fails = False
        self.slow_commit = False  # applies the write, then does not answer
        self.attempts = 0
        self.opened = 0

    async def open(self) -> None:
        if self.open_fails:
            raise Unavailable("cannot connect")
        self.opened += 1

    async def _gate(self) -> None:
        self.attempts += 1
        if self.hang:
            await trio.sleep_forever()
        if self.down:
            raise Unavailable("backend down")
        if self.refuse:
            raise InvalidArgument("value too large for this backend")

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        await self._gate()
        await super().put_items(id, items, stamp, now_ms)
        if self.slow_commit:
            await trio.sleep_forever()

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        await self._gate()
        await super().delete_items(id, predicate, stamp, now_ms)

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
        if self.down:
            raise Unavailable("backend down")
        return await super().get_items(
            id,
            predicate,
            reverse=reverse,
            after=after,
            limit_items=limit_items,
            limit_bytes=limit_bytes,
            now_ms=now_ms,
        )


def state(phase: Phase = Phase.DUAL_WRITE, fraction: float = 1.0) -> MigrationState:
    s = start("ns", Endpoint("memory"), Endpoint("sqlite"), rate=100, shadow_fraction=fraction, now_ms=NOW)
    return msgspec.structs.replace(s, phase=phase)


def moved(mkv: MigratingKeyValue, phase: Phase) -> None:
    mkv.apply(msgspec.structs.replace(mkv.state, phase=phase, serial=mkv.state.serial + 1))


def w(key: bytes, value: bytes = b"v", expires_at_ms: int = 0) -> ItemWrite:
    return ItemWrite(key, value, expires_at_ms)


async def items(backend: MemoryBackend | MigratingKeyValue, id: str = "r") -> dict[bytes, bytes]:
    page = await backend.get_items(
        id, MatchAll(), reverse=False, after=None, limit_items=BIG, limit_bytes=BIG, now_ms=NOW
    )
    return {i.key: i.value for i in page.items}


async def dump(backend: MemoryBackend) -> list[tuple[str, list[StampedItem]]]:
    page = await backend.export_records(after=None, limit_items=BIG, limit_bytes=BIG, now_ms=NOW)
    return page.records


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Flaky, Flaky, MigratingKeyValue]]:
    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW, rng=random.Random(1))
    await mkv.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(mkv.run)
        yield source, target, mkv
        nursery.cancel_scope.cancel()
    await mkv.aclose()


async def test_dual_write_reaches_both_with_the_same_stamp(
    pair: tuple[Flaky, Flaky, MigratingKeyValue],
) -> None:
    source, target, mkv = pair
    await mkv.put_items("r", [w(b"a", b"1"), w(b"b", b"2", NOW + 5000)], Stamp(10, "t1"), NOW)
    await mkv.mutate_items("r", [Put(w(b"c", b"3")), Delete(MatchKeys((b"a",)))], Stamp(11, "t2"), NOW)
    await mkv.delete_items("q", MatchAll(), Stamp(12, "t3"), NOW)
    await mkv.settled()  # the target's copy is delivered after the answer
    assert (
        await dump(source)
        == await dump(target)
        == [("r", [StampedItem(b"b", b"2", NOW + 5000, 10, "t1"), StampedItem(b"c", b"3", 0, 11, "t2")])]
    )
    assert mkv.stats().target_failures == 0 and mkv.stats().queued == 0


async def test_a_retried_token_is_applied_once_on_both(pair: tuple[Flaky, Flaky, MigratingKeyValue]) -> None:
    source, target, mkv = pair
    await mkv.put_items("r", [w(b"k", b"first")], Stamp(10, "tok"), NOW)
    await mkv.put_items("r", [w(b"k", b"second")], Stamp(20, "tok"), NOW)  # a retry with a new time
    await mkv.settled()
    assert await items(source) == await items(target) == {b"k": b"first"}


async def test_the_sources_error_is_the_clients_and_the_target_is_not_written(
    pair: tuple[Flaky, Flaky, MigratingKeyValue],
) -> None:
    source, target, mkv = pair
    source.down = True
    with pytest.raises(Unavailable, match="backend down"):
        await mkv.put_items("r", [w(b"k")], Stamp(1), NOW)
    assert target.attempts == 0 and await dump(target) == []
    source.down = False
    with pytest.raises(InvalidArgument, match="item key must not be empty"):
        await mkv.put_items("r", [w(b"")], Stamp(1), NOW)


async def test_a_target_down_queues_writes_and_gets_them_when_back(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    source, target, mkv = pair
    target.down = True
    await mkv.put_items("r", [w(b"a", b"1")], Stamp(10, "t1"), NOW)  # the client's call succeeds
    await trio.sleep(0.5)  # its delivery fails: the target is failing
    attempts = target.attempts
    for i in range(5):
        await mkv.put_items("r", [w(b"k%d" % i)], Stamp(20 + i), NOW)
    await mkv.delete_items("r", MatchKeys((b"a",)), Stamp(30), NOW)
    assert target.attempts - attempts <= 2  # queued behind the first: not tried per call (the retry may try)
    stats = mkv.stats()
    assert (stats.target_failures, stats.queued, stats.dropped) == (7, 7, 0)
    assert await items(mkv) == {b"k%d" % i: b"v" for i in range(5)}  # reads: the source
    with pytest.raises(MigrationError, match="7 writes wait for the target"):
        command(msgspec.structs.replace(mkv.state, phase=Phase.SHADOW_READ), stats, "promote", NOW)
    await trio.sleep(60)
    assert mkv.stats().queued == 7  # still down: still queued
    target.down = False
    with trio.fail_after(120):
        await mkv.settled()
    assert await dump(target) == await dump(source)
    assert mkv.stats().queued == 0 and mkv.stats().target_failures == 7


async def test_a_target_that_hangs_costs_the_client_nothing(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    source, target, mkv = pair
    target.hang = True
    t0 = trio.current_time()
    await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)
    await mkv.put_items("r", [w(b"b")], Stamp(2), NOW)
    assert trio.current_time() == t0  # answered once the source had them
    assert await items(source) == {b"a": b"v", b"b": b"v"} and mkv.stats().pending == 2
    target.hang = False
    with trio.fail_after(60):
        await mkv.settled()
    assert await items(target) == {b"a": b"v", b"b": b"v"}


async def test_a_target_slower_than_the_writers_makes_them_wait_for_room_at_most_the_timeout(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    source, target, mkv = pair
    mkv.queues["target"].pipeline = 2
    target.hang = True
    t0 = trio.current_time()
    await mkv.put_items("r1", [w(b"a")], Stamp(1), NOW)
    await mkv.put_items("r2", [w(b"a")], Stamp(1), NOW)
    assert trio.current_time() == t0
    await mkv.put_items("r3", [w(b"a")], Stamp(1), NOW)  # two wait: backpressure
    assert trio.current_time() - t0 == pytest.approx(dual.SECONDARY_TIMEOUT_S)
    assert mkv.stats().pending == 3  # queued anyway: never dropped for being slow
    await trio.sleep(retry.ATTEMPT_TIMEOUT_S)  # the deliveries time out: the target is failing
    t1 = trio.current_time()
    await mkv.put_items("r4", [w(b"a")], Stamp(1), NOW)
    assert trio.current_time() == t1  # a failing target queues without waiting
    target.hang = False
    with trio.fail_after(120):
        await mkv.settled()
    assert await dump(target) == await dump(source)


async def test_a_client_cancelled_while_waiting_for_room_leaves_its_write_queued(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    source, target, mkv = pair
    mkv.queues["target"].pipeline = 0
    with trio.move_on_after(0.5):  # the call's deadline
        await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)
    assert await items(source) == {b"a": b"v"} and mkv.stats().pending == 1
    mkv.queues["target"].pipeline = 10
    with trio.fail_after(60):
        await mkv.settled()
    assert await items(target) == {b"a": b"v"}


@pytest.mark.parametrize("commits", [True, False])
async def test_a_client_cancelled_during_the_primarys_write_leaves_both_agreeing(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock, commits: bool
) -> None:
    source, target, mkv = pair
    # the source took the write and did not answer in time / did not take it before the deadline
    if commits:
        source.slow_commit = True
    else:
        source.hang = True
    with trio.move_on_after(0.5):
        await mkv.put_items("r", [w(b"a")], Stamp(1, "tok"), NOW)
    source.slow_commit = source.hang = False
    assert mkv.stats().pending == 2  # for each backend: its outcome is unknown
    with trio.fail_after(60):
        await mkv.settled()
    assert await dump(source) == await dump(target) == [("r", [StampedItem(b"a", b"v", 0, 1, "tok")])]


async def test_a_write_the_target_refuses_for_itself_is_dropped(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    _source, target, mkv = pair
    target.refuse = True
    await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)
    with trio.fail_after(60):
        await mkv.settled()
    assert mkv.stats().dropped == 1
    with pytest.raises(MigrationError, match="1 writes to the target were dropped"):
        command(msgspec.structs.replace(mkv.state, phase=Phase.SHADOW_READ), mkv.stats(), "promote", NOW)


async def test_a_full_queue_drops_and_counts(autojump_clock: trio.testing.MockClock) -> None:
    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW)
    mkv.queues["target"] = retry.RetryQueue("t", max_writes=3)
    await mkv.open()
    target.down = True
    for i in range(5):
        await mkv.put_items("r", [w(b"k%d" % i)], Stamp(i), NOW)
    assert (mkv.stats().pending, mkv.stats().dropped) == (3, 2)
    assert len(await items(source)) == 5  # the client saw no failure
    byte_budget = retry.RetryQueue("t", max_bytes=10)
    write = QueuedWrite("put", "r", Stamp(1), items=(w(b"k"),))
    assert byte_budget.push(retry.PendingWrite("r", 10, write))
    assert not byte_budget.push(retry.PendingWrite("r", 1, write))


async def test_close_delivers_what_is_queued_or_says_what_is_lost(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW)
    await mkv.open()
    target.down = True
    await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)
    target.down = False
    await mkv.aclose()  # run() is not running: close delivers it itself
    assert await items(target) == {b"a": b"v"}

    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW)
    await mkv.open()
    target.down = True
    await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)
    t0 = trio.current_time()
    with caplog.at_level(logging.ERROR, logger="prism.migrate"):
        await mkv.aclose()
    assert trio.current_time() - t0 == pytest.approx(dual.CLOSE_DRAIN_S)
    assert "closed with 1 writes never delivered to the migration target" in caplog.text


async def test_a_target_that_does_not_open_is_a_retry_case(autojump_clock: trio.testing.MockClock) -> None:
    source, target = Flaky(), Flaky()
    target.open_fails = True
    mkv = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW)
    await mkv.open()  # does not raise: the namespace serves
    async with trio.open_nursery() as nursery:
        await nursery.start(mkv.run)
        await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)
        assert target.attempts == 0 and mkv.stats().pending == 1
        await trio.sleep(30)
        target.open_fails = False
        with trio.fail_after(60):
            await mkv.settled()
        assert target.opened == 1 and await items(target) == {b"a": b"v"}
        nursery.cancel_scope.cancel()


async def test_backfill_through_the_migration_opens_the_target_and_follows_the_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    for i in range(40):
        await source.put_items(f"id{i:02}", [w(b"k")], Stamp(1), NOW)
    target.open_fails = True
    mkv = MigratingKeyValue("ns", source, target, state(Phase.BACKFILL), clock=lambda: NOW)
    await mkv.open()
    mkv.apply(msgspec.structs.replace(mkv.state, rate=10, serial=5))
    saves: list[int] = []

    async def opens_later() -> None:
        await trio.sleep(3)
        target.open_fails = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(opens_later)
        t0 = trio.current_time()
        progress = await mkv.backfill(Progress(), lambda p: saves.append(p.copied))
    assert progress.done and await dump(target) == await dump(source)
    assert target.opened == 1 and saves[-1] == 40 and len(saves) <= 6  # saved every second or so
    assert trio.current_time() - t0 >= 3 + 3.8  # waited for the target, then 39 waits of 0.1 s


async def test_a_source_that_does_not_open_fails_the_namespace() -> None:
    source, target = Flaky(), Flaky()
    source.open_fails = True
    mkv = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW)
    with pytest.raises(Unavailable, match="cannot connect"):
        await mkv.open()


async def test_each_phase_answers_from_its_primary_and_writes_where_it_says(
    pair: tuple[Flaky, Flaky, MigratingKeyValue],
) -> None:
    source, target, mkv = pair
    await source.put_items("r", [w(b"only-source")], Stamp(1), NOW)
    await target.put_items("r", [w(b"only-target")], Stamp(1), NOW)
    expected = {
        Phase.BACKFILL: ({b"only-source"}, True, True),
        Phase.SHADOW_READ: ({b"only-source"}, True, True),
        Phase.PROMOTED: ({b"only-target"}, True, True),
        Phase.FINISHED: ({b"only-target"}, False, True),
    }
    for n, (phase, (reads, to_source, to_target)) in enumerate(expected.items()):
        moved(mkv, phase)
        assert mkv.state.phase is phase
        assert set(await items(mkv)) >= reads
        key = b"w%d" % n
        await mkv.put_items("r", [w(key)], Stamp(10 + n), NOW)
        await mkv.settled()
        assert (key in await items(source), key in await items(target)) == (to_source, to_target)
        page = await mkv.scan_items(after=None, limit_items=BIG, limit_bytes=BIG, now_ms=NOW)
        assert {i.key for i in page.records[0][1]} == set(await items(mkv))


@pytest.mark.parametrize("phase", [Phase.DUAL_WRITE, Phase.BACKFILL, Phase.SHADOW_READ, Phase.PROMOTED])
async def test_abort_from_every_phase_leaves_the_source_with_every_write(phase: Phase) -> None:
    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(phase), clock=lambda: NOW)
    await mkv.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(mkv.run)
        await mkv.put_items("r", [w(b"a", b"1")], Stamp(1), NOW)
        await mkv.delete_items("r", MatchKeys((b"a",)), Stamp(2), NOW)
        await mkv.put_items("r", [w(b"b", b"2")], Stamp(3, "t"), NOW)
        await mkv.switch(command(mkv.state, Progress(done=True), "abort", NOW), 5.0)
        assert mkv.state.phase is Phase.ABORTED
        assert await items(mkv) == await items(source) == {b"b": b"2"}
        await mkv.put_items("r", [w(b"c", b"3")], Stamp(4), NOW)
        assert await items(source) == {b"b": b"2", b"c": b"3"}
        assert b"c" not in await items(target)  # the target is let go
        nursery.cancel_scope.cancel()
    await mkv.aclose()


async def test_promoted_writes_queue_for_the_source_and_abort_delivers_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = Flaky(), Flaky()
    mkv = MigratingKeyValue("ns", source, target, state(Phase.PROMOTED), clock=lambda: NOW)
    await mkv.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(mkv.run)
        source.down = True
        await mkv.put_items("r", [w(b"a")], Stamp(1), NOW)  # the target answers
        await trio.sleep(0.5)  # the source refuses its copy
        assert mkv.stats().queued == 1 and await items(target) == {b"a": b"v"}
        mkv.apply(command(mkv.state, None, "abort", NOW))
        source.down = False
        with trio.fail_after(60):
            await mkv.settled()
        assert await items(mkv) == {b"a": b"v"}
        nursery.cancel_scope.cancel()


async def test_apply_refuses_another_migration_and_ignores_an_older_serial(
    pair: tuple[Flaky, Flaky, MigratingKeyValue],
) -> None:
    _, _, mkv = pair
    moved(mkv, Phase.BACKFILL)
    mkv.apply(msgspec.structs.replace(mkv.state, phase=Phase.DUAL_WRITE, serial=1))
    assert mkv.state.phase is Phase.BACKFILL
    other = msgspec.structs.replace(mkv.state, target=Endpoint("redis"), serial=99)
    with pytest.raises(ValueError, match="a state of another migration cannot be applied"):
        mkv.apply(other)
    with pytest.raises(ValueError, match="namespace 'other': given the migration state of 'ns'"):
        MigratingKeyValue("other", Flaky(), Flaky(), state())


async def test_ping_probes_the_primary(pair: tuple[Flaky, Flaky, MigratingKeyValue]) -> None:
    _source, target, mkv = pair

    pinged = []

    async def ping() -> None:
        pinged.append("target")

    target.ping = ping  # type: ignore[attr-defined]
    await mkv.ping()  # the source (memory) has no probe: healthy
    moved(mkv, Phase.PROMOTED)
    await mkv.ping()
    assert pinged == ["target"]


# --- shadow reads ------------------------------------------------------------


async def read_n(mkv: MigratingKeyValue, n: int, id: str = "r") -> None:
    for _ in range(n):
        await items(mkv, id)


async def test_shadow_reads_match_when_both_hold_the_same(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    _, _, mkv = pair
    await mkv.put_items("r", [w(b"a"), w(b"b", b"x", NOW + 9000)], Stamp(1), NOW)
    moved(mkv, Phase.SHADOW_READ)
    await read_n(mkv, 20)
    await trio.sleep(5)
    assert (mkv.stats().shadow_reads, mkv.stats().mismatches) == (20, {})


async def test_shadow_reads_sample_the_configured_share(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    _, _, mkv = pair
    mkv.apply(msgspec.structs.replace(mkv.state, phase=Phase.SHADOW_READ, shadow_fraction=0.25, serial=5))
    await read_n(mkv, 400)
    await trio.sleep(5)
    assert 60 <= mkv.stats().shadow_reads <= 140
    mkv.apply(msgspec.structs.replace(mkv.state, shadow_fraction=0.0, serial=6))
    before = mkv.stats().shadow_reads
    await read_n(mkv, 50)
    await trio.sleep(5)
    assert mkv.stats().shadow_reads == before
    moved(mkv, Phase.BACKFILL)  # outside shadow_read: none
    mkv.apply(msgspec.structs.replace(mkv.state, shadow_fraction=1.0, serial=9))
    await read_n(mkv, 50)
    await trio.sleep(5)
    assert mkv.stats().shadow_reads == before


@pytest.mark.parametrize(
    ("corrupt", "kind"),
    [
        (lambda t: t.delete_items("r", MatchKeys((b"b",)), Stamp(50), NOW), "missing"),
        (lambda t: t.put_items("r", [w(b"zz")], Stamp(50), NOW), "extra"),
        (lambda t: t.put_items("r", [w(b"b", b"other")], Stamp(50), NOW), "value"),
        (lambda t: t.put_items("r", [w(b"b", b"x", NOW + 1)], Stamp(50), NOW), "expiry"),
    ],
)
async def test_each_kind_of_mismatch_is_counted_and_logged_without_values(
    pair: tuple[Flaky, Flaky, MigratingKeyValue],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    corrupt: object,
    kind: str,
) -> None:
    _, target, mkv = pair
    await mkv.put_items("r", [w(b"a"), w(b"b", b"x", NOW + 9000)], Stamp(1), NOW)
    await corrupt(target)  # type: ignore[operator]
    moved(mkv, Phase.SHADOW_READ)
    with caplog.at_level(logging.WARNING, logger="prism.migrate"):
        await read_n(mkv, 3)
        await trio.sleep(5)
    assert mkv.stats().mismatches == {kind: 3}
    assert mkv.stats().mismatched_reads == 3
    lines = [r.getMessage() for r in caplog.records if "shadow read differs" in r.getMessage()]
    assert len(lines) == 1  # a sample: one line per LOG_EVERY_S
    assert f"id 'r' key {(b'zz' if kind == 'extra' else b'b').hex()}: {kind}" in lines[0]
    assert "other" not in lines[0] and "x'" not in lines[0]


async def test_a_read_racing_a_write_is_not_a_mismatch(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    source, target, mkv = pair
    moved(mkv, Phase.SHADOW_READ)
    # The source has taken a write the target has not yet (a dual write in flight)...
    await source.put_items("r", [w(b"a")], Stamp(1), NOW)
    await read_n(mkv, 1)
    await target.put_items("r", [w(b"a")], Stamp(1), NOW)  # ...which lands before the confirmation
    await trio.sleep(5)
    assert (mkv.stats().shadow_reads, mkv.stats().mismatches) == (1, {})
    # and a record the source changed meanwhile is inconclusive, not a mismatch
    await source.put_items("q", [w(b"a")], Stamp(1), NOW)
    await read_n(mkv, 1, "q")
    await source.put_items("q", [w(b"b")], Stamp(2), NOW)
    await trio.sleep(5)
    assert mkv.stats().mismatches == {} and mkv.shadow.inconclusive == 1


async def test_shadow_reads_never_delay_the_answer_and_are_bounded(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    _, target, mkv = pair
    moved(mkv, Phase.SHADOW_READ)
    target.hang = True  # writes only: reads of the target hang below

    async def hang(*args: object, **kw: object) -> ItemPage:
        await trio.sleep_forever()
        raise AssertionError

    target.get_items = hang  # type: ignore[method-assign]
    t0 = trio.current_time()
    await read_n(mkv, 1000)
    assert trio.current_time() == t0
    assert mkv.shadow.skipped >= 1000 - 256 - 4
    await trio.sleep(60)  # each compare gives up after its timeout: counted as skipped
    assert mkv.stats().mismatches == {}


async def test_paged_reads_compare_up_to_the_first_page_end(
    pair: tuple[Flaky, Flaky, MigratingKeyValue], autojump_clock: trio.testing.MockClock
) -> None:
    _source, target, mkv = pair
    await mkv.put_items("r", [w(b"a"), w(b"b"), w(b"c"), w(b"d")], Stamp(1), NOW)
    await target.put_items("r", [w(b"bb")], Stamp(1), NOW)  # extra, inside the first page of two
    moved(mkv, Phase.SHADOW_READ)
    page = await mkv.get_items(
        "r", MatchAll(), reverse=False, after=None, limit_items=2, limit_bytes=BIG, now_ms=NOW
    )
    assert [i.key for i in page.items] == [b"a", b"b"]
    await trio.sleep(5)
    # target's page is a, b; source's a, b: equal up to b (bb is past the end of both)
    assert mkv.stats().mismatches == {}
    await mkv.get_items(
        "r", MatchAll(), reverse=False, after=b"a", limit_items=2, limit_bytes=BIG, now_ms=NOW
    )
    await trio.sleep(5)
    assert mkv.stats().mismatches == {"extra": 1}  # b, bb against b, c: bb is extra, c past the end


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (Unavailable("down"), True),
        (ResourceExhausted("pool busy"), True),
        (DeadlineExceeded("slow"), True),
        (Internal("sqlite: disk I/O error"), True),
        (trio.TooSlowError(), True),
        (OSError("connection reset"), True),
        (InvalidArgument("key too long"), False),
        (PrismError("anything else a backend says of the write"), False),
    ],
)
def test_which_failures_are_tried_again(exc: Exception, retried: bool) -> None:
    assert retry.is_retryable(exc) is retried
