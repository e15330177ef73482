"""HTTP to a server's admin port, for ``prism ns`` and ``prism apply``.

Plain HTTP, or HTTPS when the endpoint is an ``https://`` URL or
``--tls-ca`` is given (``[admin.tls]``); the admin token, when given, goes
as ``Authorization: Bearer``. The endpoint is the admin port
(``admin_listen``), not the gRPC one: ``HOST:PORT``, or a URL
``http://HOST:PORT`` or ``https://HOST:PORT``. A failure to get any HTTP
answer is an ``AdminError`` whose text is the one line to print.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.error
import urllib.request
from typing import Final

from prism.cli.credentials import Credentials

__all__ = ["AdminError", "host_port", "http_error", "request"]

MAX_BODY_BYTES: Final = 64 * 1024 * 1024


class AdminError(Exception):
    """The admin port could not be read; ``str(exc)`` is the line to print (exit 1)."""


def host_port(endpoint: str) -> tuple[str, bool]:
    """``(HOST:PORT, https)`` of ``endpoint`` (``HOST:PORT`` or an http/https URL)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return endpoint, False
    if scheme.lower() not in ("http", "https"):
        raise ValueError(f"{endpoint!r}: expected HOST:PORT or an http:// or https:// URL")
    return rest.rstrip("/"), scheme.lower() == "https"


def request(
    endpoint: str,
    creds: Credentials,
    path: str,
    timeout_s: float,
    *,
    body: bytes | None = None,
    content_type: str = "",
) -> tuple[int, bytes]:
    """``GET`` (or ``POST`` with ``body``) ``path`` on the admin port: the status and
    the body, whatever the status; AdminError when no HTTP answer came."""
    address, https = host_port(endpoint)
    tls = https or creds.tls
    req = urllib.request.Request(f"{'https' if tls else 'http'}://{address}{path}", data=body)
    if content_type:
        req.add_header("Content-Type", content_type)
    if creds.token is not None:
        req.add_header("Authorization", f"Bearer {creds.token}")
    context = None
    if tls:
        cadata = creds.root_certificates.decode("ascii", "replace") if creds.root_certificates else None
        context = ssl.create_default_context(cadata=cadata)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as answer:
            status, data = answer.status, answer.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            status, data = exc.code, _read_error(exc)
    except (OSError, http.client.HTTPException) as exc:
        raise AdminError(_connect_failure(exc, address, tls, timeout_s)) from None
    if len(data) > MAX_BODY_BYTES:
        raise AdminError(
            f"prism: {address} answered more than {MAX_BODY_BYTES} bytes: not Prism's admin port?"
        )
    return status, data


def _read_error(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read(64 * 1024)
    except OSError:
        return b""


def http_error(status: int, body: bytes, creds: Credentials) -> str:
    """The line for an answer that is not a success: its status and its text."""
    text = " ".join(body[:4096].decode("utf-8", "replace").split())
    line = f"prism: admin port answered {status}" + (f": {text}" if text else "")
    if status == 401 and creds.token is None:
        line += " (no --token-file was given)"
    elif status == 404:
        line += " (is the endpoint Prism's admin port, admin_listen?)"
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
