"""Adaptive shedding: refuse new calls fast while the worker's queues stand.

When a worker is offered more than it can serve, the excess waits somewhere:
unread in the kernel's socket buffers and in the event loop, behind the
calls read before it (``prism.rpc.arrival`` stamps each read; a call's
*sojourn* runs from when its bytes reached the machine to its handler's
first step, ``prism.rpc.calls``), or, once admitted, for a backend: a batch
slot (``prism.backends.coalesce``), a pooled connection (SQLite's and
PostgreSQL's pools), a thread (SQLite's hop). Admitting every call then
makes every call slow, and once waits pass the clients' deadlines, goodput
falls to nothing. The fix is to refuse the excess at the door, where a
refusal costs a fraction of a call, and keep the queues short so the calls
admitted stay fast.

The rule is CoDel's (Nichols and Jacobson, "Controlling Queue Delay", 2012):
a queue that drains now and then is doing its job (a burst); a queue whose
*shortest* wait over a whole ``interval`` stayed above ``target`` is a
standing queue, and only that is overload. Every place that queues reports
each wait, and at the end of each interval the shedder looks at the minimum
seen (over at least ``MIN_WAITS`` waits: a few slow calls are not a queue).
Where the queue stands decides what is refused in the next interval:

- **At the door** (``observe_sojourn``: the worker's CPU is what runs
  short): a new call that has already waited longer than ``target`` is
  refused, RESOURCE_EXHAUSTED; a call that came in since is served. This is
  the rule Facebook's services put on their queues ("Fail at Scale", ACM
  Queue 2015: when a queue has not been empty for an interval, nothing may
  wait in it longer than a few milliseconds): the worker drains the backlog
  by refusing it, which costs it a fraction of serving it, and serves the
  calls that are still fresh, at once. Refusing a share of calls at random
  instead leaves the admitted ones as late as the queue. The kernel stamps
  a read with its *newest* packet's arrival, so a backlog in the sockets
  hides from the sojourns: it shows as the calls of large reads waiting for
  each other. So the door also shuts when half the new calls of an interval
  or more came late, and stays shut while a tenth or more still do, or
  would have (refused for the calls ahead of them: the worker has not
  caught up; once it has, late calls stop coming). A pause of
  a few milliseconds makes one read's calls late, not half an interval's.
- **At a backend** (``observe``: a pool, a thread, a batch slot): the calls
  in flight are capped at nine tenths of what they were, and at most the
  calls served over twice the target (Little's law; a queue of thousands is
  cut at once), never below ``MIN_LIMIT``: a new call beyond is refused.
  Each further standing interval cuts again; at or under the target, or
  with nothing queued at all, it serves everything again. The worker's CPU has room there; what is
  scarce is the backend's, and fewer calls in flight is what relieves it.
  Refusing every call instead would let the queue drain and then leave the
  backend idle for the rest of the interval.

A verdict takes an interval, two when a jump in load comes mid-interval
(its first waits were short): meanwhile the door is open to all of it. At
twice its saturation, a PostgreSQL worker had 2,785 calls in flight 160 ms
into the step, and its heap kept the 14 MiB they took. So whatever the
verdict, a new call is refused when the calls in flight have more than
``AHEAD_TARGETS`` targets of CPU to spend before it (``call_s`` each, as
measured with the door open), past ``AHEAD_FLOOR`` calls (an interval of
background work, few calls and much CPU, makes ``call_s`` large): 250 calls
at 80 us each (400 at 50 us). A worker at its saturation, 128 calls in
flight, is under half of that. Such a call is late too: if they go on
coming, the door shuts at its next decision, to its own bound (one target:
not counted late, the bound held a PostgreSQL worker's calls at 18 ms at
1.5x its saturation, where the door holds them at 6). That bound, too,
refuses nothing while ``AHEAD_FLOOR`` calls or fewer are in flight. Fewer
calls at a time cost a worker more CPU each: its reads and writes carry
fewer of them (an SQLite worker, closed loop: 460 us a call with 128
connections of one call each, 283 us with 8 of 16; open loop, 527 us a
call at half its saturation, 327 us at its saturation). On a machine
where a call cost 300 us, one target was 17 calls. Offered twice its
saturation (measured again just before), a worker held to that served
0.56-1.07 of it, mean 0.79 (4 runs); held to 64, 0.81-0.99, mean 0.89,
the two taking turns in one session. (Floors of 128 and 256 measured the
same, within that noise: the door's sojourn rule held the calls then.)
The door judges a read's calls as one, both ways: shut to a read's first
call, it refuses the whole read in one pass (``refuses_all``,
``prism.rpc.refuse_read``); open to it, it lets in the rest of the read too
(up to ``AHEAD_FLOOR`` calls, unless late or capped at a backend), so that
their answers go out together.

A refusal carries a pushback of one interval (``grpc-retry-pushback-ms``),
the time until the decision is made again. The two numbers are the whole
configuration (``[overload] target_delay_ms``, ``interval_ms``), with
CoDel's own defaults scaled to a gateway's millisecond calls: 5 ms and
100 ms. Netflix's concurrency-limits reaches the same place by adapting a
concurrency limit to measured latency; CoDel's minimum needs no latency
baseline.

A busy event loop is not by itself a queue: a worker serving 16 calls at a
time back to back never rests, yet no call waits longer than the 16 before
it (an earlier version shed on a loop that never rested, and refused calls
a worker at full use would have served within 2 ms). What counts is how
long calls wait.

What a refusal costs beside a call decides what shedding can buy where the
worker's CPU is the bottleneck. A call refused at the door is refused as
its HEADERS frame is read (``prism.rpc.calls``' ``_shed_new``), before it is
a call: its frames read and its answer written. Every refusal takes a share
of the CPU from the calls served: at twice the load a worker can serve, a
refusal at a share ``r`` of a served call's CPU leaves it ``(1 - 2r) / (1 -
r)`` of what it serves at saturation: nine tenths needs ``r`` under a
tenth. A refusal is made without a Call or an HTTP/2 stream, and a read's
refusals alone are not written at once but with the connection's next
answer (``prism.rpc.held``): the write had been most of their cost.

Shedding is per worker: the threads and the event loop that queue are the
worker's. A call that needs no waiting (a shared-cache hit) is still answered
when its request was read before the decision (it queues for nothing); one
refused as its headers are read cannot be told from a miss yet. Calls that
were admitted finish. The calls in flight it is given leave out the
streaming ones (``ServerSettings.unary_inflight``): a subscription's task
lives as long as its stream, queued for nothing, and 50 of them open had
made every fresh call look 50 calls deep while the door was shut. The
shedder holds no clock of its own: ``refuses`` takes the time (trio's
clock), so tests drive it with ``trio.testing.MockClock``.
"""

