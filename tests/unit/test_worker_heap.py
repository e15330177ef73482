"""prism.workers.heap: large blocks reused from the heap, and RSS given back once unused.

What a user sees is the worker's RSS: after a burst of large messages it
stays up while large calls go on (the memory is reused, not faulted in
again), and comes back once it sits unused, small calls or not.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from prism.workers import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="glibc only")

MIB = 1024 * 1024


def _burst(n: int = 48) -> None:
    # n blocks of 1 MiB, every page touched, then freed: a burst of large messages.
    blocks = [bytearray(b"x" * MIB) for _ in range(n)]
    del blocks


def test_memory_reused_by_large_calls_stays_and_goes_back_once_they_stop() -> None:
    assert heap.tune()
    heap.trim()
    before = heap.rss_bytes()
    traffic = 0
    seen: list[int] = []

    async def main() -> None:
        nonlocal traffic
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heap.trim_when_quiet, lambda: traffic)
            await trio.testing.wait_all_tasks_blocked()  # it has taken its baseline, before the burst
            _burst()
            traffic += 48 * MIB
            seen.append(heap.rss_bytes())
            for _ in range(6):  # large messages go on, reusing the memory: kept
                await trio.sleep(heap.IDLE_CHECK_S / 2)
                _burst(24)
                traffic += 24 * MIB
            seen.append(heap.rss_bytes())
            for _ in range(5):  # small calls only: given back
                await trio.sleep(heap.IDLE_CHECK_S / 2)
                traffic += 1000
            seen.append(heap.rss_bytes())
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    freed, busy, quiet = (n - before for n in seen)
    # Freed, yet kept by malloc for the next large message (glibc's defaults
    # would have unmapped each 1 MiB block on free), while large ones come.
    assert freed > 32 * MIB
    assert busy > 32 * MIB
    assert quiet < 8 * MIB


def test_memory_still_live_at_a_trim_goes_back_once_freed() -> None:
    # A stalled client's answers: held through quiet seconds (a trim then
    # finds them live), freed when its connection closes.
    assert heap.tune()
    heap.trim()
    before = heap.rss_bytes()
    seen: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heap.trim_when_quiet, lambda: 0)  # no traffic at all
            await trio.testing.wait_all_tasks_blocked()
            held = [bytearray(b"x" * MIB) for _ in range(48)]  # these stay live while...
            _burst(16)  # ...memory freed beside them makes a quiet check trim
            await trio.sleep(3 * heap.IDLE_CHECK_S + 0.5)
            seen.append(heap.rss_bytes())
            del held
            await trio.sleep(2 * heap.IDLE_CHECK_S + 0.5)
            seen.append(heap.rss_bytes())
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    live, freed = (n - before for n in seen)
    assert live > 40 * MIB
    assert freed < 8 * MIB
