"""Random operations on every backend, compared with a plain model of the
contract in base.py. Small alphabets of ids, keys, stamps and tokens make
collisions (stamp ties, token replays, expiry on the boundary) common, and
writes come with stamps in any order: a put stamped before a delete may
arrive after it (``late_put`` does so on purpose), which the delete's
tombstones must then hold back until they are past their (short) time."""

from __future__ import annotations

import functools
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from prism.backends.keyvalue import (
    IDEMPOTENCY_WINDOW_MS,
    Delete,
    ItemPage,
    ItemWrite,
    MatchAll,
    MatchKeys,
    MatchRange,
    Mutation,
    Predicate,
    Put,
    RecordPage,
    Stamp,
    StoredItem,
)
from prism.backends.memory.keyvalue import MemoryBackend
from prism.backends.postgres.keyvalue import PostgresBackend
from prism.backends.postgres.options import PostgresKeyValueOptions
from prism.backends.redis.keyvalue import RedisBackend
from prism.backends.sqlite.keyvalue import SqliteBackend
from prism.backends.sqlite.options import SqliteOptions
from prism.errors import InvalidArgument
from tests.pg import DSN, drop_tables
from tests.rd import delete_keys, new_backend

pytestmark = pytest.mark.services("postgres", "redis")

T = TypeVar("T")

IDS = ["a", "b", "é"]
KEYS = [b"\x00", b"a", b"ab", b"\x7f", b"\x80", b"\xff"]
TOKENS = ["", "", "t1", "t2"]
START_MS = 1_000_000
TOMBSTONE_TTL_MS = 4  # a few ticks: tombstones come and go within an example


# -- the model -----------------------------------------------------------------


class _Stored:
    """What a key holds: an item, or a delete's tombstone (``value`` None,
    ``expires_at_ms`` when it is forgotten)."""

    def __init__(self, value: bytes | None, expires_at_ms: int, stamp: tuple[int, str]) -> None:
        self.value, self.expires_at_ms, self.stamp = value, expires_at_ms, stamp

    def current(self, now_ms: int) -> bool:
        return self.expires_at_ms == 0 or self.expires_at_ms > now_ms

    def live(self, now_ms: int) -> bool:
        return self.value is not None and self.current(now_ms)


def _matches(predicate: Predicate, key: bytes) -> bool:
    if isinstance(predicate, MatchKeys):
        return key in predicate.keys
    if isinstance(predicate, MatchRange):
        return key >= predicate.start and (not predicate.end or key < predicate.end)
    return True


