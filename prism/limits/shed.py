"""Adaptive shedding: refuse new calls fast while the worker's queues stand.

When a worker is offered more than it can serve, the excess waits somewhere:
in the event loop's run queue (a call's task waiting for its first step,
``prism.rpc.calls``), in a coalescer for a batch slot (``prism.backends.coalesce``), for a pooled
connection (SQLite's and PostgreSQL's pools), for a thread (SQLite's hop to
its threads), and before all of them unread in the kernel's socket buffers
(``prism.rpc.arrival``: each read's wait). Admitting every call then makes every call slow, and once
waits pass the clients' deadlines, goodput falls to nothing. The fix is to
refuse the excess at the door, where a refusal costs microseconds, and keep
the queues short so the calls admitted stay fast.

The rule is CoDel's (Nichols and Jacobson, "Controlling Queue Delay", 2012):
a queue that drains now and then is doing its job (a burst); a queue whose
*shortest* wait over a whole ``interval`` stayed above ``target`` is a
standing queue, and only that is overload. So every place that queues
reports each wait (``Shedder.observe``); at the end of each interval the
shedder looks at the minimum seen (over at least ``MIN_WAITS`` waits: a few
slow calls are not a queue). The event loop is a queue too, and the one a
worker busy on its CPU fills: ``LoopLag`` sums the time the loop rested
(blocked waiting for I/O), and a loop that rested less than ``target`` in a
whole interval had work standing all along. Either way the next interval
sheds: the calls in flight are capped at nine tenths of what they were (a
new call beyond is refused, RESOURCE_EXHAUSTED with a pushback of one
interval, the time until the decision is made again; never below
``MIN_LIMIT``), and each further standing interval cuts a tenth more; at or
under the target, or with nothing queued at all, it serves everything
again. Refusing every call instead would let the queue drain and then leave
the backend idle for the rest of the interval. Netflix's concurrency-limits
reaches the same place by adapting a concurrency limit to measured latency;
CoDel's minimum needs no latency baseline, and its two numbers are the
whole configuration (``[overload] target_delay_ms``, ``interval_ms``), with
CoDel's own defaults scaled to a gateway's millisecond calls: 5 ms and 100 ms.

What shedding can buy depends on what a refusal costs beside a call. A
call the shedder refuses is refused as its HEADERS frame is read
(``prism.rpc.calls``' ``_shed_new``), before it is a call: about 16 us of a
worker's CPU (its frames read, its answer written), against about 60 us to
serve a SQLite read (h2load, c8x16); a refusal made once the request was
read and decoded cost 36 us. Where the backend is the bottleneck (a pool, a
thread, another server), a refusal is CPU the worker has to spare, and
shedding keeps the admitted calls fast at no cost in goodput. Where the
worker's own CPU is, every refusal takes a share of it from the calls
served: at twice the load it can serve, with a refusal at a quarter of a
call, the worker can serve at most two thirds of what it serves at
saturation, whatever it refuses; shedding then keeps the calls it serves
within their deadlines instead of serving all of them late.

Shedding is per worker: the threads and the event loop that queue are the
worker's. A call that needs no waiting (a shared-cache hit) is still answered
when its request was read before the decision (it queues for nothing); one
refused as its headers are read cannot be told from a miss yet. Calls that
were admitted finish. The shedder holds no clock of its own: ``observe`` and
``refuses`` take the time (trio's clock), so tests drive it with
``trio.testing.MockClock``; ``LoopLag`` reads the CPU's clock (what it
measures is the loop's rest, not a timeout).
"""

from __future__ import annotations

import math
import time

import trio

from prism.config.quotas import OverloadConfig

# Fewer waits than this in an interval do not make a standing queue.
MIN_WAITS = 8
# Shedding never caps the calls in flight below this.
MIN_LIMIT = 8


