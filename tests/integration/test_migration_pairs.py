"""A live migration's data path over real engines, for every ordered pair of
SQLite, PostgreSQL and Redis as source and target: dual write, the backfill
(resumed from its saved cursor, kept to its rate, never undoing a newer
write), shadow reads, promote, finish, abort from every phase, and a target
(or, promoted, a source) that goes down during dual write and comes back.

``MigratingKeyValue`` and ``backfill`` are driven directly here, as a worker
drives them; the phases reaching workers through the routing table, the admin
API and the CLI are mig-control's tests."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from prism.backends import registry
from prism.backends.keyvalue import (
    Delete,
    ExportPage,
    ItemWrite,
    KeyValueBackend,
    MatchAll,
    MatchKeys,
    MatchRange,
    Put,
    Stamp,
    StampedItem,
)
from prism.backends.postgres.keyvalue import PostgresBackend
from prism.backends.redis.keyvalue import RedisBackend
from prism.backends.sqlite.keyvalue import SqliteBackend
from prism.migrate.backfill import backfill
from prism.migrate.dual import BarrierError, MigratingKeyValue
from prism.migrate.state import (
    Endpoint,
    MigrationState,
    MigrationStore,
    Phase,
    Progress,
    advance,
    command,
    start,
)
from tests.integration.test_namespace_health import Relay
from tests.pg import DSN, drop_tables, dsn_via
from tests.rd import URL, delete_keys, new_prefix

pytestmark = pytest.mark.services("postgres", "redis")

ENGINES = ("sqlite", "postgres", "redis")
PAIRS = [(a, b) for a in ENGINES for b in ENGINES if a != b]
NETWORKED = ("postgres", "redis")
BIG = 1 << 30


NOW = 1_700_000_000_000


Backend = SqliteBackend | PostgresBackend | RedisBackend


@dataclass
class Engines:
    """The backends a test made, for clean-up."""

    made: list[Backend] = field(default_factory=list)

    def make(self, kind: str, data_dir: Path, *, port: int | None = None) -> Backend:
        """An unopened backend of ``kind`` with storage of its own (through a relay on ``port``)."""
        options: dict[str, Any]
        if kind == "sqlite":
            data_dir.mkdir(parents=True, exist_ok=True)
            options = {}
        elif kind == "postgres":
            options = {"dsn": DSN if port is None else dsn_via(port), "connect_timeout_s": 1, "pool_size": 2}
        else:
            url = URL if port is None else f"redis://127.0.0.1:{port}/0"
            options = {"url": url, "key_prefix": new_prefix(), "connect_timeout_s": 1, "pool_size": 2}
        backend = registry.create(
            kind, options, data_dir=data_dir, namespace=f"prism_test_{uuid.uuid4().hex[:12]}"
        )
        assert isinstance(backend, SqliteBackend | PostgresBackend | RedisBackend)
        self.made.append(backend)
        return backend

    async def clean(self) -> None:
        for backend in self.made:
            await backend.aclose()
            if isinstance(backend, PostgresBackend):
                drop_tables(backend)
            if isinstance(backend, RedisBackend):
                await delete_keys(backend.key_prefix)


def endpoint(backend: Backend) -> Endpoint:
    kinds = {SqliteBackend: "sqlite", PostgresBackend: "postgres", RedisBackend: "redis"}
    return Endpoint(kinds[type(backend)], {"made": id(backend)})


@asynccontextmanager
async def migration(
    source: Backend, target: Backend, phase: Phase = Phase.DUAL_WRITE, fraction: float = 1.0
) -> AsyncIterator[MigratingKeyValue]:
    """A running ``MigratingKeyValue`` (opened, its background work started) in ``phase``."""
    state = start(
        "ns", endpoint(source), endpoint(target), rate=1_000_000, shadow_fraction=fraction, now_ms=NOW
    )
    state = msgspec.structs.replace(state, phase=phase)
    mkv = MigratingKeyValue("ns", source, target, state, clock=lambda: NOW, rng=random.Random(7))
    await mkv.open()
    try:
        with trio.fail_after(120):  # a test that hangs fails instead
            async with trio.open_nursery() as nursery:
                await nursery.start(mkv.run)
                yield mkv
                nursery.cancel_scope.cancel()
    finally:
        await mkv.aclose()


def to(mkv: MigratingKeyValue, phase: Phase) -> None:
    mkv.apply(msgspec.structs.replace(mkv.state, phase=phase, serial=mkv.state.serial + 1))


async def dump(backend: Any, now: int = NOW) -> list[tuple[str, list[StampedItem]]]:
    out: list[tuple[str, list[StampedItem]]] = []
    after = None
    while True:
        page: ExportPage = await backend.export_records(
            after=after, limit_items=BIG, limit_bytes=BIG, now_ms=now
        )
        out += page.records
        if page.last_id is None:
            return out
        after = page.last_id


async def values(backend: KeyValueBackend, id: str) -> dict[bytes, bytes]:
    page = await backend.get_items(
        id, MatchAll(), reverse=False, after=None, limit_items=BIG, limit_bytes=BIG, now_ms=NOW
    )
    return {i.key: i.value for i in page.items}


def w(key: bytes, value: bytes = b"v", expires_at_ms: int = 0) -> ItemWrite:
    return ItemWrite(key, value, expires_at_ms)


async def prefill(backend: Backend, n: int) -> None:
    """``n`` records written before the migration (on the source alone)."""
    await backend.open()
    for i in range(n):
        items = [w(b"k%d" % j, b"old-%d-%d" % (i, j), NOW + 3_600_000 if j == 2 else 0) for j in range(3)]
        await backend.put_items(f"id{i:04}", items, Stamp(1000 + i, f"pre-{i}"), NOW)
    await backend.delete_items("id0001", MatchKeys((b"k0",)), Stamp(5000), NOW)
    await backend.delete_items("id0002", MatchAll(), Stamp(5000), NOW)


@pytest.fixture(params=PAIRS, ids=lambda p: f"{p[0]}-to-{p[1]}")
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Backend, Backend]]:
    engines = Engines()
    a, b = request.param
    try:
        yield engines.make(a, tmp_path / "source"), engines.make(b, tmp_path / "target")
    finally:
        await engines.clean()


# --- dual write ----------------------------------------------------------------


async def test_dual_write_both_hold_it_with_one_stamp_and_token(
    pair: tuple[Backend, Backend],
) -> None:
    source, target = pair
    async with migration(source, target) as mkv:
        await mkv.put_items("a", [w(b"x", b"1"), w(b"y", b"2", NOW + 60_000)], Stamp(10, "tok-1"), NOW)
        await mkv.mutate_items("a", [Put(w(b"z", b"3")), Delete(MatchKeys((b"x",)))], Stamp(11, "tok-2"), NOW)
        await mkv.put_items("b", [w(b"k", b"first")], Stamp(12, "tok-3"), NOW)
        await mkv.put_items("b", [w(b"k", b"retry")], Stamp(99, "tok-3"), NOW)  # the token again: not applied
        await mkv.put_items("c", [w(b"k1"), w(b"k2"), w(b"k3")], Stamp(13), NOW)
        await mkv.delete_items("c", MatchRange(b"k2", b""), Stamp(14), NOW)
        expected = [
            (
                "a",
                [StampedItem(b"y", b"2", NOW + 60_000, 10, "tok-1"), StampedItem(b"z", b"3", 0, 11, "tok-2")],
            ),
            ("b", [StampedItem(b"k", b"first", 0, 12, "tok-3")]),
            ("c", [StampedItem(b"k1", b"v", 0, 13, "")]),
        ]
        await mkv.settled()  # the target's copies are delivered after each answer
        assert await dump(source) == await dump(target) == expected
        # the tombstones went too: an older write arriving late is held back on both
        await mkv.put_items("c", [w(b"k3", b"late")], Stamp(13), NOW)
        await mkv.settled()
        assert await values(source, "c") == await values(target, "c") == {b"k1": b"v"}
        assert mkv.stats().target_failures == 0


# --- backfill --------------------------------------------------------------------


async def test_backfill_resumes_from_its_saved_cursor_and_never_undoes_a_newer_write(
    pair: tuple[Backend, Backend], tmp_path: Path
) -> None:
    source, target = pair
    await prefill(source, 120)
    (tmp_path / "data").mkdir()
    store = MigrationStore(tmp_path / "data")
    async with migration(source, target) as mkv:
        # during dual write, before the copy reaches them: newer writes and deletes
        await mkv.put_items("id0100", [w(b"k0", b"dual")], Stamp(9000, "d1"), NOW)
        await mkv.delete_items("id0110", MatchAll(), Stamp(9000, "d2"), NOW)
        await mkv.delete_items("id0111", MatchKeys((b"k1",)), Stamp(9000), NOW)
        mkv.apply(advance(mkv.state, None, NOW) or mkv.state)
        assert mkv.state.phase is Phase.BACKFILL

        pages = 0

        def save(progress: Progress) -> None:  # a restart of prism serve after a second's pages
            nonlocal pages
            store.save_progress("ns", progress)
            pages += 1
            if pages == 1:
                scope.cancel()

        with trio.CancelScope() as scope:
            await backfill(
                source,
                target,
                namespace="ns",
                progress=Progress(),
                rate=lambda: 30,
                save=save,
                clock=lambda: NOW,
            )
        saved = store.load_progress("ns")
        # saved once a second has passed: about 30 records (id0001 has 2 items, id0002 none)
        assert saved is not None and not saved.done and 5 <= saved.copied <= 100
        assert saved.cursor == f"id{saved.copied:04}"
        # the restart: from the file, with a copy of a page made twice being harmless
        progress = await backfill(
            source,
            target,
            namespace="ns",
            progress=saved,
            rate=lambda: 1_000_000,
            save=lambda p: store.save_progress("ns", p),
            clock=lambda: NOW,
        )
        assert progress.done and progress.copied == 118  # 120 less id0002 (all deleted) and id0110
        done = store.load_progress("ns")
        assert done is not None and done.done
        moved = advance(mkv.state, done, NOW)
        assert moved is not None and moved.phase is Phase.SHADOW_READ
        assert await dump(target) == await dump(source)
        rows = dict(await dump(target))
        assert rows["id0100"][0] == StampedItem(b"k0", b"dual", 0, 9000, "d1")
        assert "id0110" not in rows and [i.key for i in rows["id0111"]] == [b"k0", b"k2"]
        assert [i.key for i in rows["id0001"]] == [b"k1", b"k2"] and rows["id0001"][
            1
        ].expires_at_ms == NOW + 3_600_000


async def test_backfill_keeps_to_its_rate(
    pair: tuple[Backend, Backend], mock_clock: trio.testing.MockClock
) -> None:
    source, target = pair
    await prefill(source, 40)
    await target.open()
    mock_clock.autojump_threshold = 0.05  # idle (a throttle's sleep), not an I/O wait: jump
    t0 = trio.current_time()
    progress = await backfill(
        source,
        target,
        namespace="ns",
        progress=Progress(),
        rate=lambda: 5,
        save=lambda p: None,
        clock=lambda: NOW,
    )
    # 39 records at 5 a second, pages of 5: 7 waits of 1 s, none after the last page
    assert progress.copied == 39 and 7.0 <= trio.current_time() - t0 < 8.0
    assert await dump(target) == await dump(source)
    await source.aclose()
    await target.aclose()


# --- shadow reads ----------------------------------------------------------------


CORRUPTIONS: dict[str, Callable[[Backend], Any]] = {
    "missing": lambda t: t.delete_items("id0005", MatchKeys((b"k1",)), Stamp(99_999), NOW),
    "extra": lambda t: t.put_items("id0006", [w(b"zz", b"x")], Stamp(99_999), NOW),
    "value": lambda t: t.put_items("id0007", [w(b"k1", b"changed")], Stamp(99_999), NOW),
    "expiry": lambda t: t.put_items("id0008", [w(b"k1", b"old-8-1", NOW + 999_000)], Stamp(99_999), NOW),
}


async def test_shadow_reads_match_after_backfill_and_catch_each_kind_of_difference(
    pair: tuple[Backend, Backend],
) -> None:
    source, target = pair
    await prefill(source, 12)
    async with migration(source, target, Phase.BACKFILL) as mkv:
        await mkv.backfill(Progress(), lambda p: None)  # as a worker runs it: at the state's rate
        to(mkv, Phase.SHADOW_READ)
        for i in range(12):
            await values(mkv, f"id{i:04}")
        with trio.fail_after(10):
            while mkv.stats().shadow_reads < 12:
                await trio.sleep(0.01)
        assert mkv.stats().mismatches == {}
        for corrupt in CORRUPTIONS.values():  # behind Prism's back, on the target alone
            await corrupt(target)
        for i in range(5, 9):
            await values(mkv, f"id{i:04}")
        with trio.fail_after(10):
            while mkv.stats().shadow_reads < 16:
                await trio.sleep(0.01)
        assert mkv.stats().mismatches == {"missing": 1, "extra": 1, "value": 1, "expiry": 1}


# --- promote, finish, abort ------------------------------------------------------


async def test_promote_then_finish(pair: tuple[Backend, Backend]) -> None:
    source, target = pair
    await prefill(source, 5)
    async with migration(source, target, Phase.BACKFILL) as mkv:
        progress = await backfill(
            source,
            target,
            namespace="ns",
            progress=Progress(),
            rate=lambda: 1_000_000,
            save=lambda p: None,
            clock=lambda: NOW,
        )
        mkv.apply(advance(mkv.state, progress, NOW) or mkv.state)
        await mkv.switch(command(mkv.state, mkv.stats(), "promote", NOW), 10.0)
        assert mkv.state.phase is Phase.PROMOTED and mkv.primary is target
        await target.put_items("id0000", [w(b"only-target")], Stamp(99_999), NOW)  # who answers?
        assert b"only-target" in await values(mkv, "id0000")
        await mkv.put_items("p", [w(b"k", b"promoted")], Stamp(50_000, "p1"), NOW)
        await mkv.settled()
        assert await values(source, "p") == await values(target, "p") == {b"k": b"promoted"}
        await mkv.switch(command(mkv.state, mkv.stats(), "finish", NOW), 10.0)
        await mkv.put_items("f", [w(b"k", b"finished")], Stamp(50_001), NOW)
        assert await values(target, "f") == {b"k": b"finished"} and await values(source, "f") == {}
        assert await values(mkv, "p") == {b"k": b"promoted"}


async def test_every_write_acknowledged_before_promote_is_on_the_target_when_it_applies(
    pair: tuple[Backend, Backend],
) -> None:
    source, target = pair
    async with migration(source, target, Phase.SHADOW_READ) as mkv:
        clients = trio.CapacityLimiter(2)  # the source's pool: 2 connections

        async def put(i: int) -> None:
            async with clients:
                await mkv.put_items(f"r{i % 50:02}", [w(b"k%d" % i, b"%d" % i)], Stamp(100 + i), NOW)

        async with trio.open_nursery() as nursery:
            for i in range(200):  # answered at the source's pace; the target's copies lag
                nursery.start_soon(put, i)
        await mkv.delete_items("r00", MatchKeys((b"k0",)), Stamp(1000), NOW)
        await mkv.switch(command(mkv.state, mkv.stats(), "promote", NOW), 30.0)
        assert mkv.primary is target
        for r in range(50):  # read from the target itself, at once
            expected = {b"k%d" % i: b"%d" % i for i in range(r, 200, 50) if i != 0}
            assert await values(target, f"r{r:02}") == expected
        assert await dump(source) == await dump(target)


@pytest.mark.parametrize("phase", [Phase.DUAL_WRITE, Phase.BACKFILL, Phase.SHADOW_READ, Phase.PROMOTED])
async def test_abort_from_every_phase_leaves_the_source_with_everything(
    pair: tuple[Backend, Backend], phase: Phase
) -> None:
    source, target = pair
    await prefill(source, 5)
    model = {rid: {i.key: i.value for i in items} for rid, items in await dump(source)}
    async with migration(source, target) as mkv:
        stamp = 60_000
        for step in [Phase.DUAL_WRITE, Phase.BACKFILL, Phase.SHADOW_READ, Phase.PROMOTED]:
            if step is not Phase.DUAL_WRITE:
                await mkv.switch(
                    msgspec.structs.replace(mkv.state, phase=step, serial=mkv.state.serial + 1), 10.0
                )
            if step is Phase.BACKFILL:
                await backfill(
                    source,
                    target,
                    namespace="ns",
                    progress=Progress(),
                    rate=lambda: 1_000_000,
                    save=lambda p: None,
                    clock=lambda: NOW,
                )
            stamp += 1
            await mkv.put_items("id0000", [w(b"k0", step.encode())], Stamp(stamp, f"t{stamp}"), NOW)
            model["id0000"][b"k0"] = step.encode()
            await mkv.put_items(f"new-{step}", [w(b"k", b"v")], Stamp(stamp), NOW)
            model[f"new-{step}"] = {b"k": b"v"}
            await mkv.delete_items("id0003", MatchKeys((b"k%d" % (stamp % 3),)), Stamp(stamp), NOW)
            model["id0003"].pop(b"k%d" % (stamp % 3), None)
            if step is phase:
                break
        await mkv.switch(command(mkv.state, mkv.stats(), "abort", NOW), 10.0)
        assert mkv.state.phase is Phase.ABORTED and mkv.primary is source
        got = {rid: {i.key: i.value for i in items} for rid, items in await dump(source)}
        assert got == {rid: items for rid, items in model.items() if items}
        assert await values(mkv, "id0000") == model["id0000"]


# --- a backend down during dual write, then back ----------------------------------


@pytest.fixture(params=[p for p in PAIRS if p[1] in NETWORKED], ids=lambda p: f"{p[0]}-to-{p[1]}")
async def relayed_target(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Backend, Backend, Relay]]:
    a, b = request.param
    relay = Relay(5432 if b == "postgres" else 6379)
    engines = Engines()
    try:
        yield (
            engines.make(a, tmp_path / "source"),
            engines.make(b, tmp_path / "target", port=relay.port),
            relay,
        )
    finally:
        await engines.clean()


async def test_a_target_down_during_dual_write_gets_the_queued_writes_when_back(
    relayed_target: tuple[Backend, Backend, Relay],
) -> None:
    source, target, relay = relayed_target
    async with trio.open_nursery() as nursery:
        await relay.up(nursery)
        async with migration(source, target) as mkv:
            await mkv.put_items("a", [w(b"k", b"before")], Stamp(10, "t0"), NOW)
            await mkv.settled()
            relay.down()
            with trio.fail_after(20):  # every client call succeeds while the target is down
                for i in range(20):
                    await mkv.put_items(f"r{i:02}", [w(b"k", b"%d" % i)], Stamp(100 + i, f"t{i}"), NOW)
                await mkv.delete_items("a", MatchKeys((b"k",)), Stamp(200), NOW)
                await mkv.put_items("r00", [w(b"k", b"retried")], Stamp(300, "t0"), NOW)  # a replay: nothing
            await trio.sleep(0.5)  # the target's copies fail
            stats = mkv.stats()
            assert stats.target_failures == 22 and 1 <= stats.queued <= 22 and stats.dropped == 0
            await relay.up(nursery)
            with trio.fail_after(60):
                await mkv.settled()
            assert await dump(target) == await dump(source)
            assert len(await dump(target)) == 20 and await values(target, "r00") == {b"k": b"0"}
        relay.down()


@pytest.fixture(params=[p for p in PAIRS if p[0] in NETWORKED], ids=lambda p: f"{p[0]}-to-{p[1]}")
async def relayed_source(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Backend, Backend, Relay]]:
    a, b = request.param
    relay = Relay(5432 if a == "postgres" else 6379)
    engines = Engines()
    try:
        yield (
            engines.make(a, tmp_path / "source", port=relay.port),
            engines.make(b, tmp_path / "target"),
            relay,
        )
    finally:
        await engines.clean()


async def test_promoted_a_source_down_gets_its_writes_back_so_abort_loses_nothing(
    relayed_source: tuple[Backend, Backend, Relay],
) -> None:
    source, target, relay = relayed_source
    async with trio.open_nursery() as nursery:
        await relay.up(nursery)
        async with migration(source, target, Phase.PROMOTED) as mkv:
            relay.down()
            with trio.fail_after(20):
                for i in range(10):
                    await mkv.put_items(f"r{i}", [w(b"k", b"%d" % i)], Stamp(100 + i, f"t{i}"), NOW)
            await trio.sleep(0.5)  # the source's copies fail
            assert mkv.stats().target_failures == 10
            aborted = command(mkv.state, mkv.stats(), "abort", NOW)
            with pytest.raises(
                BarrierError, match="10 writes acknowledged to clients were not on the source"
            ):
                await mkv.switch(aborted, 1.0)  # the source is down: abort waits, then is refused
            assert mkv.state.phase is Phase.PROMOTED
            await relay.up(nursery)
            with trio.fail_after(60):
                await mkv.switch(aborted, 60.0)
            assert mkv.state.phase is Phase.ABORTED and await mkv.settled() is None
            assert await dump(source) == await dump(target) and len(await dump(source)) == 10
        relay.down()


# --- under load -----------------------------------------------------------------


async def test_under_load_sqlite_moves_to_postgres_through_every_phase(tmp_path: Path) -> None:
    """A writer with idempotency tokens (some calls retried) and a reader run
    throughout; afterwards every acknowledged write reads back with the value
    that won, the target holds exactly the source's records, shadow reads saw
    no difference, and no client call failed."""
    engines = Engines()
    source = engines.make("sqlite", tmp_path / "source")
    target = engines.make("postgres", tmp_path / "target")
    try:
        await prefill(source, 300)
        acked: dict[str, int] = {}  # id -> stamp of its last acknowledged write
        tried: dict[str, set[int]] = {}  # id -> stamps of every write sent (some cancelled at the end)
        failures: list[BaseException] = []
        counter = [0]

        async def check_acked(backend: MigratingKeyValue) -> None:
            """Each acknowledged write reads back, or a newer one of its id that won
            (a newer write whose call was cancelled when the load stopped may have)."""
            for rid, stamp in acked.items():
                won = int((await values(backend, rid))[b"k0"][1:])
                assert won >= stamp and won in tried[rid], rid

        async with migration(source, target, fraction=1.0) as mkv:

            async def writer(n: int) -> None:
                rng = random.Random(n)
                while True:
                    counter[0] += 1
                    stamp, rid = 10_000 + counter[0], f"id{rng.randrange(400):04}"
                    value = b"w%d" % stamp
                    token = f"w{n}-{stamp}"
                    tried.setdefault(rid, set()).add(stamp)
                    try:
                        await mkv.put_items(rid, [w(b"k0", value)], Stamp(stamp, token), NOW)
                        if rng.random() < 0.2:  # the client did not hear the answer and retries
                            await mkv.put_items(rid, [w(b"k0", b"dup")], Stamp(stamp, token), NOW)
                    except Exception as exc:
                        failures.append(exc)
                    else:
                        acked[rid] = max(acked.get(rid, 0), stamp)
                    await trio.sleep(0)

            async def reader() -> None:
                rng = random.Random(99)
                while True:
                    try:
                        await values(mkv, f"id{rng.randrange(400):04}")
                    except Exception as exc:
                        failures.append(exc)
                    await trio.sleep(0)

            async with trio.open_nursery() as load:
                for n in range(2):
                    load.start_soon(writer, n)
                load.start_soon(reader)
                with trio.fail_after(120):
                    await trio.sleep(0.2)
                    mkv.apply(advance(mkv.state, None, NOW) or mkv.state)  # every worker is dual writing
                    progress = await backfill(
                        source,
                        target,
                        namespace="ns",
                        progress=Progress(),
                        rate=lambda: 2000,
                        save=lambda p: None,
                        clock=lambda: NOW,
                    )
                    mkv.apply(advance(mkv.state, progress, NOW) or mkv.state)
                    assert mkv.state.phase is Phase.SHADOW_READ
                    reads = mkv.stats().shadow_reads
                    while mkv.stats().shadow_reads < reads + 200:
                        await trio.sleep(0.01)
                    await mkv.switch(command(mkv.state, mkv.stats(), "promote", NOW), 10.0)
                    await trio.sleep(0.2)
                load.cancel_scope.cancel()
            with trio.fail_after(30):
                await mkv.settled()
            assert failures == []
            assert mkv.stats().mismatches == {} and mkv.stats().shadow_reads >= 200
            ours, theirs = dict(await dump(source)), dict(await dump(target))
            assert {rid for rid in ours.keys() | theirs.keys() if ours.get(rid) != theirs.get(rid)} == set()
            await check_acked(mkv)
            state: MigrationState = command(mkv.state, mkv.stats(), "finish", NOW)
            mkv.apply(state)
            await check_acked(mkv)
    finally:
        await engines.clean()
