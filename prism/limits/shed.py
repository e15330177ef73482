"""Adaptive shedding: refuse new calls fast while the worker's queues stand.

When a worker is offered more than it can serve, the excess waits somewhere:
in the event loop's run queue (a call's task waiting for its first step,
``prism.rpc.calls``), in a coalescer for a batch slot (``prism.backends.coalesce``), for a pooled
connection (SQLite's and PostgreSQL's pools), for a thread (SQLite's hop to
its threads). Admitting every call then makes every call slow, and once
waits pass the clients' deadlines, goodput falls to nothing. The fix is to
refuse the excess at the door, where a refusal costs microseconds, and keep
the queues short so the calls admitted stay fast.

The rule is CoDel's (Nichols and Jacobson, "Controlling Queue Delay", 2012):
a queue that drains now and then is doing its job (a burst); a queue whose
*shortest* wait over a whole ``interval`` stayed above ``target`` is a
standing queue, and only that is overload. So every place that queues
reports each wait (``Shedder.observe``); at the end of each interval the
shedder looks at the minimum seen: above the target, the next interval sheds:
the calls in flight are capped at nine tenths of what they were (a new call
beyond is refused, RESOURCE_EXHAUSTED with a pushback of one interval, the
time until the decision is made again), and each further standing interval
cuts a tenth more; at or under the target, or with nothing queued at all,
it serves everything again. Refusing every call instead would let the queue
drain and then leave the backend idle for the rest of the interval. Netflix's concurrency-limits reaches the
same place by adapting a concurrency limit to measured latency; CoDel's
minimum needs no latency baseline, and its two numbers are the whole
configuration (``[overload] target_delay_ms``, ``interval_ms``), with
CoDel's own defaults scaled to a gateway's millisecond calls: 5 ms and 100 ms.

Shedding is per worker: the threads and the event loop that queue are the
worker's. A call that needs no waiting (a shared-cache hit) is still answered:
it queues for nothing. Calls that were admitted finish. The shedder holds no
clock of its own: ``observe`` and ``shedding`` take the time (trio's clock),
so tests drive it with ``trio.testing.MockClock``.
"""

from __future__ import annotations

import math

from prism.config.quotas import OverloadConfig


class Shedder:
    """CoDel's decision for one worker (see the module docstring)."""

    __slots__ = ("_min", "_window_end", "enabled", "interval_s", "limit", "on", "target_s")

    def __init__(self, config: OverloadConfig | None = None) -> None:
        self.on = False  # shedding during the current interval
        self.limit = 0  # while on: calls in flight beyond this are refused
        self._min = math.inf  # shortest wait seen in the current interval
        self._window_end = -math.inf
        self.enabled = True
        self.target_s = self.interval_s = 0.0
        self.configure(config or OverloadConfig())

    def configure(self, config: OverloadConfig) -> None:
        self.enabled = config.enabled
        self.target_s = config.target_delay_ms / 1000.0
        self.interval_s = config.interval_ms / 1000.0
        if not self.enabled:
            self.on = False

    @property
    def pushback_ms(self) -> int:
        """A refused client's wait: until the decision is made again."""
        return max(1, math.ceil(self.interval_s * 1000.0))

    def observe(self, wait_s: float) -> None:
        """One wait in a queue, just ended (it counts in the current interval)."""
        if wait_s < self._min:
            self._min = wait_s

    def refuses(self, inflight: int, now: float) -> bool:
        """Whether a new call is refused now, with ``inflight`` calls running."""
        if now >= self._window_end or now < self._window_end - self.interval_s:  # (or a new clock)
            self._roll(inflight, now)
        return self.on and inflight >= self.limit

    def _roll(self, inflight: int, now: float) -> None:
        # A standing queue: even the shortest wait of the interval was over
        # the target, and the interval has just ended (an older one says
        # nothing about now). An interval with no wait at all had no queue.
        standing = self.target_s < self._min < math.inf and now < self._window_end + self.interval_s
        if standing and self.enabled:
            # Serve a tenth fewer calls at once than queued: the queue drains
            # while most of the work goes on (shedding everything would
            # leave the backend idle once it had drained).
            running = min(self.limit, inflight) if self.on else inflight
            self.limit = max(1, int(running * 0.9))
            self.on = True
        else:
            self.on = False
        self._min = math.inf
        self._window_end = now + self.interval_s


# The worker's one shedder: every queue of the process reports to it
# (``prism.workers.app`` configures it from ``[overload]``).
SHEDDER = Shedder()


def observe(wait_s: float, now: float = 0.0) -> None:
    """Report one queue wait to the worker's shedder (``now``: unused, for
    callers such as a pool's ``on_wait`` that say when)."""
    SHEDDER.observe(wait_s)