from __future__ import annotations

import math
import time

from prism.config.quotas import OverloadConfig

# Fewer waits than this in an interval do not make a standing queue.
MIN_WAITS = 8
# Shedding never caps the calls in flight below this.
MIN_LIMIT = 8
# Door open or shut, a new call is refused behind more than this many
# targets of the CPU the calls in flight have yet to spend (as measured,
# ``call_s`` each), once more than AHEAD_FLOOR calls are in flight.
# (The door shut, one target; also only past AHEAD_FLOOR calls.)
AHEAD_TARGETS = 4
AHEAD_FLOOR = 64


class Shedder:
    """CoDel's decision for one worker (see the module docstring)."""

    __slots__ = (
        "_admitted",
        "_asked",
        "_cpu",
        "_late",
        "_min",
        "_min_sojourn",
        "_refused",
        "_sojourns",
        "_waits",
        "_window_end",
        "_window_start",
        "call_s",
        "capped",
        "enabled",
        "interval_s",
        "limit",
        "limited",
        "on",
        "shut",
        "target_s",
    )

    def __init__(self, config: OverloadConfig | None = None) -> None:
        self.on = False  # shedding during the current interval (``shut`` or ``capped``)
        self.shut = False  # the door is shut to late calls (a standing queue before the handlers)
        self.capped = False  # the calls in flight are capped (a standing queue at a backend)
        self.limit = 0  # while capped: calls in flight beyond this are refused
        self._min = math.inf  # shortest backend wait seen in the current interval
        self._waits = 0  # how many
        self._min_sojourn = math.inf  # shortest sojourn seen in the current interval
        self._sojourns = 0  # how many
        self._late = 0  # new calls in the current interval that had waited longer than the target
        self._asked = 0  # new calls judged in the current interval
        self._admitted = 0  # calls whose handlers started in the current interval
        self._refused = 0  # new calls refused in it, the door open, by a bound on the calls in flight
        self.limited = 0  # calls a quota refused in the current interval (counted by the callers)
        self._cpu = time.process_time()  # the process's CPU time when the interval began
        # What a call admitted lately cost the process's CPU (its share of
        # the last interval's with the door open), for the wait of the calls
        # queued ahead of a new one.
        self.call_s = 0.0
        self._window_start = self._window_end = -math.inf
        self.enabled = True
        self.target_s = self.interval_s = 0.0
        self.configure(config or OverloadConfig())

    def configure(self, config: OverloadConfig) -> None:
        self.enabled = config.enabled
        self.target_s = config.target_delay_ms / 1000.0
        self.interval_s = config.interval_ms / 1000.0
        if not self.enabled:
            self.on = self.shut = self.capped = False

    @property
    def pushback_ms(self) -> int:
        """A refused client's wait: until the decision is made again."""
        return max(1, math.ceil(self.interval_s * 1000.0))

    def observe(self, wait_s: float) -> None:
        """One wait for a backend (a pool, a thread, a batch slot), just ended."""
        self._waits += 1
        if wait_s < self._min:
            self._min = wait_s

    def observe_read(self, wait_s: float) -> None:
        """How long a read's bytes waited unread (``prism.rpc.arrival``)."""
        self._sojourns += 1
        if wait_s < self._min_sojourn:
            self._min_sojourn = wait_s

    def observe_sojourn(self, wait_s: float) -> None:
        """How long an admitted call waited for its handler's first step."""
        self._sojourns += 1
        self._admitted += 1
        if wait_s < self._min_sojourn:
            self._min_sojourn = wait_s

    def refuses(self, inflight: int, now: float, waited: float = 0.0, together: int = 0) -> bool:
        """Whether a new call is refused now, with ``inflight`` calls running,
        the call having waited ``waited`` seconds since it reached the machine,
        ``together`` calls of its read let in before it."""
        # (Or a new clock. The start is kept, not computed back from the end:
        # end - interval may round above the start, which rolled again at once.)
        if now >= self._window_end or now < self._window_start:
            self._roll(inflight, now)
        self._asked += 1
        if waited > self.target_s:
            self._late += 1
            if self.shut:
                return True
        elif together and together < AHEAD_FLOOR and not self.capped:
            # The door judges a read as one (as it refuses one: refuses_all):
            # its first call let in, so are the rest, up to AHEAD_FLOOR. Let
            # in a call at a time, the calls in flight let in only the
            # first few calls of each read, and their answers went out a
            # few to a write: A/B, 2x an SQLite worker's saturation, three
            # runs of 6-8 steps each, goodput +1.3, +1.4 and +5 points.
            return False
        elif self.shut and self._behind(inflight, waited):
            # It came in time, but would wait too long behind the calls
            # admitted before it, each of which has its CPU to spend yet
            # (those of a large read wait for each other; those waiting for
            # a backend are answered on this CPU too). Late all the same: the
            # door stays shut while such calls come. Not below AHEAD_FLOOR
            # calls in flight: fewer, and a worker's reads and writes carry
            # fewer calls each, and each call costs it more CPU.
            self._late += 1
            return True
        if self._far_behind(inflight):
            # Door open, behind more than AHEAD_TARGETS targets of CPU: late
            # as well (the door shuts at its next decision, to its own
            # tighter bound, if such calls go on coming).
            if waited <= self.target_s:
                self._late += 1
            self._refused += 1
            return True
        if self.capped and inflight >= self.limit:
            self._refused += 1
            return True
        return False

    def refuses_all(self, inflight: int, now: float, waited: float) -> bool:
        """Whether the door, shut, refuses every new call of a read now: what
        ``refuses`` would answer each of them (neither rule changes between
        the calls of one read), decided once, uncounted (``count_refused``
        counts them: ``prism.rpc.refuse_read``). False when a decision is due
        (the calls' own path makes it)."""
        if not self.shut or not self._window_start <= now < self._window_end:
            return False
        return waited > self.target_s or self._behind(inflight, waited)

    def admits_all(self, inflight: int, n: int, now: float, waited: float) -> bool:
        """Whether ``refuses`` would let in each of a read's ``n`` new calls
        (``inflight`` running before the first), decided once and counted as
        it counts them; False, nothing counted, to judge each call (a call
        would be refused, or a decision is due). Only the common case: in
        time, no cap, and every call after the first let in as its read's
        (below ``AHEAD_FLOOR``), so that the first call's verdict is the
        read's. Judged call by call, each of the ~18 calls of a read let in
        at twice an SQLite worker's saturation cost ~1.4 us more than at
        the saturation, where the door is not asked: 2% of its goodput."""
        if (
            waited > self.target_s
            or self.capped
            or n > AHEAD_FLOOR
            or not self._window_start <= now < self._window_end
            or (self.shut and self._behind(inflight, waited))
            or self._far_behind(inflight)
        ):
            return False
        self._asked += n
        return True

    def _behind(self, inflight: int, waited: float) -> bool:
        """Whether a call that has waited ``waited`` would wait past the target
        behind ``inflight`` calls (the shut door's bound, past ``AHEAD_FLOOR``)."""
        return inflight > AHEAD_FLOOR and waited + inflight * self.call_s > self.target_s

    def _far_behind(self, inflight: int) -> bool:
        """Whether a new call would be behind more than ``AHEAD_TARGETS``
        targets of CPU (every door's bound, past ``AHEAD_FLOOR``)."""
        return inflight > AHEAD_FLOOR and inflight * self.call_s > AHEAD_TARGETS * self.target_s

    def count_refused(self, n: int) -> None:
        """``n`` new calls refused as ``refuses_all`` said, as ``refuses`` counts them."""
        self._asked += n
        self._late += n

    def _roll(self, inflight: int, now: float) -> None:
        # A standing queue: even the shortest wait of the interval was over
        # the target (over enough waits to be a queue: a few slow calls in an
        # interval are not one). An interval with no wait had no queue. A
        # roll later than an interval's end (no call came meanwhile) does not
        # judge by old waits.
        recent = now < self._window_end + self.interval_s
        target = self.target_s
        cpu = time.process_time()
        if self._admitted and not self.shut:
            # (Measured with the door open only: shut, the CPU goes to
            # refusals too, and per call admitted it grew as fewer were, until
            # the door refused nearly everything. A quota's refusal is counted
            # as a call: a flood refused at 10x its rps, its CPU shared among
            # the admitted calls alone, made each look 500 us and shut the
            # door on a worker 40% busy. So is a refusal by a bound on the
            # calls in flight, made with the door open: uncounted, a
            # PostgreSQL call at 2x measured 234 us where 50 was right, and
            # the door, shut, let ~15 calls in flight instead of 50-80.)
            self.call_s = (cpu - self._cpu) / (self._admitted + self.limited + self._refused)
        self._cpu = cpu
        enabled = self.enabled and recent
        # Before the handlers: standing; or half the new calls or more came
        # late (a read is stamped when its newest packet arrived, so a
        # backlog in the kernel shows as the time the calls of large reads
        # wait for each other, not in the sojourns); or, the door shut, a
        # tenth or more still come late: the backlog it refuses has not
        # drained yet. (A pause of a few milliseconds makes the calls of one
        # read late, not half of an interval's.)
        late, asked = self._late, self._asked
        self.shut = enabled and (
            (self._sojourns >= MIN_WAITS and self._min_sojourn > target)
            or (late >= MIN_WAITS and (2 * late >= asked or (self.shut and 10 * late >= asked)))
        )
        if enabled and self._waits >= MIN_WAITS and self._min > target:
            # Serve a tenth fewer calls at once than queued: the queue drains
            # while most of the work goes on (shedding everything would
            # leave the backend idle once it had drained); and no more than
            # the calls served over twice the target (Little's law: at the
            # rate they were served, more would wait longer), so that a
            # queue of thousands is cut at once, not a tenth an interval.
            # Never fewer than MIN_LIMIT: a cap of one call would refuse
            # nearly every call.
            running = min(self.limit, inflight) if self.capped else inflight
            limit = int(running * 0.9)
            if self._admitted:
                limit = min(limit, int(2 * target * self._admitted / (now - self._window_start)))
            self.limit = max(MIN_LIMIT, limit)
            self.capped = True
        else:
            self.capped = False
        self.on = self.shut or self.capped
        self._min = self._min_sojourn = math.inf
        self._waits = self._sojourns = self._late = self._admitted = self._asked = self.limited = 0
        self._refused = 0
        self._window_start = now
        self._window_end = now + self.interval_s


# The worker's one shedder: every queue of the process reports to it
# (``prism.workers.app`` configures it from ``[overload]``).
SHEDDER = Shedder()


def observe(wait_s: float, now: float = 0.0) -> None:
    """Report one backend wait to the worker's shedder (``now``: unused, for
    callers such as a pool's ``on_wait`` that say when)."""
    SHEDDER.observe(wait_s)


def observe_read(wait_s: float) -> None:
    """Report how long a read's bytes waited unread to the worker's shedder."""
    SHEDDER.observe_read(wait_s)
