"""``prism apply FILE``: make a running server adopt a config file, after showing what changes.

1. The file is checked here as ``prism serve`` checks its config
   (``prism.config``; this shell's ``PRISM_*`` variables play no part: they
   are not the server's).
2. The server checks it again, its own way (its environment and flags,
   the files it names, its routing table's room), and answers what adopting
   it changes: ``POST /v1/config?dry_run=1`` (``prism.admin.config_api``).
   The diff is worked out by the server, which has both configs: no copy of
   the running one, and no secret, leaves it.
3. With ``--yes`` or a ``y`` at the prompt, ``POST /v1/config`` writes the
   file and reloads, and ``prism apply`` waits (``--wait``) until the
   reload is in effect. It sends the digest of the running config the diff
   was made against: if something else changed it meanwhile, nothing is
   written (exit 1) and apply is to be run again.

The admin port is ``--admin`` (``HOST:PORT`` or an http/https URL), else
``$PRISM_ADMIN_ENDPOINT``, else the file's own ``admin_listen``. The token is
``--token-file`` (``$PRISM_ADMIN_TOKEN_FILE``), else the file's
``admin_token_file`` when this user can read it.

Exit codes: 0 applied and in effect, a dry run, or nothing to apply; 1 the
server could not be reached or did not adopt the file (refused, declined at
the prompt, not in effect within ``--wait``); 2 the file is not a valid
config (here, or as the server checked it), or a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import msgspec

from prism.cli import admin_http, credentials
from prism.cli.admin_http import AdminError
from prism.cli.client import DEFAULT_TIMEOUT_S, EXIT_FAILURE, EXIT_USAGE, positive_seconds
from prism.cli.credentials import ADMIN_OPTIONS, CredentialsError
from prism.config import ServerConfig, load_config_text
from prism.errors import ConfigError
from prism.redact import redact

DEFAULT_WAIT_S = 30.0
CONTENT_TYPE = "application/toml"
MAX_CONFIG_BYTES = 1024 * 1024  # what POST /v1/config takes (prism.admin.config_api.MAX_BODY_BYTES)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    apply = commands.add_parser("apply", help="make a running server adopt a config file (shows the diff)")
    apply.add_argument("file", metavar="FILE", help="the TOML config file")
    apply.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    apply.add_argument("--yes", "-y", action="store_true", help="apply without asking")
    apply.add_argument(
        "--admin",
        metavar="URL",
        default=os.environ.get("PRISM_ADMIN_ENDPOINT") or None,
        help="the admin port, HOST:PORT or http(s)://HOST:PORT (default: $PRISM_ADMIN_ENDPOINT, "
        "else the file's admin_listen)",
    )
    apply.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each request, besides --wait (default: {DEFAULT_TIMEOUT_S:g})",
    )
    apply.add_argument(
        "--wait",
        type=positive_seconds,
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help=f"how long to wait for the reload to be in effect (default: {DEFAULT_WAIT_S:g}, at most 120)",
    )
    credentials.add_options(apply, ADMIN_OPTIONS)
    apply.set_defaults(handler=_cmd_apply)


def _fail(line: str, code: int) -> int:
    print(redact(line), file=sys.stderr)
    return code


def _cmd_apply(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as f:
            data = f.read()
    except OSError as exc:
        return _fail(f"prism: cannot read {args.file}: {exc.strerror or exc}", EXIT_USAGE)
    if len(data) > MAX_CONFIG_BYTES:
        return _fail(
            f"prism: {args.file} is over {MAX_CONFIG_BYTES} bytes, the most a server takes", EXIT_USAGE
        )
    try:
        config = load_config_text(data, args.file, {}, {})
    except ConfigError as exc:
        return _fail(f"prism: config error: {exc}", EXIT_USAGE)
    endpoint = args.admin or _admin_of(config)
    try:
        address, https = admin_http.host_port(endpoint)
        if args.token_file is None and not os.environ.get("PRISM_ADMIN_TOKEN_FILE"):
            token_file = config.admin_token_file
            args.token_file = token_file if token_file and os.access(token_file, os.R_OK) else None
        # Over https the token travels encrypted whatever the host: check it as a local one.
        creds = credentials.load(args, os.environ, "localhost:1" if https else address, ADMIN_OPTIONS)
    except ValueError as exc:
        return _fail(f"prism: --admin {exc}", EXIT_USAGE)
    except CredentialsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    post = _Poster(endpoint, creds, data, args.timeout)
    try:
        status, plan = post("/v1/config?dry_run=1", 0.0)
        if status != 200:
            return _refused(status, plan, endpoint)
        for line in _plan_lines(plan, args.file, endpoint):
            print(line, flush=True)
        if args.dry_run:
            return 0
        if not plan["changes"] and plan.get("same_file"):
            print("nothing to apply: the server runs this config already")
            return 0
        if not args.yes and not _confirm(endpoint):
            return _fail("prism: not applied", EXIT_FAILURE)
        status, outcome = post(f"/v1/config?base={plan['base']}&wait={args.wait:g}", args.wait)
    except AdminError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    if status == 200:
        print(f"applied: in effect (routing generation {outcome.get('generation')})")
        return 0
    if status == 202:
        where = (
            "accepted, its new workers are starting" if outcome.get("reload") == "pending" else "not started"
        )
        return _fail(
            f"prism: the file is written but the reload ({where}) is not in effect after {args.wait:g}s: "
            "see `prism ns list` and the server's log",
            EXIT_FAILURE,
        )
    return _refused(status, outcome, endpoint)


class _Poster:
    """``POST`` the file to a path of the admin port; the status and the JSON answer."""

    def __init__(self, endpoint: str, creds: credentials.Credentials, data: bytes, timeout_s: float) -> None:
        self.endpoint, self.creds, self.data, self.timeout_s = endpoint, creds, data, timeout_s

    def __call__(self, path: str, wait_s: float) -> tuple[int, dict[str, Any]]:
        status, body = admin_http.request(
            self.endpoint,
            self.creds,
            path,
            self.timeout_s + wait_s,
            body=self.data,
            content_type=CONTENT_TYPE,
        )
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise AdminError(admin_http.http_error(status, body, self.creds))
        return status, answer


def _admin_of(config: ServerConfig) -> str:
    scheme = "https" if config.admin.tls is not None else "http"
    return f"{scheme}://{config.admin_listen}"


def _refused(status: int, answer: dict[str, Any], endpoint: str) -> int:
    error = str(answer.get("error", "")) or f"HTTP {status}"
    if status in (400, 422):
        if answer.get("restored"):
            error += " (the previous file was put back)"
        return _fail(f"prism: the server refused the config: {error}", EXIT_USAGE)
    return _fail(f"prism: {endpoint} answered {status}: {error}", EXIT_FAILURE)


def _plan_lines(plan: dict[str, Any], file: str, endpoint: str) -> list[str]:
    changes = plan["changes"]
    where = f"the server at {endpoint} (its file: {plan.get('file', '?')})"
    lines = [
        f"{file} is valid. Changes to {where}:" if changes else f"{file} is valid. No change to {where}."
    ]
    lines += [f"  {change['text']}" for change in changes]
    running, after = plan.get("running_workers", {}), plan.get("workers", {})
    if running != after:
        total = sum(after.values())
        counts = ", ".join(f"{name} {count}" for name, count in after.items())
        lines.append(f"workers after: {counts} ({total} in all; running now: {sum(running.values())})")
    return lines


def _confirm(endpoint: str) -> bool:
    print(f"Apply to {endpoint}? [y/N] ", end="", flush=True)
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        print()  # no answer (end of input): finish the prompt's line
    return answer.strip().lower() in ("y", "yes")
