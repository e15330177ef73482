"""``prism pubsub publish|subscribe``: the PubSub API of a running server.

``subscribe`` prints each message as it arrives and, in a group, acknowledges
it once printed (a message that could not be printed, because the reader of
a pipe went away, say, is left to the group). It runs until ``--count``
messages, Ctrl-C (exit code 130) or the end of the stream.

``Subscribe`` must reach a worker of the namespace's tenant (docs/api.md,
Tenants and connections). Without ``--tenant``, when the server answers that
the namespace is another tenant's, the command subscribes again once on a new
connection naming that tenant.
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from prism.cli.client import (
    EXIT_USAGE,
    CallFailed,
    Redial,
    arg_bytes,
    call_options,
    display_bytes,
    key_value,
    pairs_to_dict,
    positive_int,
    run_calls,
    status_of,
    to_json,
    with_pairs,
)
from prism.proto import pubsub_pb2

if TYPE_CHECKING:
    import grpc

_Req = TypeVar("_Req", contravariant=True)
_Resp = TypeVar("_Resp", covariant=True)

Kind = pubsub_pb2.StartPosition.Kind
Metadata = Sequence[tuple[str, str]]

# The server's FAILED_PRECONDITION for a Subscribe that reached another tenant's worker.
_OTHER_TENANT = re.compile(r"is held by tenant '([^']+)'")


class _Unary(Protocol[_Req, _Resp]):
    def __call__(
        self, request: _Req, *, timeout: float | None = ..., metadata: Metadata | None = ...
    ) -> _Resp: ...


class MessageStream(Protocol):
    """What grpcio's server-streaming call object is, as far as the CLI uses it."""

    def initial_metadata(self) -> Any: ...
    def cancel(self) -> bool: ...
    def __iter__(self) -> Iterator[pubsub_pb2.Message]: ...


class _Streaming(Protocol):
    def __call__(
        self, request: pubsub_pb2.SubscribeRequest, *, metadata: Metadata | None = ...
    ) -> MessageStream: ...


class PubSubStubLike(Protocol):
    """The part of ``pubsub_pb2_grpc.PubSubStub`` the CLI calls."""

    @property
    def Publish(self) -> _Unary[pubsub_pb2.PublishRequest, pubsub_pb2.PublishResponse]: ...
    @property
    def Subscribe(self) -> _Streaming: ...
    @property
    def Ack(self) -> _Unary[pubsub_pb2.AckRequest, pubsub_pb2.AckResponse]: ...


def start_position(text: str) -> pubsub_pb2.StartPosition:
    """``--from``: ``earliest``, ``latest`` or a sequence number (>= 1)."""
    lowered = text.strip().lower()
    if lowered == "earliest":
        return pubsub_pb2.StartPosition(kind=Kind.EARLIEST)
    if lowered == "latest":
        return pubsub_pb2.StartPosition(kind=Kind.LATEST)
    if lowered.isdigit() and int(lowered) >= 1:
        return pubsub_pb2.StartPosition(kind=Kind.SEQUENCE, sequence=int(lowered))
    raise argparse.ArgumentTypeError(f"expected earliest, latest or a sequence >= 1, got {text!r}")


def tenant_named(code_name: str, details: str) -> str | None:
    """The tenant a FAILED_PRECONDITION of Subscribe says holds the namespace, if it says so."""
    if code_name != "FAILED_PRECONDITION":
        return None
    found = _OTHER_TENANT.search(details)
    return found.group(1) if found else None


# ---------------------------------------------------------------- calls


def publish(stub: PubSubStubLike, request: pubsub_pb2.PublishRequest, timeout_s: float) -> int:
    """Publish one message; its sequence."""
    return stub.Publish(request, timeout=timeout_s).sequence


class _Timer(Protocol):
    def start(self) -> None: ...
    def cancel(self) -> None: ...


def _daemon_timer(interval_s: float, function: Callable[[], None]) -> _Timer:
    timer = threading.Timer(interval_s, function)
    timer.daemon = True
    return timer


def open_subscription(
    stub: PubSubStubLike,
    request: pubsub_pb2.SubscribeRequest,
    tenant: str,
    timeout_s: float,
    timer: Callable[[float, Callable[[], None]], _Timer] = _daemon_timer,
) -> MessageStream:
    """Subscribe and wait (at most ``timeout_s``) until the server says the subscription is in place.

    The stream itself has no deadline: it runs until the caller cancels it.
    A server that neither answers nor fails within ``timeout_s`` (an address
    that drops packets, say) is DEADLINE_EXCEEDED, so the command never hangs
    before its first message is possible.
    """
    metadata = [("prism-tenant", tenant)] if tenant else None
    stream = stub.Subscribe(request, metadata=metadata)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        stream.cancel()

    deadline = timer(timeout_s, expire)
    deadline.start()
    try:
        stream.initial_metadata()  # returns once headers came, or the call ended
    finally:
        deadline.cancel()
    if expired.is_set():
        raise CallFailed("DEADLINE_EXCEEDED", f"the subscription was not in place within {timeout_s:g}s")
    return stream


