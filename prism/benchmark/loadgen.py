"""The built-in load generator's event loop: one process, many connections, one step.

Closed loop: each connection keeps ``streams`` calls in flight and starts
the next call as soon as one ends; latency is from send to answer. Open
loop: calls are due on a fixed schedule (``rate`` per second) whatever the
answers do; a due call goes on a connection with a free stream, else waits
in a backlog, and its latency runs from when it was due, not when it could
be sent (so a saturated server shows in the latency, with no coordinated
omission). Closed loop, the calls that end inside the measured window are
counted; open loop, the calls due inside it, answered in it or in the drain
after it (up to DRAIN_OPEN_S; then they count as ``CLIENT_TIMEOUT``).
Every answer is checked (``workload.Calls.check``); a wrong one is counted
as ``WRONG_ANSWER`` and reported, and fails the run.

How its figures compare with h2load's, measured on one step both can
express (memory KeyValue, GetItems of one 100-byte record, server pinned to
CPU 0 and the generator to CPU 1, same session, three runs each; the table
is in docs/bench-results.md, "Load generators"): the worker's CPU per call
agrees within 5% (it does not depend on the generator); calls/s reach
0.94-1.03 of h2load's, p50 5-16% higher; the generator's own CPU per call
is 1.5-1.9x h2load's (7.6 us against 4.1 us at 128 in flight), a seventh of
what the worker spends per call (~55 us), so one generator process on its
own CPU saturates one worker.
"""

from __future__ import annotations

import array
import collections
import os
import selectors
import time
from collections.abc import Callable
from multiprocessing.connection import Connection as Pipe

import msgspec

from prism.benchmark.frames import Connection, Done, Pending, connect
from prism.benchmark.workload import PATHS, Calls, Spec, picks

MAX_BACKLOG = 200_000  # open loop: due calls waiting for a free stream, beyond which they are dropped
DRAIN_S = 1.0  # closed loop, after the window: how long calls in flight may still end (not counted)
DRAIN_OPEN_S = 5.0  # open loop, after the window: how long the calls due in it may still take
MAX_WRONG_SHOWN = 5
STOP = b"stop"


class Plan(msgspec.Struct, frozen=True):
    """One process's share of one step."""

    host: str
    port: int
    mode: str  # "closed" or "open"
    connections: int
    streams: int  # closed loop: calls in flight per connection
    rate: float  # open loop: calls/s from this process
    start_at: float  # time.monotonic() (system-wide) at which sending starts
    warmup_s: float
    duration_s: float
    seed: int
    authority: str | None = None
    timeout_ms: int = 0  # each call's deadline (grpc-timeout), 0: none


class Outcome(msgspec.Struct):
    """What one process saw in the measured window."""

    latencies_us: dict[str, bytes]  # op -> array('q') of the OK calls' latencies
    errors: dict[str, dict[str, int]]  # op -> status -> count
    wrong: list[str]  # the first wrong answers, described
    wrong_total: int
    cpu_s: float  # this process's CPU time in the window
    backlog_max: int  # open loop: the most due calls waiting at once
    last_answer_at: float  # time.monotonic() of the last answer to a call of the window (0: none)
    connect_error: str | None = None


class _Step:
    def __init__(self, plan: Plan, spec: Spec, stop: Pipe | None) -> None:
        self.plan, self.spec, self.stop = plan, spec, stop
        self.calls = Calls(spec)
        self.sequence = picks(spec, plan.seed)
        self.next_pick = 0
        self.window = (plan.start_at + plan.warmup_s, plan.start_at + plan.warmup_s + plan.duration_s)
        self.latencies: dict[str, array.array[int]] = {op: array.array("q") for op in spec.weights}
        self.errors: dict[str, dict[str, int]] = {op: {} for op in spec.weights}
        self.wrong: list[str] = []
        self.wrong_total = 0
        self.backlog: collections.deque[float] = collections.deque()
        self.backlog_max = 0
        self.stopped = False
        self.by_due = plan.mode == "open"
        self.last_answer_at = 0.0
        self.selector = selectors.DefaultSelector()
        self.conns: list[Connection] = []
        if stop is not None:
            self.selector.register(stop.fileno(), selectors.EVENT_READ, None)

    def connect(self) -> Connection:
        conn = connect(self.plan.host, self.plan.port, self.plan.authority)
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        self.conns.append(conn)
        return conn

    def replace(self, conn: Connection) -> Connection:
        self.selector.unregister(conn.sock)
        conn.close()
        self.conns.remove(conn)
        return self.connect()

    def launch(self, conn: Connection, due: float) -> bool:
        """Start the next call on ``conn`` if it has room; False if not."""
        op, key = self.sequence[self.next_pick]
        body = self.calls.build[op](key)
        if not conn.can_send(len(body)):
            return False
        self.next_pick = (self.next_pick + 1) % len(self.sequence)
        conn.start(Pending(op, key, due), PATHS[op], body, self.plan.timeout_ms)
        return True

    def ended(self, done: Done, now: float) -> None:
        call = done.call
        status = done.status
        if status == "OK" and not self.calls.check[call.op](call.key, bytes(call.data)):
            status = "WRONG_ANSWER"
            self.wrong_total += 1
            if len(self.wrong) < MAX_WRONG_SHOWN:
                self.wrong.append(f"{call.op} key {call.key}: answer {bytes(call.data[:64])!r}...")
        # Closed loop: the calls that end in the window. Open loop: the calls due in it
        # (answered during the drain if need be), so that a step's calls are its schedule's.
        if not self.window[0] <= (call.started if self.by_due else now) < self.window[1]:
            return
        self.last_answer_at = now
        if status == "OK":
            self.latencies[call.op].append(round((now - call.started) * 1e6))
        else:
            counts = self.errors[call.op]
            counts[status] = counts.get(status, 0) + 1

    def count(self, op: str, status: str, n: int = 1) -> None:
        counts = self.errors[op]
        counts[status] = counts.get(status, 0) + n

    def in_window(self, due: float) -> bool:
        return self.window[0] <= due < self.window[1]

    def poll(self, timeout: float, on_room: Callable[[Connection, float], None]) -> None:
        for conn in self.conns:
            conn.flush()
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                if self.stop is not None and self.stop.poll() and self.stop.recv_bytes() == STOP:
                    self.stopped = True
                continue
            conn = key.data
            ended = conn.receive()
            now = time.monotonic()
            for done in ended:
                self.ended(done, now)
            if conn.closed is not None and not conn.calls:
                conn = self.replace(conn)  # GOAWAY or lost: its calls have ended
                on_room(conn, now)
            elif ended:
                on_room(conn, now)


