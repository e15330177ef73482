"""The forward bus: calls and answers between workers' buses over ipc:// sockets
in a temporary directory, all in this process (no worker processes)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pynng
import pytest
import trio
import trio.testing

from prism.errors import DeadlineExceeded, StatusCode, Unavailable
from prism.router.forward import ForwardBus, Handler, Moved, RemoteStatus
from prism.router.messages import ForwardAnswer, ForwardCall, Forwarded
from prism.router.table import WorkerEntry

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Forwarded])


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    # Short: a Unix socket path must fit in about 100 bytes.
    path = Path(tempfile.mkdtemp(prefix="pfwd", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def owner(address: str, wid: int = 2) -> WorkerEntry:
    return WorkerEntry(id=wid, tenant="b", pid=0, forward_address=address, handoff_address="", serving=True)


async def no_calls(call: ForwardCall) -> ForwardAnswer:
    raise AssertionError(f"unexpected call {call}")


@asynccontextmanager
async def running(address: str, handle: Handler = no_calls) -> AsyncIterator[ForwardBus]:
    bus = ForwardBus(address, handle)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            yield bus
            nursery.cancel_scope.cancel()
    finally:
        bus.close()


async def test_a_call_is_forwarded_and_its_answer_returned(ipc_dir: Path) -> None:
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"
    seen: list[ForwardCall] = []

    async def reverse(call: ForwardCall) -> ForwardAnswer:
        seen.append(call)
        return ForwardAnswer(call.id, StatusCode.OK, "", call.payload[::-1])

    metadata: list[tuple[str, str | bytes]] = [("x-user", "alice"), ("x-raw-bin", b"\x00\xff")]
    async with running(a) as sender, running(b, reverse):
        with trio.fail_after(5):
            answer = await sender.forward([owner(b)], b"/s.S/M", b"abc", metadata, math.inf)
    assert answer == b"cba"
    [call] = seen
    assert (call.path, call.payload, call.reply_to, call.timeout_s) == (b"/s.S/M", b"abc", a, None)
    assert [tuple(m) for m in call.metadata] == metadata


@pytest.mark.parametrize(("moved", "raised"), [(False, RemoteStatus), (True, Moved)], ids=["error", "moved"])
async def test_a_non_ok_answer_is_raised_with_its_status(
    ipc_dir: Path, moved: bool, raised: type[RemoteStatus]
) -> None:
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"

    async def refuse(call: ForwardCall) -> ForwardAnswer:
        return ForwardAnswer(call.id, StatusCode.NOT_FOUND, "no such record", b"", moved=moved)

    async with running(a) as sender, running(b, refuse):
        with trio.fail_after(5), pytest.raises(RemoteStatus) as info:
            await sender.forward([owner(b)], b"/s.S/M", b"", [], math.inf)
    assert type(info.value) is raised
    assert (info.value.grpc_status, str(info.value)) == (StatusCode.NOT_FOUND, "no such record")


async def test_a_call_to_an_owner_that_stops_serving_fails_at_once(ipc_dir: Path) -> None:
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"
    arrived = trio.Event()

    async def hang(call: ForwardCall) -> ForwardAnswer:
        arrived.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with running(a) as sender, running(b, hang):

        async def owner_goes() -> None:
            await arrived.wait()
            sender.owners_gone({3})  # worker 2 is no longer among the serving workers

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner_goes)
            # Well before DEFAULT_FORWARD_TIMEOUT_S (30 s): the routing table said so.
            with (
                trio.fail_after(5),
                pytest.raises(Unavailable, match="worker 2 of tenant 'b' did not answer"),
            ):
                await sender.forward([owner(b)], b"/s.S/M", b"", [], math.inf)


async def test_owners_still_serving_keep_their_calls(ipc_dir: Path) -> None:
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"
    arrived, release = trio.Event(), trio.Event()

    async def slow(call: ForwardCall) -> ForwardAnswer:
        arrived.set()
        await release.wait()
        return ForwardAnswer(call.id, StatusCode.OK, "", b"late but fine")

    async with running(a) as sender, running(b, slow):

        async def table_moves_on() -> None:
            await arrived.wait()
            sender.owners_gone({2, 3})  # worker 2 still serves
            release.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(table_moves_on)
            with trio.fail_after(5):
                assert await sender.forward([owner(b)], b"/s.S/M", b"", [], math.inf) == b"late but fine"


async def test_no_serving_owner_is_unavailable() -> None:
    bus = ForwardBus("ipc:///nonexistent/never-bound", no_calls)
    draining = WorkerEntry(
        id=2, tenant="b", pid=0, forward_address="ipc:///x", handoff_address="", serving=False
    )
    with pytest.raises(Unavailable, match="no worker of the owning tenant is serving"):
        await bus.forward([draining], b"/s.S/M", b"", [], math.inf)


async def test_the_callers_deadline_bounds_the_wait(
    ipc_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"

    async def hang(call: ForwardCall) -> ForwardAnswer:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with running(a) as sender, running(b, hang):
        start = trio.current_time()
        with pytest.raises(DeadlineExceeded):
            await sender.forward([owner(b)], b"/s.S/M", b"", [], start + 2.0)
        assert trio.current_time() - start == pytest.approx(2.0)
        # A deadline already past is refused before anything is sent.
        with pytest.raises(DeadlineExceeded):
            await sender.forward([owner(b)], b"/s.S/M", b"", [], trio.current_time())


async def test_calls_for_one_peer_in_one_scheduling_batch_share_one_message(ipc_dir: Path) -> None:
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"
    answers: dict[int, bytes] = {}
    async with running(a) as sender:
        with pynng.Pull0(listen=b) as peer_in, pynng.Push0(dial=a) as peer_out:

            async def one(n: int) -> None:
                answers[n] = await sender.forward([owner(b)], b"/s.S/M", b"%d" % n, [], math.inf)

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    for n in range(5):
                        nursery.start_soon(one, n)
                    batch = _decoder.decode(await peer_in.arecv())
                    assert all(isinstance(c, ForwardCall) for c in batch)
                    assert sorted(c.payload for c in batch) == [b"0", b"1", b"2", b"3", b"4"]  # type: ignore[union-attr]
                    # The answers come back in one message too; each finds its caller.
                    await peer_out.asend(
                        _encoder.encode([ForwardAnswer(c.id, 0, "", c.payload + b"!") for c in batch])  # type: ignore[union-attr]
                    )
    assert answers == {n: b"%d!" % n for n in range(5)}


async def test_an_undecodable_message_is_dropped_and_the_bus_goes_on(
    ipc_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"
    caplog.set_level(logging.WARNING, logger="prism.forward")

    async def echo(call: ForwardCall) -> ForwardAnswer:
        return ForwardAnswer(call.id, StatusCode.OK, "", call.payload)

    async with running(a) as sender, running(b, echo):
        with pynng.Push0(dial=b) as stranger:
            await stranger.asend(b"\xc1 not msgpack")
            # An answer to a call nobody is waiting for (one that gave up) is ignored too.
            await stranger.asend(_encoder.encode([ForwardAnswer(999, 0, "", b"")]))
            with trio.fail_after(5):
                while "undecodable forwarded message dropped" not in caplog.text:
                    await trio.sleep(0.01)
                assert (
                    await sender.forward([owner(b)], b"/s.S/M", b"still here", [], math.inf) == b"still here"
                )


# -- post: a call sent without a task waiting for it (forward_now) -----------


async def test_a_posted_call_is_answered_through_its_callback(ipc_dir: Path) -> None:
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"

    async def reverse(call: ForwardCall) -> ForwardAnswer:
        return ForwardAnswer(call.id, StatusCode.OK, "", call.payload[::-1])

    got: list[ForwardAnswer | None] = []
    done = trio.Event()

    def answered(answer: ForwardAnswer | None) -> None:
        got.append(answer)
        done.set()

    async with running(a) as sender, running(b, reverse):
        assert sender.post([owner(b)], b"/s.S/M", b"abc", [], math.inf, None, answered)
        with trio.fail_after(5):
            await done.wait()
    [answer] = got
    assert answer is not None and (answer.status, answer.payload) == (StatusCode.OK, b"cba")


@pytest.mark.parametrize("deadline_s", [2.0, math.inf], ids=["deadline", "no_deadline"])
async def test_a_posted_call_with_no_answer_is_given_up_at_its_deadline_or_the_default(
    ipc_dir: Path, autojump_clock: trio.testing.MockClock, deadline_s: float
) -> None:
    from prism.router.forward import DEFAULT_FORWARD_TIMEOUT_S

    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"

    async def hang(call: ForwardCall) -> ForwardAnswer:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    given_up: list[float] = []
    done = trio.Event()

    def answered(answer: ForwardAnswer | None) -> None:
        assert answer is None
        given_up.append(trio.current_time())
        done.set()

    async with running(a) as sender, running(b, hang):
        start = trio.current_time()
        assert sender.post([owner(b)], b"/s.S/M", b"", [], start + deadline_s, None, answered)
        await done.wait()
    expected = deadline_s if deadline_s < DEFAULT_FORWARD_TIMEOUT_S else DEFAULT_FORWARD_TIMEOUT_S
    assert given_up == [pytest.approx(start + expected)]


async def test_posting_refuses_when_no_owner_serves_or_the_deadline_passed(ipc_dir: Path) -> None:
    bus = ForwardBus(f"ipc://{ipc_dir}/a", no_calls)
    draining = WorkerEntry(
        id=2, tenant="b", pid=0, forward_address="ipc:///x", handoff_address="", serving=False
    )
    assert not bus.post([draining], b"/s.S/M", b"", [], math.inf, None, lambda answer: None)
    assert not bus.post(
        [owner("ipc:///x")], b"/s.S/M", b"", [], trio.current_time(), None, lambda answer: None
    )


async def test_a_posted_call_to_an_owner_that_stops_serving_is_given_up_at_once(ipc_dir: Path) -> None:
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"
    arrived = trio.Event()

    async def hang(call: ForwardCall) -> ForwardAnswer:
        arrived.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    got: list[ForwardAnswer | None] = []
    async with running(a) as sender, running(b, hang):
        assert sender.post([owner(b)], b"/s.S/M", b"", [], math.inf, None, got.append)
        with trio.fail_after(5):
            await arrived.wait()
        sender.owners_gone({3})
        assert got == [None]


async def test_answered_posts_do_not_pile_up_until_their_give_up_time(ipc_dir: Path) -> None:
    # Each post's give-up time goes in a heap; an answered call's entry stays
    # until its time (30 s without a deadline) unless the heap is trimmed.
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"

    async def echo(call: ForwardCall) -> ForwardAnswer:
        return ForwardAnswer(call.id, StatusCode.OK, "", b"")

    answers = 0

    def answered(answer: ForwardAnswer | None) -> None:
        nonlocal answers
        answers += 1

    async with running(a) as sender, running(b, echo):
        with trio.fail_after(20):
            for n in range(1, 3001):
                assert sender.post([owner(b)], b"/s.S/M", b"", [], math.inf, None, answered)
                while answers < n:
                    await trio.sleep(0)
        assert len(sender._expiries) <= 2 * 1 + 1024 + 1


async def test_the_calls_being_answered_are_counted_for_a_draining_worker_to_wait_for(ipc_dir: Path) -> None:
    # A draining worker exits once its connections have closed and no
    # forwarded call is being answered (prism.workers.worker): one sent just
    # before its sender saw the drain is answered, not dropped.
    a, b = f"ipc://{ipc_dir}/a", f"ipc://{ipc_dir}/b"
    arrived, release = trio.Event(), trio.Event()

    async def slow(call: ForwardCall) -> ForwardAnswer:
        arrived.set()
        await release.wait()
        return ForwardAnswer(call.id, StatusCode.OK, "", b"done")

    got: list[ForwardAnswer | None] = []
    async with running(a) as sender, running(b, slow) as owner_bus:
        assert owner_bus.serving == 0
        assert sender.post([owner(b)], b"/s.S/M", b"", [], math.inf, None, got.append)
        with trio.fail_after(5):
            await arrived.wait()
            assert owner_bus.serving == 1
            release.set()
            while not got:
                await trio.sleep(0.001)
        assert owner_bus.serving == 0
    [answer] = got
    assert answer is not None and answer.payload == b"done"
