"""The retry queue's batches (prism/migrate/retry.py): a lane delivers the puts
at its head in one ``put_batch`` to a backend that takes them
(``BatchWritable``), keeping each record's writes in order, each write's
stamp and token, and every write through failures.

Over in-memory backends, with trio's MockClock; PostgreSQL's own
``put_batch`` is checked in tests/integration/test_migratable_contract.py."""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial

import pytest
import trio
import trio.testing

from prism.backends.keyvalue import (
    BatchWritable,
    ItemWrite,
    MatchAll,
    MatchKeys,
    Predicate,
    Stamp,
    StampedItem,
)
from prism.backends.memory.keyvalue import MemoryBackend
from prism.errors import InvalidArgument, Unavailable
from prism.migrate.dual import MigratingKeyValue
from prism.migrate.journal import QueuedWrite
from prism.migrate.retry import PendingWrite, RetryQueue
from tests.unit.test_migration_dual import dump, state

NOW = 1_700_000_000_000
BIG = 1 << 30


class Batching(MemoryBackend):
    """A memory backend that takes batches: logs what each call delivered
    (``["a", "b"]`` for a batch or a put, ``["del:a"]`` for a delete); can fail
    its next calls (down), or refuse any write holding a given value."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.down_for = 0  # the next calls that fail as a backend down does
        self.refuse: bytes | None = None

    def _gate(self, what: list[str], values: Sequence[bytes]) -> None:
        if self.down_for:
            self.down_for -= 1
            raise Unavailable("backend down")
        if self.refuse is not None and self.refuse in values:
            raise InvalidArgument("value refused")
        self.calls.append(what)

    async def put_batch(self, puts: Sequence[tuple[str, Sequence[ItemWrite], Stamp]], now_ms: int) -> None:
        assert len({id for id, _, _ in puts}) == len(puts)
        self._gate([id for id, _, _ in puts], [i.value for _, items, _ in puts for i in items])
        for id, items, stamp in puts:
            await super().put_items(id, items, stamp, now_ms)

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        self._gate([id], [i.value for i in items])
        await super().put_items(id, items, stamp, now_ms)

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        self._gate([f"del:{id}"], [])
        await super().delete_items(id, predicate, stamp, now_ms)


def put(id: str, value: bytes, t: int, token: str = "") -> QueuedWrite:
    return QueuedWrite("put", id, Stamp(t, token), items=(ItemWrite(b"k", value),))


def delete(id: str, t: int) -> QueuedWrite:
    return QueuedWrite("delete", id, Stamp(t), predicate=MatchKeys((b"k",)))


async def apply_in_order(writes: Sequence[QueuedWrite]) -> list[tuple[str, list[StampedItem]]]:
    """What a backend holds after ``writes`` one by one, in order."""
    reference = MemoryBackend()
    for write in writes:
        await write.apply(reference, NOW)
    return await dump(reference)


async def delivered(queue: RetryQueue, backend: MemoryBackend, writes: Sequence[QueuedWrite]) -> None:
    """Queue ``writes`` and let the queue deliver them all to ``backend``."""
    for write in writes:
        assert queue.push(PendingWrite(write.id, write.nbytes, write))
    async with trio.open_nursery() as nursery:

        async def ready() -> None:
            pass

        nursery.start_soon(
            partial(queue.drain, rand=random.Random(1).random), lambda: backend, ready, lambda: NOW
        )
        with trio.fail_after(600):
            await queue.wait_empty()
        nursery.cancel_scope.cancel()


WRITES = [
    put("a", b"a1", 10),
    put("b", b"b1", 11),
    put("c", b"c1", 12),
    put("a", b"a2", 13),  # a's second write: a batch of its own, after a's first
    delete("b", 14),  # not a put: alone
    put("b", b"b-old", 9),  # older than the delete: its tombstone keeps it out
    put("d", b"d1", 15),
]


def test_the_backends_that_take_batches() -> None:
    assert isinstance(Batching(), BatchWritable)
    assert not isinstance(MemoryBackend(), BatchWritable)


async def test_a_lane_batches_the_puts_at_its_head_keeping_each_records_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = Batching()
    queue = RetryQueue("t", lanes=1)
    await delivered(queue, target, WRITES)
    assert target.calls == [["a", "b", "c"], ["a"], ["del:b"], ["b", "d"]]
    assert await dump(target) == await apply_in_order(WRITES)
    assert queue.delivered == len(WRITES) and len(queue) == 0 and queue.nbytes == 0


async def test_a_batch_keeps_the_stamp_rule_and_skips_a_replayed_token_per_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = Batching()
    await target.put_items("a", [ItemWrite(b"k", b"newer")], Stamp(100), NOW)
    await target.put_items("b", [ItemWrite(b"k", b"first")], Stamp(5, "tok"), NOW)
    target.calls.clear()
    writes = [
        put("a", b"older", 50),  # loses to the stored newer item
        put("b", b"replay", 60, "tok"),  # b's token was applied: skipped
        put("c", b"c1", 70, "tok"),  # the same token on another record: applied
    ]
    await delivered(RetryQueue("t", lanes=1), target, writes)
    assert target.calls == [["a", "b", "c"]]
    got = {id: [(i.value, i.stamp_us) for i in items] for id, items in await dump(target)}
    assert got == {"a": [(b"newer", 100)], "b": [(b"first", 5)], "c": [(b"c1", 70)]}


async def test_a_failed_batch_is_tried_again_whole_and_loses_no_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = Batching()
    target.down_for = 3
    queue = RetryQueue("t", lanes=1)
    await delivered(queue, target, WRITES)
    assert target.down_for == 0 and target.calls[0] == ["a", "b", "c"]
    assert await dump(target) == await apply_in_order(WRITES)
    assert (queue.delivered, queue.dropped) == (len(WRITES), 0)


async def test_a_batch_refused_for_one_write_drops_that_one_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = Batching()
    target.refuse = b"b1"
    queue = RetryQueue("t", lanes=1, batch=5)
    writes = [
        put("a", b"a1", 1),
        put("b", b"b1", 2),
        put("c", b"c1", 3),
        put("d", b"d1", 4),
        put("e", b"e1", 5),
        put("f", b"f1", 6),
        put("g", b"g1", 7),
    ]
    await delivered(queue, target, writes)
    # The batch of five (at most) is refused; its writes then go one at a time: b is
    # refused and dropped alone, the others delivered; then batches again.
    assert target.calls == [["a"], ["c"], ["d"], ["e"], ["f", "g"]]
    assert (queue.delivered, queue.dropped) == (6, 1)
    assert sorted(id for id, _ in await dump(target)) == ["a", "c", "d", "e", "f", "g"]


async def test_a_migration_delivers_concurrent_writers_in_batches_and_both_agree(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source, target = MemoryBackend(), Batching()
    mkv = MigratingKeyValue("ns", source, target, state(), clock=lambda: NOW, rng=random.Random(1))
    await mkv.open()
    target.down_for = 1  # writes pile up behind the first delivery's backoff
    async with trio.open_nursery() as nursery:
        await nursery.start(mkv.run)

        async def writer(n: int) -> None:
            for i in range(20):
                await mkv.put_items(f"r{n}", [ItemWrite(b"k%d" % (i % 3), b"%d" % i)], Stamp(i + 1), NOW)
                if i == 10:
                    await mkv.delete_items(f"r{n}", MatchKeys((b"k0",)), Stamp(i + 1), NOW)

        async with trio.open_nursery() as writers:
            for n in range(16):
                writers.start_soon(writer, n)
        with trio.fail_after(600):
            await mkv.settled()
        nursery.cancel_scope.cancel()
    await mkv.aclose()
    assert max(len(call) for call in target.calls) > 1  # batches were made
    assert await dump(target) == await dump(source)
    page = await target.get_items(
        "r3", MatchAll(), reverse=False, after=None, limit_items=BIG, limit_bytes=BIG, now_ms=NOW
    )
    assert [(i.key, i.value) for i in page.items] == [(b"k0", b"18"), (b"k1", b"19"), (b"k2", b"17")]


async def test_a_trickle_of_writes_is_batched_after_a_short_linger(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = Batching()
    queue = RetryQueue("t", lanes=1)
    assert queue.linger == 0.02
    async with trio.open_nursery() as nursery:

        async def ready() -> None:
            pass

        nursery.start_soon(queue.drain, lambda: target, ready, lambda: NOW)
        for i in range(10):  # a write every 6 ms
            write = put(f"r{i}", b"v", i + 1)
            queue.push(PendingWrite(write.id, write.nbytes, write))
            await trio.sleep(0.006)
        await queue.wait_empty()
        assert trio.current_time() == pytest.approx(0.048 + 0.02)  # the last batch: 20 ms after its first
        nursery.cancel_scope.cancel()
    assert target.calls == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"], ["r8", "r9"]]


async def test_a_queue_cleared_while_a_lane_lingers_goes_on_delivering(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = Batching()
    queue = RetryQueue("t", lanes=1)
    async with trio.open_nursery() as nursery:

        async def ready() -> None:
            pass

        nursery.start_soon(queue.drain, lambda: target, ready, lambda: NOW)
        write = put("r0", b"v", 1)
        queue.push(PendingWrite(write.id, write.nbytes, write))
        await trio.sleep(0.01)  # the lane lingers for the writes that follow
        assert queue.clear() == 1  # the backend let go (abort, finish) meanwhile
        await trio.sleep(0.05)
        write = put("r1", b"v", 2)
        queue.push(PendingWrite(write.id, write.nbytes, write))
        await queue.wait_empty()  # the lane lives on (it raised IndexError at the empty lane)
        nursery.cancel_scope.cancel()
    assert target.calls == [["r1"]]


async def test_a_backend_that_takes_no_batches_gets_each_write_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = MemoryBackend()
    queue = RetryQueue("t", lanes=1)
    t0 = trio.current_time()
    await delivered(queue, target, WRITES)
    assert trio.current_time() == t0 and await dump(target) == await apply_in_order(WRITES)
