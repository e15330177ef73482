"""prism.workers.heap: large blocks reused from the heap, and RSS given back once idle.

What a user sees is the worker's RSS: after a burst of large messages it
stays up while calls are in flight (the memory is reused, not faulted in
again), and comes back once the worker is idle.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from prism.workers import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="glibc only")

MIB = 1024 * 1024


def _burst() -> None:
    # 48 blocks of 1 MiB, every page touched, then freed: a burst of large messages.
    blocks = [bytearray(b"x" * MIB) for _ in range(48)]
    del blocks


def test_a_burst_stays_while_busy_and_goes_back_once_idle() -> None:
    assert heap.tune()
    heap.trim()
    before = heap.rss_bytes()
    active = 1
    seen: list[int] = []

    async def main() -> None:
        nonlocal active
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heap.trim_when_idle, lambda: active)
            await trio.testing.wait_all_tasks_blocked()  # it has taken its baseline, before the burst
            _burst()
            seen.append(heap.rss_bytes())
            await trio.sleep(3 * heap.IDLE_CHECK_S + 0.5)  # calls in flight: kept
            seen.append(heap.rss_bytes())
            active = 0
            await trio.sleep(2 * heap.IDLE_CHECK_S + 0.5)  # idle at two checks: given back
            seen.append(heap.rss_bytes())
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    freed, busy, idle = (n - before for n in seen)
    # Freed, yet kept by malloc for the next large message (glibc's defaults
    # would have unmapped each 1 MiB block on free), while calls are in flight.
    assert freed > 32 * MIB
    assert busy > 32 * MIB
    assert idle < 8 * MIB
