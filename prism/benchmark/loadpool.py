"""The built-in load generator's processes: started once per run, given one step at a time.

One Python process cannot drive more calls than one CPU allows, so the
generator is ``processes`` processes (default: one per load CPU), each
pinned to the load CPUs, each running ``loadgen.run_step`` over its share of
the connections (closed loop) or of the rate (open loop). They are started
with ``spawn`` (a fresh interpreter: nothing of the parent, no fork of a
process holding sockets or threads) and ignore SIGINT: Ctrl-C reaches the
parent, which tells them to stop (``STOP``) and collects what they measured.
"""

from __future__ import annotations

import array
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

import msgspec

from prism.benchmark.loadgen import STOP, Outcome, Plan, run_step
from prism.benchmark.workload import Spec

START_DELAY_S = 0.5  # between sending a step and its start: time to connect
QUIT = b"quit"
_encoder = msgspec.msgpack.Encoder()


def _serve(pipe: Pipe, cpus: tuple[int, ...]) -> None:
    """A load process: run the steps it is sent until told to quit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpus:
        os.sched_setaffinity(0, cpus)
    plan_decoder = msgspec.msgpack.Decoder(tuple[Plan, Spec])
    while True:
        message = pipe.recv_bytes()
        if message == QUIT:
            return
        if message == STOP:
            continue  # a stop that arrived after its step ended
        plan, spec = plan_decoder.decode(message)
        pipe.send_bytes(_encoder.encode(run_step(plan, spec, pipe)))


class StepTotals(msgspec.Struct):
    """One step's figures, summed over the load processes."""

    latencies_us: dict[str, list[int]]  # op -> sorted latencies of OK calls
    errors: dict[str, dict[str, int]]
    wrong: list[str]
    wrong_total: int
    loadgen_cpu_s: float
    backlog_max: int
    last_answer_at: float  # time.monotonic() of the last answer to a call of the window

    @property
    def ok_calls(self) -> int:
        return sum(len(v) for v in self.latencies_us.values())


class LoadPool:
    """``processes`` load processes pinned to ``cpus``; use as a context manager."""

    def __init__(self, processes: int, cpus: tuple[int, ...]) -> None:
        self.processes = processes
        self.cpus = cpus
        self._pipes: list[Pipe] = []
        self._procs: list[Any] = []

    def __enter__(self) -> LoadPool:
        context = multiprocessing.get_context("spawn")
        for _ in range(self.processes):
            parent, child = context.Pipe()
            proc = context.Process(target=_serve, args=(child, self.cpus), daemon=True)
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)
        return self

    def __exit__(self, *exc: object) -> None:
        for pipe in self._pipes:
            try:
                pipe.send_bytes(QUIT)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def start(self, plan: Plan, spec: Spec) -> float:
        """Send each process its share of ``plan``; when the step starts (``time.monotonic``)."""
        start_at = time.monotonic() + START_DELAY_S
        n = self.processes
        for index, pipe in enumerate(self._pipes):
            share = msgspec.structs.replace(
                plan,
                connections=plan.connections // n + (1 if index < plan.connections % n else 0),
                rate=plan.rate / n,
                start_at=start_at,
                seed=plan.seed * 1000 + index,
            )
            if share.connections == 0:
                share = msgspec.structs.replace(share, connections=1, streams=0, rate=0.0)
            pipe.send_bytes(_encoder.encode((share, spec)))
        return start_at

    def stop(self) -> None:
        """Ask every process to end its step now (Ctrl-C)."""
        for pipe in self._pipes:
            try:
                pipe.send_bytes(STOP)
            except OSError:
                pass

    def collect(self, timeout_s: float) -> StepTotals:
        """Wait for every process's outcome and sum them."""
        decoder = msgspec.msgpack.Decoder(Outcome)
        outcomes = []
        for pipe in self._pipes:
            if not pipe.poll(timeout_s):
                raise RuntimeError(f"a load process did not report within {timeout_s:g}s")
            outcomes.append(decoder.decode(pipe.recv_bytes()))
        return merge(outcomes)


def merge(outcomes: list[Outcome]) -> StepTotals:
    """Sum the outcomes of the processes of one step; raise on a failed connect."""
    for outcome in outcomes:
        if outcome.connect_error:
            raise ConnectionError(outcome.connect_error)
    latencies: dict[str, list[int]] = {}
    errors: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        for op, raw in outcome.latencies_us.items():
            latencies.setdefault(op, []).extend(array.array("q", raw))
        for op, counts in outcome.errors.items():
            mine = errors.setdefault(op, {})
            for status, count in counts.items():
                mine[status] = mine.get(status, 0) + count
    for values in latencies.values():
        values.sort()
    return StepTotals(
        latencies_us=latencies,
        errors=errors,
        wrong=[w for o in outcomes for w in o.wrong][:5],
        wrong_total=sum(o.wrong_total for o in outcomes),
        loadgen_cpu_s=sum(o.cpu_s for o in outcomes),
        backlog_max=sum(o.backlog_max for o in outcomes),
        last_answer_at=max((o.last_answer_at for o in outcomes), default=0.0),
    )
