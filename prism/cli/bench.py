"""``prism bench SCENARIO.toml``: load a Prism as a scenario says, write results and a report.

    prism bench SCENARIO.toml [--target HOST:PORT] [--admin URL] [--out DIR] [--quick]
                              [--load-generator auto|builtin|h2load]

Without ``--target`` it starts its own ``prism serve`` from the scenario
(temporary data dir, free ports, pinned) and stops it after. The engine is
``prism.benchmark``; the results' schema is docs/bench-results.md.

Exit codes: 0 done, 1 the run failed (server, seeding, a wrong answer:
results.json says why), 2 a bad scenario or option, 130 interrupted by
Ctrl-C (what was measured is written).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from prism.cli.client import EXIT_FAILURE, EXIT_USAGE
from prism.config import parse_host_port
from prism.errors import ConfigError

EXIT_INTERRUPTED = 130


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = commands.add_parser(
        "bench", help="benchmark a Prism with a scenario; writes results.json and report.html"
    )
    bench.add_argument("scenario", metavar="SCENARIO.toml", help="the scenario (see bench/scenarios/)")
    bench.add_argument("--target", metavar="HOST:PORT", help="load this running server (default: start one)")
    bench.add_argument("--admin", metavar="URL", help="with --target: its admin URL, for /metrics figures")
    bench.add_argument("--out", metavar="DIR", help="output directory (default ./prism-bench-<timestamp>)")
    bench.add_argument("--quick", action="store_true", help="seconds, not minutes: at most 3 short steps")
    bench.add_argument(
        "--load-generator",
        choices=("auto", "builtin", "h2load"),
        default="auto",
        help="auto: h2load for steps of one fixed request when installed, else the built-in one",
    )
    bench.add_argument(
        "--no-seed",
        action="store_true",
        help="with --target: the records are there from an earlier run; check them, do not write them",
    )
    bench.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from prism.benchmark import report, results, runner
    from prism.benchmark.scenario import load_scenario

    try:
        scenario = load_scenario(args.scenario)
        if args.target:
            parse_host_port(args.target)
    except ConfigError as exc:
        print(f"prism bench: {args.scenario}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"prism bench: --target: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.no_seed and not args.target:
        print(
            "prism bench: --no-seed goes with --target (a server the bench starts is empty)", file=sys.stderr
        )
        return EXIT_USAGE
    if args.admin and not args.target:
        print("prism bench: --admin goes with --target (a server the bench starts is metered anyway)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if args.load_generator == "h2load":
        from prism.benchmark.h2load import h2load_path
        from prism.benchmark.steps import one_request

        if h2load_path() is None:
            print("prism bench: --load-generator h2load: h2load is not installed (nghttp2-client)",
                  file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        if not one_request(runner.spec_of(scenario)) or scenario.load.mode != "closed":
            print("prism bench: --load-generator h2load: h2load sends one fixed request in a closed loop; "
                  "this scenario needs the built-in generator", file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"prism-bench-{stamp}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"prism bench: --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    opts = runner.Options(
        scenario=scenario,
        scenario_file=str(args.scenario),
        out=out,
        quick=args.quick,
        target=args.target,
        admin=args.admin,
        load_generator=args.load_generator,
        seed=not args.no_seed,
    )
    try:
        outcome = runner.run(opts)
    except runner.BenchFailed as exc:
        print(f"prism bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    results.write(out / "results.json", outcome)
    report.write_report(outcome, out)
    print(f"results: {out / 'results.json'}")
    print(f"report:  {out / 'report.html'}")
    if not report.have_matplotlib():
        print(f"prism bench: {report.INSTALL_HINT}", file=sys.stderr)
    sat = outcome.saturation
    if sat is not None:
        p99 = sat.at_80pct.p99_us
        print(
            f"saturation: {sat.calls_per_s:,.0f} calls/s; p99 at 80% of it: "
            + (f"{p99 / 1000:.2f} ms" if p99 is not None else "n/a")
        )
        if sat.per_worker is not None:
            print(
                f"per worker at 100% of its CPU: {sat.per_worker.calls_per_cpu_s:,.0f} calls/s "
                f"(step {sat.per_worker.step + 1}, worker {sat.per_worker.worker_busy_pct:.0f}% busy)"
            )
    if outcome.outcome == "failed":
        print(f"prism bench: failed: {outcome.failure}", file=sys.stderr)
        return EXIT_FAILURE
    if outcome.outcome == "interrupted":
        print("prism bench: interrupted; the steps measured so far are written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
