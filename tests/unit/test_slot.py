"""A worker slot's lifecycle table, and the restart backoff."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.workers.slot import (
    ACTIVE,
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    RUNNING,
    STABLE_AFTER_S,
    TABLE,
    Action,
    IllegalTransition,
    Slot,
    SlotEvent,
    SlotState,
    exit_event,
    restart_delay,
)
from prism.workers.spec import EXIT_BOOT_FAILED

S, E, A = SlotState, SlotEvent, Action
PAIRS = list(itertools.product(SlotState, SlotEvent))
# What a worker process can make happen on its own, whatever the supervisor thinks of it.
FROM_THE_WORKER = (E.BEAT, E.BEAT_SERVING, E.BOOT_FAILED, E.EXITED)
FINAL = {S.STOPPED, S.GONE}


# -- the table ---------------------------------------------------------------


@settings(max_examples=500)
@given(st.sampled_from(SlotState), st.sampled_from(SlotEvent))
def test_an_event_moves_a_slot_where_the_table_says_or_raises(state: SlotState, event: SlotEvent) -> None:
    slot = Slot(7, "t", None, state=state)
    if (state, event) in TABLE:
        action, next_state = TABLE[state, event]
        assert slot.handle(event) is action
        assert slot.state is next_state
    else:
        expected = f"slot 7: no transition from {state.name} on {event.name}"
        with pytest.raises(IllegalTransition, match=expected):
            slot.handle(event)
        assert slot.state is state  # an illegal event changes nothing


def test_no_worker_can_make_the_supervisor_raise() -> None:
    """Heartbeats, boot-failure reports and exits are handled in every state with a process."""
    missing = [(s.name, e.name) for s in RUNNING for e in FROM_THE_WORKER if (s, e) not in TABLE]
    assert not missing


def test_a_process_starts_only_by_a_spawn_and_ends_only_by_an_exit() -> None:
    """So ``Slot.proc`` is set exactly in the RUNNING states: after SPAWN, until its exit is reaped."""
    for (state, event), (action, next_state) in TABLE.items():
        if state not in RUNNING and next_state in RUNNING:
            assert (action, next_state) == (A.SPAWN, S.BOOTING), (state, event)
        if action is A.SPAWN:
            assert state not in RUNNING, (state, event)
        if state in RUNNING and next_state not in RUNNING:
            assert event in (E.EXITED, E.EXITED_AT_BOOT), (state, event)
        if event in (E.EXITED, E.EXITED_AT_BOOT):
            assert state in RUNNING and next_state not in RUNNING, (state, event)
        if action in (A.TERM, A.KILL):
            assert state in RUNNING and next_state in RUNNING, (state, event)


def test_only_a_serving_heartbeat_makes_a_slot_serving() -> None:
    into_serving = {(s, e) for (s, e), (_, n) in TABLE.items() if n is S.SERVING and s is not S.SERVING}
    assert into_serving == {(S.BOOTING, E.BEAT_SERVING), (S.BOOTED, E.BEAT_SERVING)}


def test_a_worker_is_restarted_only_after_it_died_uninvited() -> None:
    restarts = {s for (s, _), (a, _) in TABLE.items() if a is A.RESTART}
    assert restarts == {S.BOOTING, S.BOOTED, S.SERVING}
    assert all(TABLE[s, E.EXITED] == (A.RESTART, S.WAITING) for s in restarts)
    # Retired or draining workers are never replaced.
    assert TABLE[S.RETIRING, E.EXITED] == (A.NONE, S.GONE)
    assert TABLE[S.DRAINING, E.EXITED] == (A.NONE, S.STOPPED)


def test_cannot_boot_means_an_exit_3_before_any_heartbeat_or_a_report() -> None:
    assert exit_event(S.BOOTING, EXIT_BOOT_FAILED) is E.EXITED_AT_BOOT
    assert exit_event(S.BOOTED, EXIT_BOOT_FAILED) is E.EXITED  # it had booted: a crash
    assert exit_event(S.SERVING, EXIT_BOOT_FAILED) is E.EXITED
    assert exit_event(S.BOOTING, 1) is E.EXITED
    assert exit_event(S.BOOTING, -9) is E.EXITED
    assert TABLE[S.BOOTING, E.EXITED_AT_BOOT] == (A.BOOT_FAILED, S.GONE)
    assert {s for (s, e) in TABLE if e is E.EXITED_AT_BOOT} == {S.BOOTING}
    # The report comes while the process still runs: it is not replaced meanwhile.
    assert TABLE[S.BOOTING, E.BOOT_FAILED] == (A.BOOT_FAILED, S.RETIRING)


def test_drain_reaches_every_slot_and_ends_in_stopped() -> None:
    for state in set(SlotState) - FINAL - {S.DRAINING}:
        action, next_state = TABLE[state, E.DRAIN]
        if state in RUNNING:
            assert (action, next_state) == (A.TERM, S.DRAINING), state
        else:
            assert (action, next_state) == (A.NONE, S.STOPPED), state
    # While draining, the only ways on are the exit and, when overdue, SIGKILL.
    assert {(e, t) for (s, e), t in TABLE.items() if s is S.DRAINING and t != (A.NONE, S.DRAINING)} == {
        (E.EXITED, (A.NONE, S.STOPPED)),
        (E.DRAIN_OVERDUE, (A.KILL, S.DRAINING)),
    }


def test_final_states_have_no_way_out_and_every_state_is_reachable() -> None:
    assert not [pair for pair in TABLE if pair[0] in FINAL]
    seen, frontier = {S.NEW}, [S.NEW]
    while frontier:
        state = frontier.pop()
        for (s, _), (_, n) in TABLE.items():
            if s is state and n not in seen:
                seen.add(n)
                frontier.append(n)
    assert seen == set(SlotState)


def test_active_slots_are_those_not_on_their_way_out() -> None:
    assert ACTIVE == {s for s in SlotState if (s, E.RETIRE) in TABLE}
    for state in ACTIVE:
        assert TABLE[state, E.RETIRE][1] in (S.RETIRING, S.GONE)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(SlotEvent), max_size=40))
def test_any_sequence_of_events_keeps_the_process_where_the_state_says(events: list[SlotEvent]) -> None:
    """A random walk with a pretend process: it exists exactly in the RUNNING
    states, and nothing restarts once the drain has begun."""
    slot = Slot(1, "t", None)
    has_process = drained = False
    for event in events:
        if event in (E.EXITED, E.EXITED_AT_BOOT) and not has_process:
            continue  # only a process can exit
        before = slot.state
        try:
            action = slot.handle(event)
        except IllegalTransition:
            assert (before, event) not in TABLE
            assert slot.state is before
            continue
        if action is A.SPAWN:
            assert not drained
            has_process = True
        if event in (E.EXITED, E.EXITED_AT_BOOT):
            has_process = False
        drained = drained or event is E.DRAIN
        assert has_process == (slot.state in RUNNING), (before, event, slot.state)
        assert not (drained and action in (A.SPAWN, A.RESTART))


# -- restart backoff ---------------------------------------------------------


def _middle() -> float:
    return 0.5  # jitter x1.0


def test_restart_delays_double_up_to_the_cap() -> None:
    failures, delays = 0, []
    for _ in range(12):
        delay, failures = restart_delay(failures, uptime_s=0.1, rand=_middle)
        delays.append(delay)
    assert delays[:5] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8])
    assert delays[-1] == BACKOFF_MAX_S
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert failures == 12


def test_a_long_crash_loop_stays_at_the_cap() -> None:
    delay, failures = restart_delay(100_000, uptime_s=0.1, rand=_middle)
    assert delay == BACKOFF_MAX_S
    assert failures == 100_001


@given(st.integers(0, 2000), st.floats(0.0, 1.0, exclude_max=True))
def test_jitter_stays_within_half_and_one_and_a_half_times_the_delay(failures: int, rand: float) -> None:
    delay, _ = restart_delay(failures, uptime_s=0.1, rand=lambda: rand)
    plain = min(BACKOFF_BASE_S * 2 ** min(failures, 64), BACKOFF_MAX_S)
    assert 0.5 * plain <= delay <= 1.5 * plain


def test_a_worker_that_ran_stably_restarts_from_the_base_delay() -> None:
    delay, failures = restart_delay(9, uptime_s=STABLE_AFTER_S + 0.01, rand=_middle)
    assert (delay, failures) == (pytest.approx(BACKOFF_BASE_S), 1)
    # Not yet stable: the count goes on.
    delay, failures = restart_delay(9, uptime_s=STABLE_AFTER_S, rand=_middle)
    assert (delay, failures) == (BACKOFF_MAX_S, 10)