def run_step(plan: Plan, spec: Spec, stop: Pipe | None = None) -> Outcome:
    """Run one step from this process; blocks until its window (and drain) is over."""
    step = _Step(plan, spec, stop)
    try:
        for _ in range(plan.connections):
            step.connect()
    except OSError as exc:
        return _outcome(step, 0.0, f"cannot connect to {plan.host}:{plan.port}: {exc}")
    while time.monotonic() < plan.start_at:
        time.sleep(min(0.01, max(0.0, plan.start_at - time.monotonic())))
    cpu_start = cpu_end = None
    closed = plan.mode == "closed"
    interval = 1.0 / plan.rate if plan.rate > 0 else 0.0
    next_due = plan.start_at

    def refill_closed(conn: Connection, now: float) -> None:
        while conn.in_flight < plan.streams and step.launch(conn, now):
            pass

    def refill_open(conn: Connection, now: float) -> None:
        while step.backlog and step.launch(conn, step.backlog[0]):
            step.backlog.popleft()

    if closed:
        for conn in step.conns:
            refill_closed(conn, time.monotonic())
    turn = 0
    while not step.stopped:
        now = time.monotonic()
        if cpu_start is None and now >= step.window[0]:
            cpu_start = _cpu()
        if now >= step.window[1]:
            break
        if not closed and interval > 0:
            while next_due <= now:
                step.backlog.append(next_due)
                next_due += interval
            while len(step.backlog) > MAX_BACKLOG:
                if step.in_window(step.backlog.popleft()):
                    step.count(step.sequence[step.next_pick][0], "CLIENT_BACKLOG")
            for _ in range(len(step.conns)):
                if not step.backlog:
                    break
                conn = step.conns[turn % len(step.conns)]
                turn += 1
                refill_open(conn, now)
            step.backlog_max = max(step.backlog_max, len(step.backlog))
        timeout = 0.05 if closed else max(0.0, min(0.05, next_due - time.monotonic()))
        step.poll(timeout, refill_closed if closed else refill_open)
    cpu_end = _cpu()
    if closed or step.stopped:
        drain_until = time.monotonic() + DRAIN_S
        while any(conn.calls for conn in step.conns) and time.monotonic() < drain_until:
            step.poll(0.05, lambda conn, now: None)
    else:
        _drain_open(step, refill_open)
    for conn in step.conns:
        conn.close()
    step.selector.close()
    return _outcome(step, cpu_end - (cpu_start if cpu_start is not None else cpu_end), None)


def _drain_open(step: _Step, refill: Callable[[Connection, float], None]) -> None:
    """Open loop, after the window: send what was due in it and wait for its answers
    (up to DRAIN_OPEN_S); what is still unsent or unanswered then counts as CLIENT_TIMEOUT."""
    deadline = time.monotonic() + DRAIN_OPEN_S
    while time.monotonic() < deadline:
        pending = any(step.in_window(c.started) for conn in step.conns for c in conn.calls.values())
        if not pending and not step.backlog:
            break
        for conn in list(step.conns):
            refill(conn, time.monotonic())
        step.poll(0.05, refill)
        while step.backlog and not step.in_window(step.backlog[0]):
            step.backlog.popleft()  # due after the window: never sent
    late = [c.op for conn in step.conns for c in conn.calls.values() if step.in_window(c.started)]
    for op in late:
        step.count(op, "CLIENT_TIMEOUT")
    unsent = sum(1 for due in step.backlog if step.in_window(due))
    if unsent:
        step.count(step.sequence[step.next_pick][0], "CLIENT_TIMEOUT", unsent)


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _outcome(step: _Step, cpu_s: float, connect_error: str | None) -> Outcome:
    return Outcome(
        latencies_us={op: values.tobytes() for op, values in step.latencies.items()},
        errors=step.errors,
        wrong=step.wrong,
        wrong_total=step.wrong_total,
        cpu_s=cpu_s,
        backlog_max=step.backlog_max,
        last_answer_at=step.last_answer_at,
        connect_error=connect_error,
    )
