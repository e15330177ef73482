"""What is particular to the memory PubSub backend: its ``max_messages``
option, its bookkeeping, cancellation, and a model check. The contract itself
is in test_pubsub_contract.py. Tests that wait request ``autojump_clock``, so
pytest-trio runs them on a fake clock that jumps whenever every task waits."""

from __future__ import annotations

import math
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.backends import registry
from prism.backends.memory.pubsub import MemoryPubSubBackend
from prism.backends.pubsub import Message, Start, StartKind, Subscription
from prism.errors import ConfigError

EARLIEST = Start(StartKind.EARLIEST)
T = "t"


def make(**options: object) -> MemoryPubSubBackend:
    # Through the registry, from a plain table: as a worker builds it.
    backend = registry.create_pubsub("memory", options, data_dir=Path("/nonexistent"), namespace="ns")
    assert isinstance(backend, MemoryPubSubBackend)
    return backend


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0, "expected int >= 1"),
        (-1, "expected int >= 1"),
        (True, "expected int, got bool"),
        ("5", "expected int, got str"),
        (1.5, "expected int, got float"),
        (None, "expected int, got null"),
    ],
)
def test_bad_max_messages(value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(max_messages=value)
    assert str(info.value) == f"options.max_messages: {reason}"


def test_options_are_not_consumed_from_the_callers_mapping() -> None:
    options: dict[str, object] = {"ack_wait_ms": 10, "dedup_window_s": 0, "max_messages": 2}
    backend = registry.create_pubsub("memory", options, data_dir=Path("/nonexistent"), namespace="ns")
    assert isinstance(backend, MemoryPubSubBackend)
    assert (backend.ack_wait_s, backend.dedup_window_s, backend.max_messages) == (0.01, 0.0, 2)
    assert len(options) == 3


async def test_max_messages_drops_the_oldest(autojump_clock: trio.abc.Clock) -> None:
    ps = make(max_messages=3, ack_wait_ms=100)
    async with ps.subscribe(T, "g", EARLIEST) as sub:
        first = await ps.publish(T, b"1", {}, "")
        assert (await sub.receive()).sequence == first  # pending, not acknowledged
        sent = [await ps.publish(T, b"%d" % i, {}, "") for i in range(2, 7)]
        # the pending first message and the two after it were dropped: the
        # group goes on from the first retained one, and nothing is redelivered
        got = [(await sub.receive()).sequence for _ in range(3)]
        assert got == sent[-3:]
        await ps.ack(T, "g", got)
        with trio.move_on_after(1):
            pytest.fail(f"unexpected {await sub.receive()!r}")
    async with ps.subscribe(T, "", EARLIEST) as eph:
        assert [(await eph.receive()).payload for _ in range(3)] == [b"4", b"5", b"6"]
    assert len(ps._topics[T].log) == 3


async def test_dedup_map_is_purged(autojump_clock: trio.abc.Clock) -> None:
    ps = make(dedup_window_s=10)
    for i in range(5):
        await ps.publish(T, b"", {}, f"id{i}")
    await trio.sleep(10)
    assert await ps.publish(T, b"", {}, "new") == 6
    assert list(ps._topics[T].dedup) == ["new"]


async def test_zero_window_never_deduplicates() -> None:
    ps = make(dedup_window_s=0)
    assert [await ps.publish(T, b"", {}, "id") for _ in range(3)] == [1, 2, 3]


async def test_acks_leave_no_pending(autojump_clock: trio.abc.Clock) -> None:
    ps = make()
    async with ps.subscribe(T, "g", EARLIEST) as sub:
        for _ in range(3):
            await ps.publish(T, b"", {}, "")
        await ps.ack(T, "g", [(await sub.receive()).sequence for _ in range(3)])
    group = ps._topics[T].groups["g"]
    assert group.pending == {} and group.next_deadline() == float("inf") and group.due == []


@pytest.mark.parametrize("group", ["g", ""])
async def test_a_cancelled_receive_loses_nothing(autojump_clock: trio.abc.Clock, group: str) -> None:
    ps = make()
    got: list[Message] = []
    async with ps.subscribe(T, group, EARLIEST) as sub:

        async def receiver() -> None:
            got.append(await sub.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await ps.publish(T, b"x", {}, "")  # wakes the receiver ...
            nursery.cancel_scope.cancel()  # ... which is cancelled before it runs
        if not got:
            with trio.fail_after(0.1):  # less than ack_wait: not a redelivery
                got.append(await sub.receive())
        assert [m.payload for m in got] == [b"x"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.sampled_from(["", "a", "b"])),
            st.tuples(st.just("sleep"), st.sampled_from([0.25, 0.5, 1.0])),
            st.tuples(st.just("receive"), st.integers(0, 1)),
            st.tuples(st.just("ack"), st.integers(0, 1)),
            st.tuples(st.just("leave"), st.integers(0, 1)),
        ),
        max_size=40,
    )
)
def test_model(ops: list[tuple[str, object]]) -> None:
    """Random publishes, receives, acks, members leaving and time passing on
    one group of two members, against the contract: dedup within the window,
    one member at a time holds a delivery, redelivery only after ack_wait or
    when its member left, acked never again, and nothing lost in the end."""
    ack_wait, window = 1.0, 1.5

    async def run() -> None:
        ps = make(ack_wait_ms=int(ack_wait * 1000), dedup_window_s=window)
        ids: dict[str, tuple[int, float]] = {}
        published: list[int] = []
        acked: set[int] = set()
        held: dict[int, tuple[int, float]] = {}  # sequence -> (member, delivered at)
        last: dict[int, int] = {}  # member -> last sequence it received

        # members are plain subscription contexts entered and left by hand
        subs: dict[int, Subscription] = {}
        contexts: dict[int, AbstractAsyncContextManager[Subscription]] = {}

        async def join(m: int) -> None:
            cm = ps.subscribe(T, "g", EARLIEST)
            contexts[m] = cm
            subs[m] = await cm.__aenter__()

        async def leave(m: int) -> None:
            await contexts[m].__aexit__(None, None, None)
            for seq, (holder, _) in list(held.items()):
                if holder == m:
                    held[seq] = (-1, -math.inf)  # due at once
            await join(m)

        await join(0)
        await join(1)
        for op, arg in ops:
            now = trio.current_time()
            if op == "publish":
                assert isinstance(arg, str)
                seq = await ps.publish(T, b"", {}, arg)
                if arg and arg in ids and ids[arg][1] > now:
                    assert seq == ids[arg][0]
                else:
                    assert seq == len(published) + 1
                    published.append(seq)
                    if arg:
                        ids[arg] = (seq, now + window)
            elif op == "sleep":
                assert isinstance(arg, float)
                await trio.sleep(arg)
            elif op == "receive":
                assert isinstance(arg, int)
                unacked = [s for s in published if s not in acked]
                due = [s for s in unacked if s not in held or held[s][1] + ack_wait <= now]
                with trio.move_on_after(0.01):
                    msg = await subs[arg].receive()
                    seq = msg.sequence
                    assert seq in published and seq not in acked
                    if seq in held:  # a redelivery: due, or its member left
                        assert trio.current_time() >= held[seq][1] + ack_wait
                    held[seq] = (arg, trio.current_time())
                    last[arg] = seq
                    due = []
                assert not due, f"{due} deliverable, but nothing came"
            elif op == "ack":
                assert isinstance(arg, int)
                if arg in last:
                    await ps.ack(T, "g", [last[arg]])
                    acked.add(last[arg])
                    held.pop(last[arg], None)
            else:
                assert isinstance(arg, int)
                await leave(arg)
        # in the end every unacknowledged message comes (again)
        await leave(0)
        await leave(1)
        rest = set(published) - acked
        seen: set[int] = set()
        while seen != rest:
            with trio.fail_after(2 * ack_wait):
                msg = await subs[0].receive()
            assert msg.sequence in rest
            seen.add(msg.sequence)
            await ps.ack(T, "g", [msg.sequence])

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
