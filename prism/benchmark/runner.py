"""A whole ``prism bench`` run: start the server, seed, climb the ladder, stop, write.

The server (when the bench starts its own) runs in its own session, so
Ctrl-C reaches only the bench, which then stops the load, keeps the steps
measured so far (the cut step marked ``complete: false``), stops the server
and writes the results anyway. The server is stopped whatever happens.
"""

from __future__ import annotations

import datetime
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import msgspec

from prism.benchmark import h2load
from prism.benchmark.loadpool import LoadPool
from prism.benchmark.machine import machine
from prism.benchmark.procstat import ServerFailed
from prism.benchmark.results import KIND, SCHEMA_VERSION, Results, ServerSetup, Step, saturation
from prism.benchmark.scenario import Scenario
from prism.benchmark.seed import SeedFailed, seed_and_learn
from prism.benchmark.serverconf import Placement, pin_self, place, start_server
from prism.benchmark.servers import PrismServer
from prism.benchmark.steps import (
    Interrupted,
    Meter,
    Rung,
    fixed_request,
    run_builtin,
    run_h2load,
    step_record,
)
from prism.benchmark.workload import Calls, Spec
from prism.config import parse_host_port

GENERATORS = ("auto", "builtin", "h2load")


class BenchFailed(RuntimeError):
    """The run could not go on: the server failed, seeding failed, answers were wrong."""


@dataclass
class Options:
    scenario: Scenario
    scenario_file: str
    out: Path
    quick: bool = False
    target: str | None = None  # HOST:PORT of a running server (None: start one)
    admin: str | None = None  # its admin URL, for /metrics
    load_generator: str = "auto"
    seed: bool = True  # False: the records are there already (a previous run); only check them
    progress: TextIO = field(default_factory=lambda: sys.stderr)


def spec_of(scenario: Scenario) -> Spec:
    w = scenario.workload
    return Spec(
        namespace=scenario.namespace.name,
        weights=w.mix.weights(),
        records=w.records,
        value_bytes=w.value_bytes,
        distribution=w.key_distribution,
        zipf_skew=w.zipf_skew,
        events_per_series=w.events_per_series,
        scan_limit=w.scan_limit,
    )


def rungs(scenario: Scenario, quick: bool) -> list[Rung]:
    warmup, duration = scenario.durations(quick)
    load = scenario.load
    return [
        Rung(i, load.mode, value, load.streams_per_connection, load.connections, warmup, duration)
        for i, value in enumerate(scenario.steps(quick))
    ]


