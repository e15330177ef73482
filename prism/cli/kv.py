"""``prism kv put|get|delete|scan``: the KeyValue API of a running server."""

from __future__ import annotations

import argparse
import base64
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from prism.cli.client import (
    arg_bytes,
    call_options,
    display_bytes,
    display_text,
    follow_pages,
    non_negative_int,
    ok_lines,
    run_calls,
    to_json,
)
from prism.proto import kv_pb2

if TYPE_CHECKING:
    import grpc

_Req = TypeVar("_Req", contravariant=True)
_Resp = TypeVar("_Resp", covariant=True)


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


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kv = commands.add_parser("kv", help="call the KeyValue API of a running server")
    ops = kv.add_subparsers(dest="kv_command", required=True, metavar="OP")
    common = call_options()

    put = ops.add_parser("put", parents=[common], help="write one item")
    _add_record_args(put)
    put.add_argument("key", metavar="KEY")
    put.add_argument("value", metavar="VALUE")
    put.add_argument("--ttl-ms", type=non_negative_int, default=0, metavar="N")
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


# ---------------------------------------------------------------- calls


def _predicate(keys: Sequence[bytes]) -> kv_pb2.Predicate:
    if keys:
        return kv_pb2.Predicate(match_keys=kv_pb2.MatchKeys(keys=keys))
    return kv_pb2.Predicate(match_all=kv_pb2.MatchAll())


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

    for page in follow_pages(fetch):
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

    for page in follow_pages(fetch):
        yield from page.records


# ---------------------------------------------------------------- output


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


def render_items(record_id: str, items: Iterable[kv_pb2.Item], as_json: bool) -> Iterator[str]:
    """Lines for ``kv get``: ``key = value`` each, or one JSON document."""
    if as_json:
        yield to_json({"id": record_id, "items": [item_json(i) for i in items]})
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
            yield to_json({"id": record.id, "items": [item_json(i) for i in record.items]})
            continue
        record_id = display_text(record.id)
        for item in record.items:
            yield f"{record_id}: {display_bytes(item.key)} = {display_bytes(item.value)}"


# ---------------------------------------------------------------- commands


def _stub(channel: grpc.Channel) -> KeyValueStubLike:
    from prism.proto import kv_pb2_grpc

    make_stub: Callable[[grpc.Channel], KeyValueStubLike] = kv_pb2_grpc.KeyValueStub
    return make_stub(channel)


def _run(args: argparse.Namespace, lines: Callable[[KeyValueStubLike], Iterable[str]]) -> int:
    return run_calls(args, lambda channel: lines(_stub(channel)))


def _cmd_put(args: argparse.Namespace) -> int:
    item = kv_pb2.Item(key=arg_bytes(args.key), value=arg_bytes(args.value), ttl_ms=args.ttl_ms)

    def lines(stub: KeyValueStubLike) -> Iterator[str]:
        put_item(stub, args.namespace, args.record_id, item, args.timeout)
        return ok_lines(args.json)

    return _run(args, lines)


def _cmd_get(args: argparse.Namespace) -> int:
    keys = [arg_bytes(k) for k in args.keys]

    def lines(stub: KeyValueStubLike) -> Iterator[str]:
        items = get_items(stub, args.namespace, args.record_id, keys, args.timeout)
        return render_items(args.record_id, items, args.json)

    return _run(args, lines)


def _cmd_delete(args: argparse.Namespace) -> int:
    keys = [arg_bytes(k) for k in args.keys]

    def lines(stub: KeyValueStubLike) -> Iterator[str]:
        delete_items(stub, args.namespace, args.record_id, keys, args.timeout)
        return ok_lines(args.json)

    return _run(args, lines)


def _cmd_scan(args: argparse.Namespace) -> int:
    def lines(stub: KeyValueStubLike) -> Iterator[str]:
        return render_records(scan_records(stub, args.namespace, args.timeout), args.json)

    return _run(args, lines)
