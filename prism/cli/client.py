"""What every ``prism`` client command shares: the gRPC channel (TLS and a
token when asked: ``prism.cli.credentials``), the common options, paging,
and one-line output and errors."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec

from prism.cli import credentials
from prism.cli.credentials import Credentials, CredentialsError

if TYPE_CHECKING:
    import grpc

DEFAULT_ENDPOINT = "localhost:8980"
DEFAULT_TIMEOUT_S = 5.0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_Page = TypeVar("_Page", bound="_Paged")


class _Paged(Protocol):
    @property
    def next_page_token(self) -> str: ...


class PageTokenLoop(Exception):
    """The server handed back the token we sent: following it would never end."""


class CallFailed(Exception):
    """A call failed without grpcio saying so (the command's own deadline, say):
    reported like a gRPC status, ``prism: CODE: details``."""

    def __init__(self, code_name: str, details: str) -> None:
        super().__init__(f"{code_name}: {details}")
        self.code_name = code_name
        self.details = details


class Redial(Exception):
    """Raised by a command before it printed anything: open a new connection
    and run the command again, once (``pubsub subscribe`` naming the tenant
    the server pointed to). The exception's cause is what is reported if the
    second try asks again."""


def call_options() -> argparse.ArgumentParser:
    """A parent parser with the options every client command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        default=os.environ.get("PRISM_ENDPOINT") or DEFAULT_ENDPOINT,
        help=f"server HOST:PORT (default: $PRISM_ENDPOINT or {DEFAULT_ENDPOINT})",
    )
    common.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT_S:g})",
    )
    common.add_argument("--json", action="store_true", help="print JSON")
    credentials.add_options(common)
    return common


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0")
    return value


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (``--tag``, ``--header``): a non-empty key; the value may be empty or hold ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def pairs_to_dict(flag: str, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``--tag``/``--header`` pairs as a map; a key given twice is ValueError (a usage error)."""
    out: dict[str, str] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"prism: {flag} {key!r} given twice")
        out[key] = value
    return out


def arg_bytes(text: str) -> bytes:
    # surrogateescape gives back the exact bytes of an argv entry that was not
    # valid UTF-8, instead of failing on it.
    return text.encode("utf-8", "surrogateescape")


def follow_pages(fetch: Callable[[str], _Page]) -> Iterator[_Page]:
    """Yield ``fetch(token)`` pages until the server returns an empty token."""
    token = ""
    while True:
        page = fetch(token)
        yield page
        if not page.next_page_token:
            return
        if page.next_page_token == token:
            raise PageTokenLoop(f"server returned the same page token {token!r} again")
        token = page.next_page_token


# ---------------------------------------------------------------- output


def display_bytes(data: bytes) -> str:
    """Printable UTF-8 as is; anything else as a Python bytes literal (``b'\\xff'``).

    The literal form keeps one item on one line and shows exactly which bytes
    are stored, where a lossy decode would hide them.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return repr(data)
    return text if text.isprintable() else repr(data)


def display_text(text: str) -> str:
    return text if text.isprintable() else repr(text)


def with_pairs(line: str, pairs: Mapping[str, str]) -> str:
    """``line [k=v ...]`` (sorted, shown as display_text), or ``line`` with no pairs."""
    if not pairs:
        return line
    shown = " ".join(f"{display_text(k)}={display_text(v)}" for k, v in sorted(pairs.items()))
    return f"{line} [{shown}]"


def to_json(obj: Any) -> str:
    return msgspec.json.encode(obj).decode("utf-8")


def ok_lines(as_json: bool) -> Iterator[str]:
    yield to_json({"ok": True}) if as_json else "ok"


def error_line(
    code_name: str,
    details: str,
    endpoint: str,
    connected: bool,
    timeout_s: float,
    *,
    tls: bool = False,
    identified: bool = True,
) -> str:
    """The one stderr line for a failed call.

    grpcio reports "nothing listens there", "the TLS handshake failed" and
    "the server said UNAVAILABLE" with the same status code, so whether the
    channel ever connected decides which the user is told. ``tls``: the
    channel spoke TLS; ``identified``: the calls carried a token or a client
    certificate (a server's UNAUTHENTICATED then means a bad one, else none).
    """
    reason = " ".join(details.split())
    if not connected and code_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        if code_name == "DEADLINE_EXCEEDED":
            reason = f"no connection within {timeout_s:g}s"
        return f"prism: {_connect_failure(reason, endpoint, tls)}"
    if code_name == "UNAUTHENTICATED" and not identified:
        reason = f"{reason} (no --token-file or --cert was given)".lstrip()
    return f"prism: {code_name}: {reason}" if reason else f"prism: {code_name}"


def _connect_failure(reason: str, endpoint: str, tls: bool) -> str:
    """Why no connection was made, in words a user can act on (grpcio's are
    about its transports: "Tls handshake failed (TSI_PROTOCOL_FAILURE): ...")."""
    lowered = reason.lower()
    if "handshake failed" in lowered:
        cause = reason.rpartition("OPENSSL_internal:")[2].removesuffix(": OK") or reason
        if "CERTIFICATE_VERIFY_FAILED" in cause:
            detail = cause.partition(": ")[2] or "certificate verify failed"
            cause = f"the server's certificate does not verify ({detail}); is --tls-ca the CA that signed it?"
        elif "WRONG_VERSION_NUMBER" in cause:
            cause = "the server does not speak TLS there (a plaintext port?)"
        return f"TLS handshake with {endpoint} failed: {cause}"
    if lowered.endswith("socket closed"):
        if tls:
            return (
                f"{endpoint} closed the connection during the TLS handshake "
                "(it may want a client certificate: --cert and --key, or not this one)"
            )
        return f"{endpoint} closed the connection (a TLS port? give --tls-ca)"
    return f"cannot reach {endpoint}: {reason}"


# ---------------------------------------------------------------- plumbing


class Connection:
    """A grpcio channel that remembers whether it ever connected."""

    def __init__(self, endpoint: str, creds: Credentials | None = None) -> None:
        # grpcio's core logs handshake failures on stderr by itself; the
        # command says what failed in its own one line. GRPC_VERBOSITY set by
        # the user (to debug) wins.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        import grpc

        self._grpc = grpc
        self._ready = threading.Event()
        # A subchannel of its own: a second Connection (``Redial``) is a new
        # TCP connection, whose first call may name another tenant.
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self.channel = credentials.channel(endpoint, creds or Credentials(), options)
        _QuietClosedPoller.install()
        self.channel.subscribe(self._on_state, try_to_connect=False)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if state == self._grpc.ChannelConnectivity.READY:
            self._ready.set()

    def ever_connected(self) -> bool:
        # Connectivity callbacks arrive on grpcio's own thread; a short wait
        # lets a READY that raced with the failed call land. Only the error
        # path pays it.
        return self._ready.wait(0.1)

    def close(self) -> None:
        self.channel.unsubscribe(self._on_state)
        self.channel.close()


class _QuietClosedPoller:
    """A ``threading.excepthook`` that drops the one error grpcio's
    connectivity poller raises when we close its channel.

    ``subscribe`` starts a thread (``_poll_connectivity``) that looks for
    subscribers only after each 0.2 s watch; a channel closed between that
    look and the next watch makes the watch raise ``ValueError: Cannot
    monitor channel state: Channel closed!``, and the thread dies printing a
    traceback under the command's one error line (seen once in CI, on a
    loaded machine). We close the channel on purpose; every other error of
    every thread goes to the hook that was there before.
    """

    def __init__(self, previous: Callable[[threading.ExceptHookArgs], object]) -> None:
        self.previous = previous

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is ValueError and "closed" in str(args.exc_value):
            tb = args.exc_traceback
            while tb is not None:
                if tb.tb_frame.f_code.co_name == "_poll_connectivity":
                    return
                tb = tb.tb_next
        self.previous(args)

    @classmethod
    def install(cls) -> None:
        if not isinstance(threading.excepthook, cls):
            threading.excepthook = cls(threading.excepthook)


def run_calls(args: argparse.Namespace, lines: Callable[[grpc.Channel], Iterable[str]]) -> int:
    """Open a channel, print the lines the command produces, map failures to one line."""
    try:
        creds = credentials.load(args, os.environ, args.endpoint)
    except CredentialsError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    for attempt in (1, 2):
        conn = Connection(args.endpoint, creds)  # first: it quiets grpcio's logging before grpcio loads
        import grpc

        failure: BaseException | None
        connected: bool
        try:
            for line in lines(conn.channel):
                print(line, flush=True)
            return 0
        except Redial as exc:
            if attempt == 1:
                continue
            failure, connected = exc.__cause__, conn.ever_connected()
        except (grpc.RpcError, CallFailed) as exc:
            failure, connected = exc, conn.ever_connected()  # before close(): a late READY may land
        except PageTokenLoop as exc:
            print(f"prism: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            conn.close()
        code, details = status_of(failure)
        print(_failure_line(args, creds, code, details, connected), file=sys.stderr)
        return EXIT_FAILURE
    raise AssertionError("unreachable")  # pragma: no cover


def _failure_line(
    args: argparse.Namespace, creds: Credentials, code: str, details: str, connected: bool
) -> str:
    return error_line(
        code, details, args.endpoint, connected, args.timeout, tls=creds.tls, identified=creds.identified
    )


def status_of(exc: BaseException | None) -> tuple[str, str]:
    """A failed call's status code name and details."""
    import grpc

    if isinstance(exc, CallFailed):
        return exc.code_name, exc.details
    # The errors grpcio raises from calls are also ``grpc.Call``s; the base
    # class promises neither ``code()`` nor ``details()``.
    if isinstance(exc, grpc.Call):
        return exc.code().name, exc.details() or ""
    return "UNKNOWN", str(exc)