class Shedder:
    """CoDel's decision for one worker (see the module docstring)."""

    __slots__ = (
        "_min",
        "_waits",
        "_window_end",
        "_window_start",
        "enabled",
        "idle_s",
        "interval_s",
        "limit",
        "on",
        "target_s",
        "watched",
    )

    def __init__(self, config: OverloadConfig | None = None) -> None:
        self.on = False  # shedding during the current interval
        self.limit = 0  # while on: calls in flight beyond this are refused
        self._min = math.inf  # shortest wait seen in the current interval
        self._waits = 0  # how many
        self._window_start = self._window_end = -math.inf
        # The event loop's rest during the current interval (``LoopLag``),
        # when ``watched``: a loop that never rested ``target`` is saturated.
        self.idle_s = 0.0
        self.watched = False
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
        self._waits += 1
        if wait_s < self._min:
            self._min = wait_s

    def refuses(self, inflight: int, now: float) -> bool:
        """Whether a new call is refused now, with ``inflight`` calls running."""
        # (Or a new clock. The start is kept, not computed back from the end:
        # end - interval may round above the start, which rolled again at once.)
        if now >= self._window_end or now < self._window_start:
            self._roll(inflight, now)
        return self.on and inflight >= self.limit

    def _roll(self, inflight: int, now: float) -> None:
        # A standing queue: even the shortest wait of the interval was over
        # the target (over enough waits to be a queue: a few slow calls in an
        # interval are not one); or the event loop, watched, never rested as
        # long as the target (its own queue stood: every pass found work
        # waiting). An interval with no wait and a rested loop had no queue. A roll
        # later than an interval's end (no call came meanwhile) does not judge
        # by old waits; the loop's rest counts up to now, so a loop that was
        # idle meanwhile rested, and one stuck in a long pass did not.
        recent = now < self._window_end + self.interval_s
        # Not the first interval, nor a new clock:
        measured = self._window_start != -math.inf and self._window_start <= now
        saturated = self.watched and self.idle_s < self.target_s and measured
        queued = self._waits >= MIN_WAITS and self._min > self.target_s and recent
        standing = queued or saturated
        if standing and self.enabled:
            # Serve a tenth fewer calls at once than queued: the queue drains
            # while most of the work goes on (shedding everything would
            # leave the backend idle once it had drained). Never fewer than
            # MIN_LIMIT: a worker saturated with few calls in flight is busy
            # with arrivals (refusals among them), which a cap on the calls
            # running would not lessen, while it would refuse nearly all.
            running = min(self.limit, inflight) if self.on else inflight
            self.limit = max(MIN_LIMIT, int(running * 0.9))
            self.on = True
        else:
            self.on = False
        self._min = math.inf
        self._waits = 0
        self.idle_s = 0.0
        self._window_start = now
        self._window_end = now + self.interval_s


class LoopLag(trio.abc.Instrument):
    """The event loop's rest, reported to a shedder: the time trio's
    scheduler spends blocked waiting for I/O. A worker busy on its CPU shows
    here, where no other queue does: bytes that arrive while a pass of the
    scheduler runs are read in the next, so a loop that never rests has work
    standing in its sockets and run queue; yet the waits ``Calls`` measures
    (a task's first step, which trio may run early in the next pass) and the
    backends' (a thread, a pooled connection) stay short. Two clock readings
    per pass; installed only while shedding is enabled (``watch_loop``)."""

    def __init__(self, shedder: Shedder) -> None:
        self.shedder = shedder
        self._blocked = 0.0

    def before_io_wait(self, timeout: float) -> None:
        self._blocked = time.perf_counter() if timeout > 0 else 0.0

    def after_io_wait(self, timeout: float) -> None:
        if self._blocked:
            self.shedder.idle_s += time.perf_counter() - self._blocked


def watch_loop(shedder: Shedder) -> LoopLag | None:
    """Report the running trio loop's rest to ``shedder`` if it is enabled
    (call from inside the worker's ``trio.run``); the instrument, or None."""
    if not shedder.enabled:
        return None
    lag = LoopLag(shedder)
    trio.lowlevel.add_instrument(lag)
    shedder.watched = True
    return lag


# The worker's one shedder: every queue of the process reports to it
# (``prism.workers.app`` configures it from ``[overload]``).
SHEDDER = Shedder()


def observe(wait_s: float, now: float = 0.0) -> None:
    """Report one queue wait to the worker's shedder (``now``: unused, for
    callers such as a pool's ``on_wait`` that say when)."""
    SHEDDER.observe(wait_s)
