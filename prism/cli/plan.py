"""``prism plan NEEDS``: a ``prism.toml`` and a capacity table from declared needs.

    prism plan NEEDS [--bench results.json ...] [--cpus N] [--out prism.toml] [--force]
                     [--postgres DSN] [--redis URL] [--nats URL] [--proto-path DIR ...]

NEEDS is a needs TOML file or a ``.proto`` file with Prism's options
(``prism.plan.needs``); the cost model and the choices are
``prism.plan.model`` and ``prism.plan.planner``. It prints one row per
namespace and one per tenant, writes the config (not over an existing file
without ``--force``), and exits 0; a plan that does not fit the machine
prints why and the smallest machine that would hold it, writes nothing and
exits 1; bad input is one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prism.cli.client import EXIT_FAILURE, EXIT_USAGE
from prism.errors import ConfigError


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
    from prism.config import load_config
    from prism.plan.model import TARGET_UTILISATION, load_costs
    from prism.plan.needs import load_needs
    from prism.plan.planner import config_toml, make_plan

    try:
        needs = load_needs(args.needs, args.proto_path)
        table = load_costs(args.bench)
    except ConfigError as exc:
        print(f"prism plan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    addresses = {
        k: v for k, v in (("postgres", args.postgres), ("redis", args.redis), ("nats", args.nats)) if v
    }
    cpus = args.cpus or len(os.sched_getaffinity(0))
    plan = make_plan(needs, table, cpus, addresses)
    print(f"costs: {table.source}; each worker one CPU, sized for {TARGET_UTILISATION:.0%} of it at the peak")
    print(f"{'namespace':<20} {'abstraction':<11} {'backend':<9} {'cache':<5} {'calls/s':>9} "
          f"{'us/call':>8} {'tenant':<12}")  # fmt: skip
    for tenant in plan.tenants:
        for c in tenant.choices:
            calls = c.need.read_rps + c.need.write_rps
            print(
                f"{c.need.namespace:<20} {c.need.abstraction:<11} {c.backend:<9} "
                f"{'yes' if c.cached else 'no':<5} {calls:>9,.0f} {c.demand.cpu_us_per_s / calls:>8.1f} "
                f"{tenant.name:<12}"
            )
    print(f"\n{'tenant':<12} {'workers':>7} {'load per worker':>16} {'headroom':>9}")
    for tenant in plan.tenants:
        load = tenant.utilisation
        print(f"{tenant.name:<12} {tenant.workers:>7} {load:>16.0%} {1 - load:>9.0%}")
    print(f"\nCPUs needed: {plan.cpus_needed} (this machine: {cpus})")
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
    print(f"wrote {args.out}")
    return 0


__all__ = ["add_commands"]
