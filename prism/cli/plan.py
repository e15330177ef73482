"""``prism plan NEEDS``: a ``prism.toml`` and a capacity table from declared needs.

    prism plan NEEDS [--bench results.json ... | --bench-quick] [--cpus N] [--out prism.toml]
                     [--force] [--json FILE|-] [--postgres DSN] [--redis URL] [--nats URL]
                     [--proto-path DIR ...]

NEEDS is a needs TOML file or a ``.proto`` file with Prism's options
(``prism.plan.needs``); the cost model and the choices are
``prism.plan.model`` and ``prism.plan.planner``, the table
``prism.plan.report``. The costs: ``--bench`` files; else a quick
``prism bench`` on this machine (``prism.plan.quick``) with
``--bench-quick`` or a yes on a terminal; else the built-in ones, said in
one line. It prints one row per namespace and one per tenant (``--json``:
the same as JSON, to a file, or with ``-`` to stdout and the table to
stderr), writes
the config (not over an existing file without ``--force``), and exits 0; a
plan that does not fit the machine prints why and the smallest machine that
would hold it, writes nothing and exits 1; a quick bench that fails, 1; bad
input (and ``--bench`` files without a figure the plan needs) is one line
and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from prism.cli.client import EXIT_FAILURE, EXIT_USAGE
from prism.errors import ConfigError

if TYPE_CHECKING:
    from prism.plan.model import CostTable
    from prism.plan.needs import Need


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = commands.add_parser("plan", help="size a deployment from declared needs (TOML or .proto)")
    plan.add_argument(
        "needs", type=Path, metavar="NEEDS", help="a needs .toml file, or a .proto with prism options"
    )
    plan.add_argument(
        "--bench",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="benchmark results to take the costs from (default: Prism's own, built in)",
    )
    plan.add_argument(
        "--bench-quick",
        action="store_true",
        help="measure the costs on this machine first (prism bench --quick; seconds per figure)",
    )
    plan.add_argument(
        "--json", metavar="FILE", help="write the plan as JSON to FILE (- : stdout, instead of the table)"
    )
    plan.add_argument("--cpus", type=_cpus, default=None, help="CPUs of the machine (default: this one's)")
    plan.add_argument("--out", type=Path, default=Path("prism.toml"), help="the config to write (prism.toml)")
    plan.add_argument("--force", action="store_true", help="write over an existing --out file")
    plan.add_argument("--postgres", metavar="DSN", help="the machine has PostgreSQL, at this DSN")
    plan.add_argument("--redis", metavar="URL", help="the machine has Redis, at this URL")
    plan.add_argument("--nats", metavar="URL", help="the machine has NATS JetStream, at this URL")
    plan.add_argument(
        "--proto-path",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="import folder for a .proto",
    )
    plan.set_defaults(handler=_cmd_plan)


def _cpus(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of CPUs: {text!r}") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"{value} CPUs: give 1 to 4096")
    return value


def _cmd_plan(args: argparse.Namespace) -> int:
    from prism.plan.costfile import load_costs
    from prism.plan.needs import load_needs

    if args.bench and args.bench_quick:
        return _usage("--bench and --bench-quick: give one (files measured already, or measure now)")
    problem = _check_json(args)
    if problem:
        return _usage(problem)
    try:
        needs = load_needs(args.needs, args.proto_path)
        table = load_costs(args.bench) if args.bench else None
    except ConfigError as exc:
        return _usage(str(exc))
    addresses = {
        k: v for k, v in (("postgres", args.postgres), ("redis", args.redis), ("nats", args.nats)) if v
    }
    cpus = args.cpus or len(os.sched_getaffinity(0))
    if table is None:
        got = _costs_here(args, needs, addresses)
        if isinstance(got, int):
            return got
        table = got
    return _plan_and_write(args, needs, table, addresses, cpus)


def _usage(text: str) -> int:
    print(f"prism plan: {text}", file=sys.stderr)
    return EXIT_USAGE


def _check_json(args: argparse.Namespace) -> str | None:
    """Why ``--json`` cannot be written (before anything is measured or written), or None."""
    if args.json is None or args.json == "-":
        return None
    path = Path(args.json)
    if not args.json.strip() or path.is_dir():
        return f"--json {args.json!r}: give a file to write (or - for stdout)"
    if path.resolve() == args.out.resolve():
        return f"--json {args.json}: is --out, the config; give another file"
    if not path.parent.is_dir():
        return f"--json {args.json}: no such directory {str(path.parent)!r}"
    return None


def _costs_here(args: argparse.Namespace, needs: list[Need], addresses: dict[str, str]) -> CostTable | int:
    """The costs without --bench: measured now (--bench-quick, or yes on a
    terminal), else the built-in ones with one line saying so."""
    import tempfile

    from prism.plan.costfile import load_costs
    from prism.plan.model import DEFAULT_COSTS
    from prism.plan.quick import QuickFailed, calibrate, calibrations_for, seconds

    runs = calibrations_for(needs, addresses)
    names = ", ".join(" ".join(r.key) for r in runs)
    measure = args.bench_quick
    if not measure and runs and sys.stdin.isatty() and sys.stderr.isatty():
        sys.stderr.write(
            f"prism plan: the costs are built in, not measured on this machine. Measure {names} "
            f"here now with prism bench --quick (about {seconds(runs, True):.0f} s)? [y/N] "
        )
        sys.stderr.flush()
        measure = sys.stdin.readline().strip().lower() in ("y", "yes")
    if not measure or not runs:
        print(
            f"prism plan: using the built-in costs, not measured on this machine; to measure them: "
            f"prism plan {args.needs} --bench-quick (prism bench --quick), or --bench results.json",
            file=sys.stderr,
        )
        return DEFAULT_COSTS
    with tempfile.TemporaryDirectory(prefix="prism-plan-bench-") as tmp:
        try:
            paths = calibrate(runs, addresses, Path(tmp), quick=True)
            return load_costs(paths, over=DEFAULT_COSTS)
        except QuickFailed as exc:
            print(f"prism plan: {exc}; plan with --bench FILE, or without --bench-quick", file=sys.stderr)
            return EXIT_FAILURE
        except ConfigError as exc:
            print(f"prism plan: the quick bench's results: {exc}", file=sys.stderr)
            return EXIT_FAILURE


def _plan_and_write(
    args: argparse.Namespace, needs: list[Need], table: CostTable, addresses: dict[str, str], cpus: int
) -> int:
    from prism.config import load_config
    from prism.plan.costfile import missing_line
    from prism.plan.planner import config_toml, make_plan
    from prism.plan.report import as_json, print_table

    plan = make_plan(needs, table, cpus, addresses)
    if plan.missing:
        return _usage(missing_line(table, "; ".join(plan.missing)))
    # With --json -, stdout is the JSON alone; the table goes to stderr.
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print_table(plan, table, cpus, table_out)
    if args.json == "-":
        sys.stdout.write(json.dumps(as_json(plan, table, cpus), indent=2) + "\n")
    if args.json not in (None, "-"):
        try:
            Path(args.json).write_text(json.dumps(as_json(plan, table, cpus), indent=2) + "\n")
        except OSError as exc:
            return _usage(f"--json {args.json}: cannot write: {exc.strerror}")
    if not plan.fits:
        for problem in plan.problems:
            print(f"prism plan: cannot meet: {problem}", file=sys.stderr)
        print(
            f"prism plan: the smallest machine that holds this plan has {plan.cpus_needed} CPUs",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if args.out.exists() and not args.force:
        print(
            f"prism plan: {args.out} exists: give --force to write over it, or another --out", file=sys.stderr
        )
        return EXIT_USAGE
    # Checked by Prism's own loader before it replaces anything: an address
    # given on the command line (--redis notaurl) must not make a config
    # that `prism serve` refuses.
    scratch = args.out.with_name(f".{args.out.name}.plan")
    try:
        scratch.write_text(config_toml(plan, addresses))
        load_config(str(scratch), {}, {})
        os.replace(scratch, args.out)
    except ConfigError as exc:
        print(f"prism plan: the planned config is not valid: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"prism plan: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        scratch.unlink(missing_ok=True)
    print(f"wrote {args.out}", file=table_out)
    return 0


__all__ = ["add_commands"]
