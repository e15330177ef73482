"""A read's new calls let in at once (``Shedder.admits_all``,
``GrpcProtocol.admit_read``), where the door would let in each of them.

At twice an SQLite worker's saturation, the ~18 calls of each read the door
lets in were judged one by one; judged once, they are let in and counted
exactly as the door would have let in and counted each.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from prism.limits import Shedder
from prism.limits.shed import AHEAD_FLOOR

from .test_plain_frames import PATHS, WARM_UP
from .test_refused_unheld import RefusingRun
from .test_shedding import CONFIG


def _state(shedder: Shedder) -> dict[str, Any]:
    return {name: getattr(shedder, name) for name in Shedder.__slots__}


@settings(max_examples=500, deadline=None)
@given(
    inflight=st.integers(0, 3 * AHEAD_FLOOR),
    n=st.integers(1, 2 * AHEAD_FLOOR),
    waited=st.sampled_from([0.0, 0.001, 0.004999, 0.005, 0.0051, 0.02]),
    now=st.sampled_from([0.0, 0.05, 0.0999, 0.1, 0.3]),
    shut=st.booleans(),
    capped=st.booleans(),
    limit=st.integers(0, 2 * AHEAD_FLOOR),
    call_s=st.sampled_from([1e-6, 20e-6, 60e-6, 100e-6, 1e-3]),
)
# Shut, in time, but behind 100 calls of 100 us: the first call is refused.
@example(inflight=100, n=10, waited=0.0, now=0.05, shut=True, capped=False, limit=0, call_s=100e-6)
def test_a_read_let_in_at_once_is_what_the_door_does_call_by_call(
    inflight: int, n: int, waited: float, now: float, shut: bool, capped: bool, limit: int, call_s: float
) -> None:
    shedder = Shedder(CONFIG)
    shedder.refuses(0, 0.0)  # an interval starts: [0, 0.1)
    shedder.shut, shedder.capped, shedder.limit, shedder.call_s = shut, capped, limit, call_s
    each = copy.deepcopy(shedder)
    before = _state(shedder)
    if shedder.admits_all(inflight, n, now, waited):
        # The door, call by call (each of the read's calls let in before it
        # is in flight, and let in together with it), lets in every one...
        assert not any(each.refuses(inflight + k, now, waited, k) for k in range(n))
        assert _state(shedder) == _state(each)  # ...and counts them the same
    else:
        assert _state(shedder) == before  # nothing counted: each call is judged


def test_the_common_case_is_let_in_at_once() -> None:
    shedder = Shedder(CONFIG)
    shedder.refuses(0, 0.0)
    shedder.shut, shedder.call_s = True, 60e-6
    assert shedder.admits_all(10, 18, 0.05, 0.001)  # shut, but in time and not behind
    assert not shedder.admits_all(10, 18, 0.05, 0.006)  # late
    assert not shedder.admits_all(10, AHEAD_FLOOR + 1, 0.05, 0.001)  # past the floor
    assert not shedder.admits_all(10, 18, 0.1, 0.001)  # a decision is due
    assert not shedder.admits_all(100, 18, 0.05, 0.001)  # behind 100 calls of 60 us: over the target


class AdmittingRun(RefusingRun):
    """No call refused; the door asked once a read (``admit_read``), then
    each call (``shed``) unless the read was let in at once."""

    def __init__(self, at_once: bool) -> None:
        super().__init__(set())
        self.asked: list[int] = []
        self.judged = 0
        shed = self.fast.shed

        def judge(headers: Any) -> Any:
            self.judged += 1
            assert shed is not None
            return shed(headers)

        def admit_read(n: int) -> bool:
            self.asked.append(n)
            return at_once

        self.fast.shed, self.fast.admit_read = judge, admit_read


def _read_of_calls(run: AdmittingRun, n: int) -> list[int]:
    """The client sends ``n`` calls in one read; their streams."""
    run.play(WARM_UP)
    run.asked.clear()
    run.judged = 0
    sids = []
    for i in range(n):
        sids.append(run.client.get_next_available_stream_id())
        run.act(("request", PATHS[0], b"%d" % i, 0, None, None))
    run.deliver(0, everything=True)
    return sids


def test_a_read_let_in_at_once_starts_every_call_judged_and_asks_no_call() -> None:
    run = AdmittingRun(at_once=True)
    sids = _read_of_calls(run, 5)
    assert run.asked == [5]
    assert run.judged == 0
    started = [fast for fast, _ in run.calls[-5:]]
    assert [call.stream_id for call in started] == sids
    assert all(call.judged for call in started)  # (not judged again as it is served)


def test_a_read_not_let_in_at_once_asks_each_call() -> None:
    run = AdmittingRun(at_once=False)
    sids = _read_of_calls(run, 5)
    assert run.asked == [5]
    assert run.judged == 5
    assert [fast.stream_id for fast, _ in run.calls[-5:]] == sids
