"""Door open or shut, a new call is refused behind more than ``AHEAD_TARGETS``
targets of the CPU the calls in flight have yet to spend (``prism.limits.shed``).

A verdict takes an interval or two; a jump to twice the load a PostgreSQL
worker serves had put 2,785 calls in flight 160 ms into it, and the heap
kept what they took. Its refusals are late calls (the door shuts if they
go on coming), and they count in what a call costs, as the calls admitted do.
"""

from __future__ import annotations

import pytest

from prism.limits import Shedder, shed
from prism.limits.shed import AHEAD_FLOOR, AHEAD_TARGETS, MIN_WAITS

from .test_shedding import CONFIG


def test_door_open_a_call_behind_more_than_four_targets_of_cpu_is_refused() -> None:
    shedder = Shedder(CONFIG)
    shedder.refuses(0, 0.0)  # an interval starts
    shedder.call_s = 100e-6  # each call admitted lately cost 100 us
    assert not shedder.shut and not shedder.capped
    bound = AHEAD_TARGETS * CONFIG.target_delay_ms / 1000 / shedder.call_s  # 200 calls
    assert not shedder.refuses(int(bound) - 10, 0.01)
    assert shedder.refuses(int(bound) + 10, 0.01)
    # However much each seems to cost, up to the floor, calls are let in.
    shedder.call_s = 0.01
    assert not shedder.refuses(AHEAD_FLOOR, 0.02)
    assert shedder.refuses(AHEAD_FLOOR + 1, 0.02)


def test_the_bounds_refusals_are_late_calls_and_count_in_a_calls_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = [0.0]
    monkeypatch.setattr(shed.time, "process_time", lambda: cpu[0])
    shedder = Shedder(CONFIG)
    shedder.refuses(0, 0.0)  # an interval starts (CPU 0)
    shedder.call_s = 100e-6
    for _ in range(MIN_WAITS + 2):  # ten calls admitted, none waited
        assert not shedder.refuses(0, 0.01)
        shedder.observe_sojourn(0.0)
    for _ in range(100):  # a hundred refused behind 1,000 calls in flight
        assert shedder.refuses(1000, 0.02)
    cpu[0] = 0.011  # the interval's CPU: 110 calls' worth at 100 us
    assert not shedder.refuses(0, 0.1)  # the next decision
    assert shedder.shut  # most calls of the interval were late: the door shuts
    assert shedder.call_s == pytest.approx(100e-6)  # 11 ms over 110 calls, not over 10
    # Shut, its own bound holds past AHEAD_FLOOR calls: one target of CPU
    # ahead (100 calls at 50 us; at 100 us, 50 calls are under the floor).
    assert not shedder.refuses(AHEAD_FLOOR, 0.11)
    shedder.call_s = 50e-6
    assert not shedder.refuses(90, 0.11)
    assert shedder.refuses(110, 0.11)


def test_the_door_lets_a_read_in_as_one_up_to_the_floor() -> None:
    shedder = Shedder(CONFIG)
    shedder.refuses(0, 0.0)  # an interval starts
    for _ in range(MIN_WAITS):
        shedder.observe_sojourn(0.02)  # a standing queue before the handlers
    shedder.refuses(0, 0.1)  # the decision: shut
    assert shedder.shut
    shedder.call_s = 100e-6
    behind = AHEAD_FLOOR + 60  # 12.4 ms of CPU ahead: over the 5 ms target
    assert shedder.refuses(behind, 0.11)  # a read's first call: refused
    # Its read's first call let in, the rest of the read's calls are too...
    assert not shedder.refuses(behind, 0.11, together=1)
    assert not shedder.refuses(behind, 0.11, together=AHEAD_FLOOR - 1)
    # ...up to AHEAD_FLOOR of them; a late call is refused all the same.
    assert shedder.refuses(behind, 0.11, together=AHEAD_FLOOR)
    assert shedder.refuses(behind, 0.11, waited=0.006, together=1)
    # Calls capped at a backend (a standing queue there) are judged alone.
    shedder.capped, shedder.limit = True, behind
    assert shedder.refuses(behind, 0.11, together=1)