def deliver(
    stub: PubSubStubLike,
    stream: MessageStream,
    request: pubsub_pb2.SubscribeRequest,
    count: int,
    timeout_s: float,
    render: Callable[[pubsub_pb2.Message], str],
) -> Iterator[str]:
    """A line per message, up to ``count`` (0: no end); in a group, each acked once its line was taken."""
    delivered = 0
    try:
        for message in stream:
            yield render(message)
            if request.group:
                ack = pubsub_pb2.AckRequest(
                    namespace=request.namespace,
                    topic=request.topic,
                    group=request.group,
                    sequences=[message.sequence],
                )
                stub.Ack(ack, timeout=timeout_s)
            delivered += 1
            if delivered == count:
                return
    finally:
        stream.cancel()


# ---------------------------------------------------------------- output


def message_json(message: pubsub_pb2.Message) -> dict[str, Any]:
    """A message for JSON output: the payload as text where UTF-8, else base64 under ``payload_b64``."""
    out: dict[str, Any] = {"topic": message.topic, "sequence": message.sequence}
    try:
        out["payload"] = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        out["payload_b64"] = base64.b64encode(message.payload).decode("ascii")
    out["headers"] = dict(sorted(message.headers.items()))
    out["message_id"] = message.message_id
    return out


def render_message(message: pubsub_pb2.Message, as_json: bool) -> str:
    """``SEQUENCE: PAYLOAD [k=v ...]``, or one JSON object."""
    if as_json:
        return to_json(message_json(message))
    return with_pairs(f"{message.sequence}: {display_bytes(message.payload)}", message.headers)


# ---------------------------------------------------------------- commands


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pubsub = commands.add_parser("pubsub", help="call the PubSub API of a running server")
    ops = pubsub.add_subparsers(dest="pubsub_command", required=True, metavar="OP")
    common = call_options()

    pub = ops.add_parser("publish", parents=[common], help="publish one message")
    pub.add_argument("namespace", metavar="NAMESPACE")
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("payload", metavar="MESSAGE")
    pub.add_argument(
        "--header", type=key_value, action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    pub.add_argument("--id", dest="message_id", default="", metavar="MESSAGE_ID", help="deduplication id")
    pub.set_defaults(handler=_cmd_publish)

    sub = ops.add_parser(
        "subscribe", parents=[common], help="print messages as they arrive (and ack them, in a group)"
    )
    sub.add_argument("namespace", metavar="NAMESPACE")
    sub.add_argument("topic", metavar="TOPIC")
    sub.add_argument("--group", default="", metavar="GROUP", help="durable consumer group (default: none)")
    sub.add_argument(
        "--from",
        dest="start",
        type=start_position,
        default=pubsub_pb2.StartPosition(kind=Kind.LATEST),
        metavar="earliest|latest|SEQ",
        help="where a new subscription or group starts (default: latest)",
    )
    sub.add_argument("--count", type=positive_int, default=0, metavar="N", help="stop after N messages")
    sub.add_argument(
        "--tenant",
        default="",
        metavar="TENANT",
        help="the namespace's tenant (default: the one the server names)",
    )
    sub.set_defaults(handler=_cmd_subscribe)


def _stub(channel: grpc.Channel) -> PubSubStubLike:
    from prism.proto import pubsub_pb2_grpc

    make_stub: Callable[[grpc.Channel], PubSubStubLike] = pubsub_pb2_grpc.PubSubStub
    return make_stub(channel)


def _cmd_publish(args: argparse.Namespace) -> int:
    try:
        headers = pairs_to_dict("--header", args.header)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    request = pubsub_pb2.PublishRequest(
        namespace=args.namespace,
        topic=args.topic,
        payload=arg_bytes(args.payload),
        headers=headers,
        message_id=args.message_id,
    )

    def lines(channel: grpc.Channel) -> Iterable[str]:
        sequence = publish(_stub(channel), request, args.timeout)
        return [to_json({"ok": True, "sequence": sequence}) if args.json else f"ok sequence={sequence}"]

    return run_calls(args, lines)


def _cmd_subscribe(args: argparse.Namespace) -> int:
    return run_calls(args, subscription_lines(args))


def subscription_lines(args: argparse.Namespace) -> Callable[[grpc.Channel], Iterator[str]]:
    """What ``subscribe`` prints, given a channel (a second one after a ``Redial``)."""
    request = pubsub_pb2.SubscribeRequest(
        namespace=args.namespace, topic=args.topic, group=args.group, start=args.start
    )
    tenant = [args.tenant]  # the server may name it: then the second connection sends it

    def lines(channel: grpc.Channel) -> Iterator[str]:
        import grpc

        stub = _stub(channel)
        stream = open_subscription(stub, request, tenant[0], args.timeout)
        messages = deliver(
            stub, stream, request, args.count, args.timeout, lambda m: render_message(m, args.json)
        )
        try:
            first = next(messages)
        except StopIteration:
            return
        except grpc.RpcError as exc:
            named = tenant_named(*status_of(exc))
            if named and not tenant[0]:
                tenant[0] = named
                raise Redial from exc
            raise
        yield first
        yield from messages

    return lines