class Model:
    """The contract, as directly as it can be written: no indexes, no purging."""

    def __init__(self) -> None:
        self.records: dict[str, dict[bytes, _Stored]] = {}
        # Range tombstones: id -> (start, end) -> (stamp, forgotten at).
        self.ranges: dict[str, dict[tuple[bytes, bytes], tuple[tuple[int, str], int]]] = {}
        self.applied: dict[tuple[str, str], int] = {}
        self.deletes: list[tuple[str, Stamp]] = []  # (id, stamp) of every delete applied

    def _begin(self, id: str, stamp: Stamp, now_ms: int) -> bool:
        at = self.applied.get((id, stamp.token))
        return not (stamp.token and at is not None and now_ms - at < IDEMPOTENCY_WINDOW_MS)

    def _end(self, id: str, stamp: Stamp, now_ms: int) -> None:
        if stamp.token:
            self.applied[(id, stamp.token)] = now_ms

    def _put(self, id: str, item: ItemWrite, stamp: Stamp, now_ms: int) -> None:
        new = (stamp.generation_time_us, stamp.token)
        old = self.records.setdefault(id, {}).get(item.key)
        if old is not None and old.current(now_ms) and old.stamp > new:
            return
        for (start, end), (at, forget_at) in self.ranges.get(id, {}).items():
            if at > new and forget_at > now_ms and _matches(MatchRange(start, end), item.key):
                return
        self.records[id][item.key] = _Stored(item.value, item.expires_at_ms, new)

    def _delete(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        new = (stamp.generation_time_us, stamp.token)
        rec = self.records.setdefault(id, {})
        forget_at = now_ms + TOMBSTONE_TTL_MS
        self.deletes.append((id, stamp))
        if isinstance(predicate, MatchKeys):
            for key in set(predicate.keys):
                old = rec.get(key)
                if old is None or not old.current(now_ms) or old.stamp <= new:
                    rec[key] = _Stored(None, forget_at, new)
            return
        for key in [k for k, s in rec.items() if _matches(predicate, k)]:
            if rec[key].stamp <= new:
                del rec[key]
        span = (predicate.start, predicate.end) if isinstance(predicate, MatchRange) else (b"", b"")
        ranges = self.ranges.setdefault(id, {})
        old_range = ranges.get(span)
        if old_range is None or old_range[0] <= new or old_range[1] <= now_ms:
            ranges[span] = (new, forget_at)

    def mutate(self, id: str, mutations: list[Mutation], stamp: Stamp, now_ms: int) -> None:
        if any(isinstance(m, Put) and not m.item.key for m in mutations):
            raise InvalidArgument("empty key")
        if not self._begin(id, stamp, now_ms):
            return
        for m in mutations:
            if isinstance(m, Put):
                self._put(id, m.item, stamp, now_ms)
            else:
                self._delete(id, m.predicate, stamp, now_ms)
        self._end(id, stamp, now_ms)

    def live_items(self, id: str, now_ms: int) -> list[StoredItem]:
        rec = self.records.get(id, {})
        return [StoredItem(k, rec[k].value, rec[k].expires_at_ms) for k in sorted(rec) if rec[k].live(now_ms)]

    def get(
        self,
        id: str,
        predicate: Predicate,
        reverse: bool,
        after: bytes | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> ItemPage:
        items = [i for i in self.live_items(id, now_ms) if _matches(predicate, i.key)]
        if reverse:
            items.reverse()
        if after is not None:
            items = [i for i in items if (i.key < after if reverse else i.key > after)]
        page: list[StoredItem] = []
        for item in items:
            size = sum(len(i.key) + len(i.value) for i in [*page, item])
            if page and (len(page) == limit_items or size > limit_bytes):
                return ItemPage(page, page[-1].key)
            page.append(item)
        return ItemPage(page, None)

    def scan(self, after: str | None, limit_items: int, limit_bytes: int, now_ms: int) -> RecordPage:
        records = [(id, self.live_items(id, now_ms)) for id in sorted(self.records)]
        records = [(id, items) for id, items in records if items and (after is None or id > after)]
        page: list[tuple[str, list[StoredItem]]] = []
        for record in records:
            taken = [i for _, items in [*page, record] for i in items]
            too_big = sum(len(i.key) + len(i.value) for i in taken) > limit_bytes
            if page and (len(taken) > limit_items or too_big):
                return RecordPage(page, page[-1][0])
            page.append(record)
        return RecordPage(page, None)


# -- strategies --------------------------------------------------------------

keys = st.sampled_from(KEYS)
predicates: st.SearchStrategy[Predicate] = st.one_of(
    st.just(MatchAll()),
    st.builds(MatchKeys, st.lists(st.sampled_from([*KEYS, b"zz"]), max_size=4).map(tuple)),
    st.builds(MatchRange, st.sampled_from([b"", *KEYS]), st.sampled_from([b"", *KEYS])),
)
stamps = st.builds(Stamp, st.integers(0, 3), st.sampled_from(TOKENS))
ttls = st.one_of(st.just(None), st.integers(-1, 6))  # None: never expires
values = st.binary(max_size=4)


@st.composite
def item_writes(draw: st.DrawFn, allow_empty_key: bool = False) -> tuple[bytes, bytes, int | None]:
    key = draw(st.sampled_from([b"", *KEYS]) if allow_empty_key else keys)
    return key, draw(values), draw(ttls)


# -- the machine ---------------------------------------------------------------

Backend = MemoryBackend | SqliteBackend | PostgresBackend | RedisBackend
BIG = 1 << 30


async def _get_pages(
    backend: Backend, id: str, predicate: Predicate, reverse: bool, li: int, lb: int, now: int
) -> list[ItemPage]:
    pages: list[ItemPage] = []
    after = None
    while not pages or pages[-1].last_key is not None:
        pages.append(
            await backend.get_items(
                id,
                predicate,
                reverse=reverse,
                after=after,
                limit_items=li,
                limit_bytes=lb,
                now_ms=now,
            )
        )
        after = pages[-1].last_key
    return pages


async def _scan_pages(backend: Backend, li: int, lb: int, now: int) -> list[RecordPage]:
    pages: list[RecordPage] = []
    while not pages or pages[-1].last_id is not None:
        after = pages[-1].last_id if pages else None
        pages.append(await backend.scan_items(after=after, limit_items=li, limit_bytes=lb, now_ms=now))
    return pages


async def _records(backend: Backend, now: int) -> dict[str, list[StoredItem]]:
    return {id: (await _get_pages(backend, id, MatchAll(), False, BIG, BIG, now))[0].items for id in IDS}


class BackendMachine(RuleBasedStateMachine):
    """Runs in a worker thread of one trio loop (see the test below): each
    backend call is sent to the loop with ``trio.from_thread.run``, several
    times cheaper than a ``trio.run`` per call, which keeps shrinking quick."""

    def __init__(self) -> None:
        super().__init__()
        self.now = START_MS
        self.model = Model()
        self.tmp = Path(tempfile.mkdtemp(prefix="prism-model-"))
        ttl_s = TOMBSTONE_TTL_MS / 1000
        sqlite = SqliteBackend(
            SqliteOptions(synchronous="NORMAL", tombstone_ttl_s=ttl_s), data_dir=self.tmp, namespace="ns"
        )
        # Own tables per example; dropped at teardown.
        postgres = PostgresBackend(
            PostgresKeyValueOptions(dsn=DSN, tombstone_ttl_s=ttl_s),
            namespace=f"prism_test_{uuid.uuid4().hex}",
        )
        redis = new_backend(tombstone_ttl_s=ttl_s)  # own key prefix per example; keys deleted at teardown
        self.backends: list[Backend] = [MemoryBackend(ttl_s), sqlite, postgres, redis]
        for backend in self.backends:
            trio.from_thread.run(backend.open)

    def teardown(self) -> None:
        for backend in self.backends:
            trio.from_thread.run(backend.aclose)
            if isinstance(backend, PostgresBackend):
                drop_tables(backend)
            if isinstance(backend, RedisBackend):
                trio.from_thread.run(delete_keys, backend.key_prefix)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def each(self, afn: Callable[..., Awaitable[T]], *args: object) -> list[T]:
        return [trio.from_thread.run(afn, b, *args) for b in self.backends]

    def write(self, model_write: Callable[[], None], call: Callable[[Backend], Awaitable[None]]) -> None:
        try:
            model_write()
            expected = "ok"
        except InvalidArgument:
            expected = "invalid"

        async def attempt(backend: Backend) -> str:
            try:
                await call(backend)
            except InvalidArgument:
                return "invalid"
            return "ok"

        assert self.each(attempt) == [expected] * len(self.backends)

    def _items(self, drawn: list[tuple[bytes, bytes, int | None]]) -> list[ItemWrite]:
        return [ItemWrite(k, v, 0 if ttl is None else self.now + ttl) for k, v, ttl in drawn]

    @rule(id=st.sampled_from(IDS), drawn=st.lists(item_writes(True), max_size=4), stamp=stamps)
    def put(self, id: str, drawn: list[tuple[bytes, bytes, int | None]], stamp: Stamp) -> None:
        self._put(id, drawn, stamp)

    def _put(self, id: str, drawn: list[tuple[bytes, bytes, int | None]], stamp: Stamp) -> None:
        items, now = self._items(drawn), self.now
        self.write(
            lambda: self.model.mutate(id, [Put(i) for i in items], stamp, now),
            lambda b: b.put_items(id, items, stamp, now),
        )

    @rule(id=st.sampled_from(IDS), predicate=predicates, stamp=stamps)
    def delete(self, id: str, predicate: Predicate, stamp: Stamp) -> None:
        now = self.now
        self.write(
            lambda: self.model.mutate(id, [Delete(predicate)], stamp, now),
            lambda b: b.delete_items(id, predicate, stamp, now),
        )

    @rule(
        id=st.sampled_from(IDS),
        ops=st.lists(st.one_of(item_writes(True), predicates), max_size=4),
        stamp=stamps,
    )
    def mutate(self, id: str, ops: list[tuple[bytes, bytes, int | None] | Predicate], stamp: Stamp) -> None:
        now = self.now
        muts: list[Mutation] = [
            Put(self._items([op])[0]) if isinstance(op, tuple) else Delete(op) for op in ops
        ]
        self.write(
            lambda: self.model.mutate(id, muts, stamp, now),
            lambda b: b.mutate_items(id, muts, stamp, now),
        )

    @precondition(lambda self: self.model.deletes)
    @rule(data=st.data(), drawn=st.lists(item_writes(), min_size=1, max_size=3))
    def late_put(self, data: st.DataObject, drawn: list[tuple[bytes, bytes, int | None]]) -> None:
        # A put stamped just before a delete already applied (a retried or
        # hedged write arriving late): a no-op while the delete's tombstone lasts.
        id, deleted = data.draw(st.sampled_from(self.model.deletes[-4:]))
        stamp = Stamp(deleted.generation_time_us - data.draw(st.sampled_from([0, 1])), "")
        if stamp.generation_time_us >= 0:
            self._put(id, drawn, stamp)

    @rule(
        id=st.sampled_from(IDS),
        predicate=predicates,
        reverse=st.booleans(),
        limit_items=st.integers(1, 4),
        limit_bytes=st.integers(1, 12),
    )
    def get_all_pages(
        self, id: str, predicate: Predicate, reverse: bool, limit_items: int, limit_bytes: int
    ) -> None:
        want: list[ItemPage] = []
        while not want or want[-1].last_key is not None:
            after = want[-1].last_key if want else None
            want.append(self.model.get(id, predicate, reverse, after, limit_items, limit_bytes, self.now))
        got = self.each(_get_pages, id, predicate, reverse, limit_items, limit_bytes, self.now)
        assert got == [want] * len(self.backends)

    @rule(limit_items=st.integers(1, 8), limit_bytes=st.integers(1, 30))
    def scan_all_pages(self, limit_items: int, limit_bytes: int) -> None:
        want: list[RecordPage] = []
        while not want or want[-1].last_id is not None:
            after = want[-1].last_id if want else None
            want.append(self.model.scan(after, limit_items, limit_bytes, self.now))
        got = self.each(_scan_pages, limit_items, limit_bytes, self.now)
        assert got == [want] * len(self.backends)

    @rule(ms=st.sampled_from([0, 1, 2, 3, 5]))
    def tick(self, ms: int) -> None:
        self.now += ms

    @precondition(lambda self: self.model.applied)
    @rule(ms=st.sampled_from([IDEMPOTENCY_WINDOW_MS - 1, IDEMPOTENCY_WINDOW_MS]))
    def jump_to_window_end(self, ms: int) -> None:
        # Lands just inside or just past the window of the latest token;
        # never back in time (purges assume a clock that does not go back).
        self.now = max(self.now, max(self.model.applied.values()) + ms)

    @invariant()
    def whole_records_agree(self) -> None:
        want = {id: self.model.live_items(id, self.now) for id in IDS}
        assert self.each(_records, self.now) == [want] * len(self.backends)


SETTINGS = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.trio
async def test_backends_agree_with_model() -> None:
    # Hypothesis drives the machine synchronously from a worker thread; the
    # backends (and SQLite's own threads) run on this test's trio loop.
    await trio.to_thread.run_sync(
        functools.partial(run_state_machine_as_test, BackendMachine, settings=SETTINGS)
    )
