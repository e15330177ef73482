"""``prism migrate``: move a KeyValue namespace to another backend while it serves.

    prism migrate start NS --to postgres --options '{dsn = "postgresql://127.0.0.1/app"}' [--rate N]
                           [--shadow-fraction F]
    prism migrate status [NS]     # phase, copied, records/s, mismatches, workers not caught up
    prism migrate promote NS      # the target answers from now on
    prism migrate finish NS       # the config names the target; the source is let go (data kept)
    prism migrate abort NS        # back to the source alone, at any phase before finish
    prism migrate rate NS N       # the backfill's records/s, while it runs

Each goes through the admin port's ``/v1/migrations`` (``prism.admin.migrations_api``),
as ``prism ns`` and ``prism apply`` do: ``--endpoint`` (``$PRISM_ADMIN_ENDPOINT``,
else ``localhost:8981``), ``--token-file`` for the admin token the commands
that change something need. ``--options`` is a TOML inline table, as the
namespace's ``options`` are written in the config file. A command returns
once every worker of the namespace's tenant applied it (``--wait``).

Exit codes: 0 done; 1 the server could not be reached, refused the command
for the migration's state (its phase does not allow it), or its workers did
not all apply it within ``--wait``; 2 a usage error or a request the server
found malformed (bad option, unknown namespace, same backend).
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Iterator
from typing import Any

import msgspec

from prism.cli import admin_http, credentials
from prism.cli.admin_http import AdminError
from prism.cli.client import DEFAULT_TIMEOUT_S, EXIT_FAILURE, EXIT_USAGE, positive_seconds
from prism.cli.credentials import ADMIN_OPTIONS, CredentialsError
from prism.redact import redact

DEFAULT_ADMIN_ENDPOINT = "localhost:8981"
DEFAULT_WAIT_S = 10.0
MAX_WAIT_S = 120.0
_USAGE_STATUSES = frozenset({400, 404, 413, 415, 422})


def _rate(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of records/s") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{value} is not from 1 to 1000000 records/s")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not from 0 to 1")
    return value


def _options(text: str) -> dict[str, Any]:
    try:
        table = tomllib.loads(f"options = {text}")["options"]
    except tomllib.TOMLDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not a TOML inline table ({exc}); e.g. '{{dsn = \"...\"}}'"
        ) from None
    if not isinstance(table, dict):
        raise argparse.ArgumentTypeError("expected a TOML inline table, e.g. '{dsn = \"...\"}'")
    return table


def _common(parser: argparse.ArgumentParser, *, wait: bool) -> None:
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("PRISM_ADMIN_ENDPOINT") or DEFAULT_ADMIN_ENDPOINT,
        help=f"the admin port, HOST:PORT (default: $PRISM_ADMIN_ENDPOINT or {DEFAULT_ADMIN_ENDPOINT})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of the request, besides --wait (default: {DEFAULT_TIMEOUT_S:g})",
    )
    if wait:
        parser.add_argument(
            "--wait",
            type=positive_seconds,
            default=DEFAULT_WAIT_S,
            metavar="SECONDS",
            help=f"how long every worker may take to apply it (default: {DEFAULT_WAIT_S:g}, at most 120)",
        )
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    credentials.add_options(parser, ADMIN_OPTIONS)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser("migrate", help="move a KeyValue namespace to another backend, live")
    ops = migrate.add_subparsers(dest="migrate_command", required=True, metavar="OP")
    start = ops.add_parser("start", help="begin: dual writes, then the backfill")
    start.add_argument("namespace", metavar="NS")
    start.add_argument("--to", required=True, metavar="BACKEND", help="sqlite, postgres or redis")
    start.add_argument(
        "--options",
        type=_options,
        default={},
        metavar="TOML",
        help="the target's options, a TOML inline table",
    )
    start.add_argument(
        "--rate", type=_rate, default=None, metavar="N", help="backfill records/s (default 1000)"
    )
    start.add_argument(
        "--shadow-fraction", type=_fraction, default=None, metavar="F", help="share of reads shadowed (0.1)"
    )
    status = ops.add_parser("status", help="phase and progress (every migration without NS)")
    status.add_argument("namespace", metavar="NS", nargs="?")
    _common(status, wait=False)
    for name, text in (
        ("promote", "the target answers reads and writes (the backfill must be done)"),
        ("finish", "the config names the target; the source is let go"),
        ("abort", "back to the source alone"),
    ):
        op = ops.add_parser(name, help=text)
        op.add_argument("namespace", metavar="NS")
        _common(op, wait=True)
    rate = ops.add_parser("rate", help="change the backfill's records/s while it runs")
    rate.add_argument("namespace", metavar="NS")
    rate.add_argument("rate", type=_rate, metavar="N")
    _common(rate, wait=True)
    _common(start, wait=True)
    migrate.set_defaults(handler=_cmd_migrate)


def _fail(line: str, code: int) -> int:
    print(redact(line), file=sys.stderr)
    return code


def _cmd_migrate(args: argparse.Namespace) -> int:
    command: str = args.migrate_command
    try:
        creds = credentials.load(args, os.environ, args.endpoint, ADMIN_OPTIONS)
    except CredentialsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    wait_s = min(MAX_WAIT_S, getattr(args, "wait", 0.0))
    if command == "status":
        path, body = "/v1/migrations" + (f"/{args.namespace}" if args.namespace else ""), None
    else:
        fields: dict[str, Any] = {}
        if command == "start":
            fields = {"to": args.to, "options": args.options}
            if args.rate is not None:
                fields["rate"] = args.rate
            if args.shadow_fraction is not None:
                fields["shadow_fraction"] = args.shadow_fraction
        elif command == "rate":
            fields = {"rate": args.rate}
        path, body = f"/v1/migrations/{args.namespace}/{command}?wait={wait_s:g}", msgspec.json.encode(fields)
    try:
        status, raw = admin_http.request(
            args.endpoint,
            creds,
            path,
            args.timeout + wait_s,
            body=body,
            content_type="application/json" if body is not None else "",
        )
    except AdminError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    try:
        answer = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        answer = None
    if not isinstance(answer, dict):
        return _fail(admin_http.http_error(status, raw, creds), EXIT_FAILURE)
    if status != 200:
        error = str(answer.get("error", "")) or f"HTTP {status}"
        return _fail(
            f"prism: migrate {command}: {error}", EXIT_USAGE if status in _USAGE_STATUSES else EXIT_FAILURE
        )
    if args.json:
        print(raw.decode().rstrip())
        return 0
    entries = answer.get("migrations", [answer])
    if not entries:
        print("no migrations under way")
    for entry in entries:
        for line in render(entry):
            print(line)
    return 0


def render(entry: dict[str, Any]) -> Iterator[str]:
    """A migration as a few lines of text (``status`` and every command's answer)."""
    progress = entry.get("progress", {})
    lagging = entry.get("lagging") or []
    yield (
        f"{entry['namespace']}: {entry['phase']} ({entry['source_backend']} -> {entry['target_backend']}, "
        f"serial {entry['serial']}, tenant {entry['tenant']})"
        + (f"; workers not caught up: {', '.join(map(str, lagging))}" if lagging else "")
    )
    done = "done" if progress.get("done") else "running"
    total, percent, eta = progress.get("total"), progress.get("percent"), progress.get("eta_s")
    of = f" of ~{total}" if total is not None else ""
    share = f"{percent:g}%, " if percent is not None else ""
    left = f", about {eta:g} s left" if eta is not None and not progress.get("done") else ""
    yield (
        f"  backfill: {progress.get('copied', 0)}{of} records copied ({share}{done}), "
        f"{progress.get('records_per_s', 0):g} records/s{left}, rate limit {entry['rate']}/s"
    )
    mismatches = progress.get("mismatches") or {}
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(mismatches.items())) or "none"
    yield (
        f"  shadow reads: {progress.get('shadow_reads', 0)} (fraction {entry['shadow_fraction']:g}), "
        f"mismatches: {kinds} (rate {progress.get('mismatch_rate', 0.0):.4f})"
    )
    yield (
        f"  target failures: {progress.get('target_failures', 0)}, queued: {progress.get('queued', 0)}, "
        f"pending: {progress.get('pending', 0)}, dropped: {progress.get('dropped', 0)}"
    )
