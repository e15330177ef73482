"""``prism ns list``: the namespaces a running server holds, from its admin port.

It reads ``GET /v1/namespaces`` (``prism.admin.app``) over HTTP, or HTTPS with
``--tls-ca`` (``prism.cli.admin_http``), sending ``--token-file``'s token as ``Authorization: Bearer``
when the admin port wants one (``admin_token_file``). The endpoint is the
admin port (``admin_listen``), not the gRPC one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

import msgspec

from prism.cli import admin_http, credentials
from prism.cli.admin_http import AdminError
from prism.cli.client import (
    DEFAULT_TIMEOUT_S,
    EXIT_FAILURE,
    EXIT_USAGE,
    display_text,
    positive_seconds,
    to_json,
)
from prism.cli.credentials import ADMIN_OPTIONS, Credentials, CredentialsError

DEFAULT_ADMIN_ENDPOINT = "localhost:8981"
_COLUMNS = ("NAME", "ABSTRACTION", "BACKEND", "TENANT", "SERVING")


class _Owner(msgspec.Struct):
    id: int
    pid: int
    serving: bool


class _Namespace(msgspec.Struct):
    name: str
    tenant: str
    abstraction: str
    backend: str
    owners: list[_Owner]
    cache: dict[str, Any] = {}


class _Page(msgspec.Struct):
    generation: int
    namespaces: list[_Namespace]


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ns = commands.add_parser("ns", help="what a running server serves (from its admin port)")
    ops = ns.add_subparsers(dest="ns_command", required=True, metavar="OP")
    listing = ops.add_parser("list", help="the namespaces, their backends, tenants and serving workers")
    listing.add_argument(
        "--endpoint",
        default=os.environ.get("PRISM_ADMIN_ENDPOINT") or DEFAULT_ADMIN_ENDPOINT,
        help=f"the admin port, HOST:PORT (default: $PRISM_ADMIN_ENDPOINT or {DEFAULT_ADMIN_ENDPOINT})",
    )
    listing.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of the request (default: {DEFAULT_TIMEOUT_S:g})",
    )
    listing.add_argument("--json", action="store_true", help="print the admin API's JSON document")
    credentials.add_options(listing, ADMIN_OPTIONS)
    listing.set_defaults(handler=_cmd_list)


def fetch_page(endpoint: str, creds: Credentials, timeout_s: float) -> tuple[_Page, bytes]:
    """``/v1/namespaces`` of the admin port at ``endpoint``: decoded, and as received."""
    status, body = admin_http.request(endpoint, creds, "/v1/namespaces", timeout_s)
    if status != 200:
        raise AdminError(admin_http.http_error(status, body, creds))
    try:
        return msgspec.json.decode(body, type=_Page), body
    except msgspec.DecodeError as exc:
        raise AdminError(f"prism: {endpoint} did not answer with Prism's namespaces JSON ({exc})") from None


def render_namespaces(page: _Page, raw: bytes, as_json: bool) -> Iterator[str]:
    """One JSON document, or an aligned table: a header line, then one line per namespace."""
    if as_json:
        yield to_json(msgspec.json.decode(raw))
        return
    rows = [_COLUMNS]
    for ns in page.namespaces:
        serving = sum(1 for owner in ns.owners if owner.serving)
        rows.append(
            (
                display_text(ns.name),
                ns.abstraction,
                ns.backend,
                display_text(ns.tenant),
                f"{serving}/{len(ns.owners)}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        creds = credentials.load(args, os.environ, args.endpoint, ADMIN_OPTIONS)
    except CredentialsError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    try:
        page, raw = fetch_page(args.endpoint, creds, args.timeout)
    except AdminError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILURE
    for line in render_namespaces(page, raw, args.json):
        print(line, flush=True)
    return 0
