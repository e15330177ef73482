"""``prism ns list``: the namespaces a running server holds, from its admin port.

It reads ``GET /v1/namespaces`` (``prism.admin.app``) over HTTP, or HTTPS with
``--tls-ca``, sending ``--token-file``'s token as ``Authorization: Bearer``
when the admin port wants one (``admin_token_file``). The endpoint is the
admin port (``admin_listen``), not the gRPC one.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgspec

from prism.cli import credentials
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
MAX_BODY_BYTES = 64 * 1024 * 1024
_COLUMNS = ("NAME", "ABSTRACTION", "BACKEND", "TENANT", "SERVING")


class AdminError(Exception):
    """The admin port could not be read; ``str(exc)`` is the line to print (exit 1)."""


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
    scheme = "https" if creds.tls else "http"
    request = urllib.request.Request(f"{scheme}://{endpoint}/v1/namespaces")
    if creds.token is not None:
        request.add_header("Authorization", f"Bearer {creds.token}")
    context = None
    if creds.tls:
        assert creds.root_certificates is not None  # the only TLS option ADMIN_OPTIONS has
        context = ssl.create_default_context(cadata=creds.root_certificates.decode("ascii", "replace"))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as answer:
            body: bytes = answer.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise AdminError(_http_error(exc, creds)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise AdminError(_connect_failure(exc, endpoint, creds.tls, timeout_s)) from None
    if len(body) > MAX_BODY_BYTES:
        raise AdminError(
            f"prism: {endpoint} answered more than {MAX_BODY_BYTES} bytes: not Prism's admin port?"
        )
    try:
        return msgspec.json.decode(body, type=_Page), body
    except msgspec.DecodeError as exc:
        raise AdminError(f"prism: {endpoint} did not answer with Prism's namespaces JSON ({exc})") from None


def _http_error(exc: urllib.error.HTTPError, creds: Credentials) -> str:
    try:
        text = " ".join(exc.read(4096).decode("utf-8", "replace").split())
    except OSError:
        text = ""
    line = f"prism: admin port answered {exc.code}" + (f": {text}" if text else "")
    if exc.code == 401 and creds.token is None:
        line += " (no --token-file was given)"
    elif exc.code == 404:
        line += " (is --endpoint Prism's admin port, admin_listen?)"
    return line


def _connect_failure(exc: BaseException, endpoint: str, tls: bool, timeout_s: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        detail = reason.verify_message or "certificate verify failed"
        return (
            f"prism: TLS handshake with {endpoint} failed: the server's certificate does not verify "
            f"({detail}); is --tls-ca the CA that signed it?"
        )
    if isinstance(reason, ssl.SSLError):
        if reason.reason == "WRONG_VERSION_NUMBER":
            return f"prism: TLS handshake with {endpoint} failed: the server does not speak TLS there"
        return f"prism: TLS handshake with {endpoint} failed: {reason.reason or reason}"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"prism: cannot reach {endpoint}: no answer within {timeout_s:g}s"
    if isinstance(reason, (http.client.HTTPException, ConnectionResetError)):
        hint = "" if tls else "; an HTTPS admin port wants --tls-ca"
        return (
            f"prism: {endpoint} did not answer HTTP like Prism's admin port "
            f"(the gRPC port? the admin port is admin_listen{hint})"
        )
    text = getattr(reason, "strerror", None) or str(reason)
    return f"prism: cannot reach {endpoint}: {' '.join(str(text).split())}"


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
