"""Spreading connections over a tenant's workers (``prism.rpc.accept_share``):
who may take the next connection, and how long a worker ahead of its siblings
leaves one to them, over real loopback sockets on trio's fake clock."""

from __future__ import annotations

import errno
import math
import socket

import pytest
import trio
import trio.testing

from prism.rpc.accept_share import CELLS, LEAVE_S, TABLE_BYTES, AcceptShare, forget
from prism.rpc.settings import ServerSettings

from .test_accept_limits import client_on, served, serving, settings_with


def table() -> bytearray:
    return bytearray(TABLE_BYTES)


def _beside_a_stalled_sibling() -> tuple[ServerSettings, AcceptShare]:
    """Worker 0's settings, sharing accepts with worker 1, which has joined the
    table and holds none and accepts none (stalled); and worker 1's share."""
    shared = table()
    settings = settings_with()
    settings.accept_share = AcceptShare(shared, 0)
    settings.accept_share.siblings = (1,)
    sibling = AcceptShare(shared, 1)
    sibling.join(0)
    return settings, sibling


def test_alone_a_worker_takes_every_connection() -> None:
    share = AcceptShare(table(), 0)
    assert share.may_take(1000)
    share.siblings = (0,)  # itself is no sibling
    assert share.siblings == () and share.may_take(1000)


def test_a_worker_takes_connections_while_it_holds_no_more_than_its_siblings() -> None:
    shared = table()
    one, two, three = AcceptShare(shared, 0), AcceptShare(shared, 1), AcceptShare(shared, 2)
    one.siblings = (0, 1, 2)
    two.join(3)
    three.join(5)
    assert one.may_take(3)  # as many as the fewest: its turn too
    assert not one.may_take(4)  # one ahead: the siblings' turn
    two.publish(4)
    assert one.may_take(4)


def test_in_a_storm_a_worker_takes_an_eighth_more_than_its_siblings_per_turn() -> None:
    shared = table()
    one, two = AcceptShare(shared, 0), AcceptShare(shared, 1)
    one.siblings = (1,)
    two.join(400)
    assert one.may_take(450) and not one.may_take(451)


def test_only_a_sibling_accepting_now_is_waited_for() -> None:
    shared = table()
    one, two = AcceptShare(shared, 0), AcceptShare(shared, 1)
    one.siblings = (1,)
    two.publish(0)  # booting: not accepting yet
    assert one.may_take(1)
    two.join(0)
    assert not one.may_take(1)  # the sibling holds 0
    two.leave()  # draining, stopping
    two.publish(0)  # a connection it still held closes
    assert two.held_by(1) is None and one.may_take(1)
    two.join(0)
    forget(shared, 1)  # died: the supervisor reaped it
    assert one.may_take(1)
    AcceptShare(shared, 1 + CELLS).join(0)  # a later worker in the same cell
    assert one.may_take(1)
    two.leave()  # not its cell any more: left as it is
    forget(shared, 1)
    assert two.held_by(1 + CELLS) == 0


async def test_a_worker_ahead_leaves_a_connection_to_its_siblings_for_a_while_then_takes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings, sibling = _beside_a_stalled_sibling()
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    async with serving(settings, listener):
        started = trio.current_time()
        first = await client_on(port)
        await served(first)  # as many as its sibling (0): taken at once
        assert trio.current_time() - started < LEAVE_S
        assert sibling.held_by(0) == 1  # published
        started = trio.current_time()
        second = await client_on(port)
        await served(second)  # one ahead: left to the sibling, then taken
        assert LEAVE_S <= trio.current_time() - started < 2 * LEAVE_S
        sibling.publish(5)
        started = trio.current_time()
        third = await client_on(port)
        await served(third)  # behind: taken at once
        assert trio.current_time() - started < LEAVE_S
        autojump_clock.autojump_threshold, autojump_clock.rate = math.inf, 1.0  # real time: closes to see
        await second.stream.aclose()
        with trio.fail_after(5):
            while sibling.held_by(0) != 2:
                await trio.sleep(0.01)
        await first.stream.aclose()
        await third.stream.aclose()
    assert sibling.held_by(0) is None  # stopped accepting: left the table


async def test_a_stalled_sibling_costs_a_burst_a_few_leave_s_in_all_not_one_per_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings, _ = _beside_a_stalled_sibling()
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    async with serving(settings, listener):
        held = await client_on(port)
        await served(held)  # its turn: taken at once
        started = trio.current_time()
        burst = [socket.create_connection(("127.0.0.1", port)) for _ in range(7)]  # loopback: at once
        with trio.fail_after(5):
            while settings.accepted < 8:
                await trio.sleep(LEAVE_S / 10)
        # Late once: this one and 1 more; twice: 1 and 3 more; thrice: the last.
        # Not all 7 after one LEAVE_S (a sibling slow to wake would lose the
        # whole burst), nor 7 LEAVE_S (one each).
        assert 2 * LEAVE_S <= trio.current_time() - started < 4 * LEAVE_S
        for sock in burst:
            sock.close()
        await held.stream.aclose()


async def test_a_connection_gone_before_it_was_taken_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    shared = table()
    settings = settings_with()
    settings.accept_share = AcceptShare(shared, 0)
    settings.accept_share.siblings = (1,)  # a sibling, not accepting: every turn is ours
    real_accept = socket.socket.accept
    aborted = []

    def accept_once_aborted(sock: socket.socket) -> tuple[socket.socket, object]:
        if not aborted:
            aborted.append(True)
            raise ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")
        return real_accept(sock)

    monkeypatch.setattr(socket.socket, "accept", accept_once_aborted)
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    async with serving(settings, listener):
        client = await client_on(port)
        await served(client)  # the accept loop went on
        await client.stream.aclose()
    assert aborted
