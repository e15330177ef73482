"""Refusals held a moment, to go out with their connection's next write (``prism.rpc.held``).

A read whose only output is calls refused as they were read is not written
at once: the refusals go out with the connection's next answer, or
``HOLD_S`` later. What is held must be refusals and nothing else (a window
update, a PING's ACK or an answer held would stall the client); what is
held must reach the client, by itself, within ``HOLD_S``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prism.config import NamespaceConfig, ServerConfig
from prism.config.quotas import OverloadConfig
from prism.errors import StatusCode
from prism.limits import Shedder
from prism.limits.shed import AHEAD_FLOOR
from prism.proto import kv_pb2
from prism.rpc.h2send import final_block
from prism.rpc.held import HOLD_S, Held
from prism.rpc.rest import LIMITED_REST_S
from prism.workers.app import App

from .h2client import H2Client, frame
from .test_arrival import over_tcp
from .test_plain_frames import ALL, PATHS, PLAIN, WARM_UP, action
from .test_quotas import PUT, put, refusal, table
from .test_refused_unheld import REFUSAL, RefusingRun
from .test_shedding import standing_queue_before_handlers

_REFUSAL_FRAME_END = b"\x01\x05"  # HEADERS, END_STREAM | END_HEADERS


def _only_refusals(queued: bytes) -> bool:
    """Whether ``queued`` is whole trailers-only refusal frames (``REFUSAL``), nothing else."""
    block = final_block(REFUSAL)
    pos = 0
    while pos < len(queued):
        head = queued[pos : pos + 9]
        if int.from_bytes(head[:3], "big") != len(block) or head[3:5] != _REFUSAL_FRAME_END:
            return False
        if queued[pos + 9 : pos + 9 + len(block)] != block:
            return False
        pos += 9 + len(block)
    return pos == len(queued) > 0


class HoldingRun(RefusingRun):
    """Whenever the server says that what it has queued is refusals alone, it is."""

    held = 0

    def compare(self) -> None:
        h2conn = self.fast._h2
        if self.fast.refusals_only:
            queued = b"".join(bytes(b) for b in h2conn._segments) + bytes(h2conn._data_to_send)
            assert _only_refusals(queued)
            self.held += 1
        super().compare()


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(action, min_size=10, max_size=80), refused=st.sets(st.integers(0, 7), min_size=1))
@example(refused={1, 3, 5, 7}, steps=[PLAIN] * 6 + [ALL])  # refusals beside answers, in one read
def test_output_said_to_be_refusals_alone_is_refusals_alone(
    steps: list[tuple[Any, ...]], refused: set[int]
) -> None:
    HoldingRun(refused).play(WARM_UP + steps)


def test_a_read_of_refusals_alone_may_be_held_and_one_with_an_answer_may_not() -> None:
    run = HoldingRun(set(range(8)))  # every request refused
    run.play(WARM_UP)
    for n in range(3):
        run.act(("request", PATHS[0], b"%d" % n, 0, None, None))
    run.deliver(0, everything=True)
    assert run.held == 1
    # Let in, a call's answer is queued beside the next refusal: not held.
    run.fast.shed = run.slow.shed = lambda headers: None
    run.act(PLAIN)
    run.deliver(0, everything=True)
    fast, slow = run.calls[-1]
    fast_refuse = iter([REFUSAL])
    run.fast.shed = run.slow.shed = lambda headers: next(fast_refuse, REFUSAL)
    run.fast.send_unary(fast, b"\x00\x00\x00\x00\x00")
    run.slow.send_unary(slow, b"\x00\x00\x00\x00\x00")
    run.act(PLAIN)
    run.deliver(0, everything=True)
    assert run.held == 1
    assert not run.fast.refusals_only  # (drained)


# ---------------------------------------------------------------- over TCP

LATE = OverloadConfig(enabled=True, target_delay_ms=50, interval_ms=100)
AHEAD = AHEAD_FLOOR + 1  # calls in flight ahead of a new one, with the door shut (door_shut)


@asynccontextmanager
async def held_over_tcp(app: App) -> AsyncIterator[H2Client]:
    """``test_arrival.over_tcp``, its refusals held as a listener's are."""
    held = app.settings.held = Held()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(held.run)
            async with over_tcp(app) as client:  # type: ignore[arg-type]  # (an App has a Server's settings)
                yield client
            nursery.cancel_scope.cancel()
    finally:
        app.settings.held = None


