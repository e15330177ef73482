"""The ``prism`` command: run the server, or call a running one's KeyValue API.

The client half uses stock grpcio and the generated stubs on purpose: it is
the same path a team's own client takes, so ``prism kv`` doubles as a check
that the server works with unmodified grpcio clients. grpcio is imported only
when a ``kv`` command runs, so that ``prism serve`` does not pay for it.

Failures are one line on stderr, never a traceback: ``prism: config error:
...`` (exit 2) for a bad configuration, ``prism: cannot reach HOST:PORT: ...``
when no server answered, ``prism: STATUS: details`` when one answered with an
error (exit 1).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec

from prism.config import ServerConfig, load_config
from prism.errors import ConfigError
from prism.proto import kv_pb2

if TYPE_CHECKING:
    import grpc

__all__ = [
    "DEFAULT_ENDPOINT",
    "KeyValueStubLike",
    "PageTokenLoop",
    "delete_items",
    "display_bytes",
    "error_line",
    "get_items",
    "item_json",
    "main",
    "put_item",
    "render_items",
    "render_records",
    "run",
    "scan_records",
]

DEFAULT_ENDPOINT = "localhost:8980"
DEFAULT_TIMEOUT_S = 5.0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_Req = TypeVar("_Req", contravariant=True)
_Resp = TypeVar("_Resp", covariant=True)
_Page = TypeVar("_Page", bound="_Paged")


class _Unary(Protocol[_Req, _Resp]):
    def __call__(self, request: _Req, *, timeout: float | None = ...) -> _Resp: ...


class KeyValueStubLike(Protocol):
    """The part of ``kv_pb2_grpc.KeyValueStub`` the CLI calls (fakes in tests fit it)."""

    @property
    def PutItems(self) -> _Unary[kv_pb2.PutItemsRequest, kv_pb2.PutItemsResponse]: ...
    @property
    def GetItems(self) -> _Unary[kv_pb2.GetItemsRequest, kv_pb2.GetItemsResponse]: ...
    @property
    def DeleteItems(
        self,
    ) -> _Unary[kv_pb2.DeleteItemsRequest, kv_pb2.DeleteItemsResponse]: ...
    @property
    def ScanItems(self) -> _Unary[kv_pb2.ScanItemsRequest, kv_pb2.ScanItemsResponse]: ...


class _Paged(Protocol):
    @property
    def next_page_token(self) -> str: ...


class PageTokenLoop(Exception):
    """The server handed back the token we sent: following it would never end."""


# ---------------------------------------------------------------- entry points


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (``| head``) went away: stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="Prism data gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--listen", metavar="HOST:PORT", help="gRPC address to listen on")
    serve.add_argument("--data-dir", metavar="DIR", help="where local backends keep data")
    serve.add_argument("--config", metavar="FILE", help="TOML config file")
    serve.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    serve.set_defaults(handler=_cmd_serve)

    reload = commands.add_parser("reload", help="make a running server re-read its config (SIGHUP)")
    reload.add_argument("--data-dir", metavar="DIR", help="the server's data dir (default: from config)")
    reload.add_argument("--config", metavar="FILE", help="TOML config file")
    reload.set_defaults(handler=_cmd_reload)

    kv = commands.add_parser("kv", help="call the KeyValue API of a running server")
    _add_kv_commands(kv.add_subparsers(dest="kv_command", required=True, metavar="OP"))
    return parser


def _add_kv_commands(ops: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        default=os.environ.get("PRISM_ENDPOINT") or DEFAULT_ENDPOINT,
        help=f"server HOST:PORT (default: $PRISM_ENDPOINT or {DEFAULT_ENDPOINT})",
    )
    common.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each call (default: {DEFAULT_TIMEOUT_S:g})",
    )
    common.add_argument("--json", action="store_true", help="print JSON")

    put = ops.add_parser("put", parents=[common], help="write one item")
    _add_record_args(put)
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE")
    put.add_argument("--ttl-ms", type=_non_negative_int, default=0, metavar="N")
    put.set_defaults(handler=_cmd_put)

    get = ops.add_parser("get", parents=[common], help="read items (all if no KEY)")
    _add_record_args(get)
    get.add_argument("keys", nargs="*", metavar="KEY")
    get.set_defaults(handler=_cmd_get)

    delete = ops.add_parser("delete", parents=[common], help="delete items (the record if no KEY)")
    _add_record_args(delete)
    delete.add_argument("keys", nargs="*", metavar="KEY")
    delete.set_defaults(handler=_cmd_delete)

    scan = ops.add_parser("scan", parents=[common], help="list every record of a namespace")
    scan.add_argument("namespace", metavar="NAMESPACE")
    scan.set_defaults(handler=_cmd_scan)


def _add_record_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("namespace", metavar="NAMESPACE")
    parser.add_argument("record_id", metavar="ID")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# ---------------------------------------------------------------- serve


def _cmd_serve(args: argparse.Namespace) -> int:
    overrides = {"listen": args.listen, "data_dir": args.data_dir, "log_level": args.log_level}
    try:
        config = load_config(args.config, os.environ, overrides)

        def reload_config() -> ServerConfig:
            # SIGHUP: the same sources, read again.
            return load_config(args.config, os.environ, overrides)

        # Imported only now: a bad config must be reported before the server
        # module (and everything it pulls in) is loaded.
        from prism.server import serve

        return serve(config, reload_config)
    except ConfigError as exc:
        print(f"prism: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _cmd_reload(args: argparse.Namespace) -> int:
    """Send SIGHUP to the supervisor named in the runtime dir's pid file."""
    from prism.server import pid_file

    try:
        config = load_config(args.config, os.environ, {"data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"prism: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    path = pid_file(config)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except FileNotFoundError:
        print(f"prism: no running server: {path} does not exist", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError:
        print(f"prism: {path} does not hold a process id", file=sys.stderr)
        return EXIT_FAILURE
    except ProcessLookupError:
        print(f"prism: no running server: process {path.read_text().strip()} is gone", file=sys.stderr)
        return EXIT_FAILURE
    print(f"reload requested (pid {pid}); the server logs whether the new config was applied")
    return 0


# ---------------------------------------------------------------- kv: calls


def _arg_bytes(text: str) -> bytes:
    # surrogateescape gives back the exact bytes of an argv entry that was not
    # valid UTF-8, instead of failing on it.
    return text.encode("utf-8", "surrogateescape")


def _predicate(keys: Sequence[bytes]) -> kv_pb2.Predicate:
    if keys:
        return kv_pb2.Predicate(match_keys=kv_pb2.MatchKeys(keys=keys))
    return kv_pb2.Predicate(match_all=kv_pb2.MatchAll())


def _follow_pages(fetch: Callable[[str], _Page]) -> Iterator[_Page]:
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


def put_item(
    stub: KeyValueStubLike, namespace: str, record_id: str, item: kv_pb2.Item, timeout_s: float
) -> None:
    """Upsert one item (the server stamps it: no idempotency token from a CLI)."""
    request = kv_pb2.PutItemsRequest(namespace=namespace, id=record_id, items=[item])
    stub.PutItems(request, timeout=timeout_s)


def get_items(
    stub: KeyValueStubLike,
    namespace: str,
    record_id: str,
    keys: Sequence[bytes],
    timeout_s: float,
) -> Iterator[kv_pb2.Item]:
    """Items of one record, all pages; only ``keys`` when given, else all."""
    predicate = _predicate(keys)

    def fetch(token: str) -> kv_pb2.GetItemsResponse:
        request = kv_pb2.GetItemsRequest(
            namespace=namespace, id=record_id, predicate=predicate, page_token=token
        )
        return stub.GetItems(request, timeout=timeout_s)

    for page in _follow_pages(fetch):
        yield from page.items


def delete_items(
    stub: KeyValueStubLike,
    namespace: str,
    record_id: str,
    keys: Sequence[bytes],
    timeout_s: float,
) -> None:
    """Delete ``keys`` from a record, or the whole record when no key is given."""
    request = kv_pb2.DeleteItemsRequest(namespace=namespace, id=record_id, predicate=_predicate(keys))
    stub.DeleteItems(request, timeout=timeout_s)


def scan_records(stub: KeyValueStubLike, namespace: str, timeout_s: float) -> Iterator[kv_pb2.Record]:
    """Every record of a namespace, all pages, as the server returns them."""

    def fetch(token: str) -> kv_pb2.ScanItemsResponse:
        request = kv_pb2.ScanItemsRequest(namespace=namespace, page_token=token)
        return stub.ScanItems(request, timeout=timeout_s)

    for page in _follow_pages(fetch):
        yield from page.records


# ---------------------------------------------------------------- kv: output


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


def _display_text(text: str) -> str:
    return text if text.isprintable() else repr(text)


def item_json(item: kv_pb2.Item) -> dict[str, Any]:
    """An item for JSON output: text where UTF-8, base64 under ``*_b64`` otherwise."""
    out: dict[str, Any] = {}
    for name, data in (("key", item.key), ("value", item.value)):
        try:
            out[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            out[f"{name}_b64"] = base64.b64encode(data).decode("ascii")
    out["expires_at_ms"] = item.expires_at_ms
    return out


def _json(obj: Any) -> str:
    return msgspec.json.encode(obj).decode("utf-8")


def render_items(record_id: str, items: Iterable[kv_pb2.Item], as_json: bool) -> Iterator[str]:
    """Lines for ``kv get``: ``key = value`` each, or one JSON document."""
    if as_json:
        yield _json({"id": record_id, "items": [item_json(i) for i in items]})
        return
    for item in items:
        yield f"{display_bytes(item.key)} = {display_bytes(item.value)}"


def render_records(records: Iterable[kv_pb2.Record], as_json: bool) -> Iterator[str]:
    """Lines for ``kv scan``: ``id: key = value`` each, or one JSON object per record.

    JSON output is one document per line (JSON Lines) so that a large scan
    streams instead of being held in memory until the last page.
    """
    for record in records:
        if as_json:
            yield _json({"id": record.id, "items": [item_json(i) for i in record.items]})
            continue
        record_id = _display_text(record.id)
        for item in record.items:
            yield f"{record_id}: {display_bytes(item.key)} = {display_bytes(item.value)}"


def _ok(as_json: bool) -> Iterator[str]:
    yield _json({"ok": True}) if as_json else "ok"


def error_line(code_name: str, details: str, endpoint: str, connected: bool, timeout_s: float) -> str:
    """The one stderr line for a failed call.

    grpcio reports "nothing listens there" and "the server said UNAVAILABLE"
    with the same status code, so whether the channel ever connected decides
    which of the two the user is told.
    """
    reason = " ".join(details.split())
    if not connected and code_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        if code_name == "DEADLINE_EXCEEDED":
            reason = f"no connection within {timeout_s:g}s"
        return f"prism: cannot reach {endpoint}: {reason}"
    return f"prism: {code_name}: {reason}" if reason else f"prism: {code_name}"


# ---------------------------------------------------------------- kv: plumbing


class _Connection:
    """A grpcio channel and KeyValue stub that remember whether they ever connected."""

    def __init__(self, endpoint: str) -> None:
        import grpc

        from prism.proto import kv_pb2_grpc

        self._grpc = grpc
        self._ready = threading.Event()
        self.channel = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", -1)])
        self.channel.subscribe(self._on_state, try_to_connect=False)
        make_stub: Callable[[grpc.Channel], KeyValueStubLike] = kv_pb2_grpc.KeyValueStub
        self.stub = make_stub(self.channel)

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


def _run_kv(args: argparse.Namespace, lines: Callable[[KeyValueStubLike], Iterable[str]]) -> int:
    """Open a channel, print the lines the command produces, map failures to one line."""
    import grpc

    conn = _Connection(args.endpoint)
    try:
        for line in lines(conn.stub):
            print(line, flush=True)
        return 0
    except grpc.RpcError as exc:
        code, details = _status_of(exc)
        print(
            error_line(code, details, args.endpoint, conn.ever_connected(), args.timeout),
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except PageTokenLoop as exc:
        print(f"prism: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        conn.close()


def _status_of(exc: grpc.RpcError) -> tuple[str, str]:
    import grpc

    # The errors grpcio raises from calls are also ``grpc.Call``s; the base
    # class promises neither ``code()`` nor ``details()``.
    if isinstance(exc, grpc.Call):
        return exc.code().name, exc.details() or ""
    return "UNKNOWN", str(exc)


def _cmd_put(args: argparse.Namespace) -> int:
    item = kv_pb2.Item(key=_arg_bytes(args.key), value=_arg_bytes(args.value), ttl_ms=args.ttl_ms)

    def lines(stub: KeyValueStubLike) -> Iterator[str]:
        put_item(stub, args.namespace, args.record_id, item, args.timeout)
        return _ok(args.json)

    return _run_kv(args, lines)


def _cmd_get(args: argparse.Namespace) -> int:
    keys = [_arg_bytes(k) for k in args.keys]

    def lines(stub: KeyValueStubLike) -> Iterator[str]:
        items = get_items(stub, args.namespace, args.record_id, keys, args.timeout)
        return render_items(args.record_id, items, args.json)

    return _run_kv(args, lines)


def _cmd_delete(args: argparse.Namespace) -> int:
    keys = [_arg_bytes(k) for k in args.keys]

    def lines(stub: KeyValueStubLike) -> Iterator[str]:
        delete_items(stub, args.namespace, args.record_id, keys, args.timeout)
        return _ok(args.json)

    return _run_kv(args, lines)


def _cmd_scan(args: argparse.Namespace) -> int:
    def lines(stub: KeyValueStubLike) -> Iterator[str]:
        return render_records(scan_records(stub, args.namespace, args.timeout), args.json)

    return _run_kv(args, lines)


if __name__ == "__main__":
    run()