def run(opts: Options) -> Results:
    """Run the scenario; the results (outcome "ok", "interrupted" or "failed")."""
    scenario = opts.scenario
    started_at = _now()
    own = opts.target is None
    placement = place(scenario, own)
    warnings = [placement.warning] if placement.warning else []
    steps: list[Step] = []
    failure: str | None = None
    interrupted = False
    server: PrismServer | None = None
    processes = scenario.load.processes or max(1, len(placement.load or (0,)))
    setup = ServerSetup(own, opts.target or "", scenario.server.workers if own else None,
                        list(placement.server) if placement.server else None,
                        list(placement.load) if placement.load else None, processes)  # fmt: skip
    info = machine(scenario.namespaces)
    with tempfile.TemporaryDirectory(prefix="prism-bench-") as workdir:
        try:
            pin_self(placement.load)
            if own:
                _say(opts, "starting prism serve")
                server = start_server(scenario, Path(workdir), placement.server)
                host, port = "127.0.0.1", server.port
                admin: str | None = server.admin_url
                setup = msgspec.structs.replace(setup, target=server.target)
            else:
                host, port = parse_host_port(opts.target or "")
                admin = opts.admin
            _say(opts, "seeding" if opts.seed else "checking the seeded records")
            spec = seed_and_learn(host, port, spec_of(scenario), write=opts.seed)
            steps, interrupted, failure = _ladder(opts, spec, host, port, admin, server, placement, processes)
        except KeyboardInterrupt:
            interrupted = True
        except (ServerFailed, SeedFailed, BenchFailed, h2load.LoadFailed, OSError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug here: still stop the server and write what was measured
            failure = f"unexpected {type(exc).__name__}: {exc}"
        finally:
            if server is not None:
                if server.proc is not None and server.proc.poll() is not None and failure is None:
                    failure = f"prism serve exited with {server.proc.returncode}"
                server.stop()
            if opts.progress.isatty():
                opts.progress.write("\n")
    outcome = "failed" if failure else "interrupted" if interrupted else "ok"
    return Results(
        schema_version=SCHEMA_VERSION,
        kind=KIND,
        outcome=outcome,
        failure=failure,
        started_at=started_at,
        finished_at=_now(),
        scenario_file=opts.scenario_file,
        scenario=msgspec.to_builtins(scenario),
        quick=opts.quick,
        server=setup,
        machine=info,
        steps=steps,
        saturation=saturation(steps),
        warnings=warnings,
    )


def _ladder(
    opts: Options,
    spec: Spec,
    host: str,
    port: int,
    admin: str | None,
    server: PrismServer | None,
    placement: Placement,
    processes: int,
) -> tuple[list[Step], bool, str | None]:
    """Run every step; (steps, interrupted, failure)."""
    all_rungs = rungs(opts.scenario, opts.quick)
    fixed = fixed_request(spec, Calls(spec))
    use_h2load = opts.load_generator == "h2load" or (
        opts.load_generator == "auto" and fixed is not None and h2load.h2load_path() is not None
    )
    if opts.load_generator == "h2load" and (fixed is None or h2load.h2load_path() is None):
        raise BenchFailed(
            "--load-generator h2load: "
            + ("h2load is not installed" if fixed else "this workload is not one fixed request")
        )
    meter = Meter(server, placement.server, admin)
    steps: list[Step] = []
    ends = _Clock(opts, all_rungs)
    with LoadPool(processes, placement.load or ()) as pool:
        for rung in all_rungs:
            closed = rung.mode == "closed"
            generator = "h2load" if use_h2load and closed else "builtin"
            ends.begin(rung, generator)
            try:
                if generator == "h2load" and fixed is not None:
                    totals, readings, conns = run_h2load(fixed, rung, host, port, meter, ends.wait)
                else:
                    totals, readings, conns = run_builtin(pool, spec, rung, host, port, meter, ends.wait)
            except Interrupted as cut:
                if cut.totals is not None:
                    steps.append(
                        step_record(rung, generator, cut.totals, cut.readings, cut.connections, False)
                    )
                return steps, True, None
            except KeyboardInterrupt:
                return steps, True, None
            steps.append(step_record(rung, generator, totals, readings, conns, True))
            if totals.wrong_total:
                shown = "; ".join(totals.wrong)
                return steps, False, f"{totals.wrong_total} wrong answers in step {rung.index}: {shown}"
            if server is not None:
                server.check_alive()
    return steps, False, None


class _Clock:
    """Waits, and the progress line: step i/n, what it loads, time left."""

    def __init__(self, opts: Options, all_rungs: list[Rung]) -> None:
        self.opts, self.rungs = opts, all_rungs
        self.rung = all_rungs[0]
        self.label = ""
        self.step_end = 0.0

    def begin(self, rung: Rung, generator: str) -> None:
        self.rung = rung
        what = f"{int(rung.value)} in flight" if rung.mode == "closed" else f"{rung.value:g} calls/s offered"
        self.label = f"step {rung.index + 1}/{len(self.rungs)}: {what} ({generator})"
        self.step_end = time.monotonic() + rung.warmup_s + rung.duration_s + 0.5
        if not self.opts.progress.isatty():
            self.opts.progress.write(f"{self.label}, {_clock(self._left(time.monotonic()))} left\n")
            self.opts.progress.flush()

    def wait(self, until: float) -> None:
        while (now := time.monotonic()) < until:
            if self.opts.progress.isatty():
                self.opts.progress.write(f"\r{self.label}, {_clock(self._left(now))} left   ")
                self.opts.progress.flush()
            time.sleep(min(0.25, until - now))

    def _left(self, now: float) -> float:
        later = sum(r.warmup_s + r.duration_s + 1.0 for r in self.rungs[self.rung.index + 1 :])
        return max(0.0, self.step_end - now) + later


def _clock(seconds: float) -> str:
    s = math.ceil(seconds)
    return f"{s // 60}:{s % 60:02d}"


def _say(opts: Options, text: str) -> None:
    opts.progress.write(f"prism bench: {text}\n")
    opts.progress.flush()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