@asynccontextmanager
async def door_shut(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> AsyncIterator[tuple[H2Client, App]]:
    """A client over TCP of a worker whose listener holds refusals, whose
    door is shut, and whose calls in flight (more than ``AHEAD_FLOOR``, at
    10 ms each) keep a new call out (``prism.limits.shed``: the calls ahead
    of it; no kernel clock)."""
    app = App(ServerConfig(data_dir=str(tmp_path / "data"), overload=LATE))
    app.settings.admission.shedder = shedder = Shedder(LATE)
    await app.apply([NamespaceConfig("profiles", backend="memory")])
    try:
        async with held_over_tcp(app) as client:
            for _ in range(3):  # warm the HPACK cache: the puts are read plainly
                assert (await put(client, "profiles")).status == StatusCode.OK
            standing_queue_before_handlers(mock_clock, shedder, 0.2)  # sojourns of 200 ms
            shedder.refuses(0, trio.current_time())  # the decision: the door shuts
            assert shedder.shut
            shedder.call_s = 0.01
            app.settings.inflight += AHEAD
            yield client, app
            app.settings.inflight -= AHEAD
    finally:
        await app.aclose()


def _send_refused(client: H2Client) -> int:
    """A put the server refuses as it reads it (the door is shut: ``door_shut``)."""
    request = kv_pb2.PutItemsRequest(
        namespace="profiles", id="r", items=[kv_pb2.Item(key=b"k", value=b"lost")]
    )
    sid = client.queue_call(PUT, frame(request.SerializeToString()))
    assert isinstance(client.stream, trio.SocketStream)
    os.write(client.stream.socket.fileno(), client.conn.data_to_send())
    return sid


async def _nothing_came(client: H2Client) -> bool:
    """Whether the client's socket has nothing to read, once the server has acted."""
    for _ in range(3):
        time.sleep(0.01)  # real time: the virtual clock stays
        await trio.testing.wait_all_tasks_blocked()
    assert isinstance(client.stream, trio.SocketStream)
    with socket.fromfd(client.stream.socket.fileno(), socket.AF_INET, socket.SOCK_STREAM) as peek:
        try:
            peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
    return False


async def test_a_held_refusal_reaches_its_client_by_itself_after_the_hold(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with door_shut(tmp_path, mock_clock) as (client, app):
        start = trio.current_time()
        sid = _send_refused(client)
        assert await _nothing_came(client)  # refused, and held
        mock_clock.jump(HOLD_S * 0.9)
        assert await _nothing_came(client)
        mock_clock.jump(HOLD_S * 0.1)
        assert not await _nothing_came(client)  # written, by itself
        r = await client.wait(sid)
        assert (r.status, r.message) == (
            StatusCode.RESOURCE_EXHAUSTED,
            "worker overloaded: queueing delay above 50 ms; retry",
        )
        assert trio.current_time() == pytest.approx(start + HOLD_S)
        assert app.settings.admission.shedder.shut


async def test_a_held_refusal_goes_out_with_the_connections_next_answer(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with door_shut(tmp_path, mock_clock) as (client, app):
        start = trio.current_time()
        refused = _send_refused(client)
        assert await _nothing_came(client)
        app.settings.inflight -= AHEAD  # nothing ahead of the next call now: served
        try:
            assert (await put(client, "profiles")).status == StatusCode.OK
        finally:
            app.settings.inflight += AHEAD
        r = await client.wait(refused)  # (already in: no time has passed)
        assert r.status == StatusCode.RESOURCE_EXHAUSTED
        assert trio.current_time() == start


async def test_a_read_a_quota_refused_is_written_at_once(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # Its connection rests (prism.rpc.rest), and resting connections' reads
    # take turns 2 ms apart, so that a neighbour's call waits behind one of
    # them at most: held, their writes would all go at once, HOLD_S later.
    app = App(ServerConfig(data_dir=str(tmp_path / "data")))
    await app.apply([NamespaceConfig(n, backend="memory") for n in ("profiles", "neighbour")])
    app.apply_limits("t", table({"profiles": {"rps": 0.1, "burst": 1}}))
    try:
        async with held_over_tcp(app) as client:
            for _ in range(3):  # warm the HPACK cache: the puts are read plainly
                assert (await put(client, "neighbour")).status == StatusCode.OK
            assert (await put(client, "profiles")).status == StatusCode.OK  # the burst
            assert refusal(await put(client, "profiles"))[0] == StatusCode.RESOURCE_EXHAUSTED
            mock_clock.jump(LIMITED_REST_S)  # the rest it earned
            start = trio.current_time()
            # Refused as it is read now (the connection's quota check), its
            # request whole in the read: by send_refusal, as the door's are.
            request = kv_pb2.PutItemsRequest(namespace="profiles", id="r", items=[kv_pb2.Item(key=b"k")])
            sid = await client.start_call(PUT, frame(request.SerializeToString()))
            assert not await _nothing_came(client)  # written at once
            r = await client.wait(sid)
            assert refusal(r)[:2] == (
                StatusCode.RESOURCE_EXHAUSTED,
                'namespace "profiles": rps limit 0.1 exceeded',
            )
            assert trio.current_time() == start
    finally:
        await app.aclose()
