"""The method table: which handler serves which ``/package.Service/Method``.

A service is registered from its protobuf ``ServiceDescriptor`` plus an object
with one ``async def`` per RPC, named as in the .proto (and, optionally, a
``<Method>Now`` for answers that need no waiting: ``Method.now``). Request decoding and
streaming kinds come from the descriptor, so a handler cannot disagree with
the contract clients are generated from.

The object's ``decoders`` (RPC name -> function), if it has them, decode
those RPCs' requests in place of protobuf's parser: a function that takes a
large message as the ``Pieces`` it arrived in (``prism.rpc.pieces``), and
any other message as bytes, and answers what the handler reads.

The object's ``actions`` (RPC name -> ``"read"`` or ``"write"``) give each
method the action the access rules govern it by (``Method.action``); a
method without one (Health, reflection) is open to every caller. A governed
method's request has a ``namespace`` field, which the check reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final, cast

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from prism.rpc.call import CallContext
from prism.rpc.pieces import Pieces

log = logging.getLogger("prism.rpc")

UNARY: Final = 0  # one request, one response
# A streaming handler may yield this (instead of a message) to have the
# response headers sent at once: a client then knows the call is under way
# (PubSub's Subscribe yields it once its subscription is in place).
SEND_HEADERS: Final = object()

SERVER_STREAM: Final = 1  # one request, a stream of responses
CLIENT_STREAM: Final = 2  # requests streamed; handler yields responses (bidi too)

# A unary handler answers a message, or its serialization when it has that
# already (a cache hit, a forwarded call's answer).
UnaryHandler = Callable[[Any, CallContext], Awaitable[Message | bytes]]
StreamHandler = Callable[[Any, CallContext], AsyncIterator[Message]]
NowHandler = Callable[[Any, CallContext], bytes | None]

# ``Method.answer_now`` logs what a ``now`` raised at most this often per
# method: a broken ``now`` raises on every call it sees.
NOW_FAILURE_LOG_INTERVAL_S: Final = 10.0
# What access rules allow (prism.config.security.ACTIONS).
READ: Final = "read"
WRITE: Final = "write"


class Method:
    """One RPC of a registered service."""

    __slots__ = (
        "_clock",
        "_log_after",
        "_not_logged",
        "action",
        "decode",
        "handler",
        "kind",
        "name",
        "now",
        "operation",
    )

    def __init__(
        self,
        kind: int,
        decode: Callable[[bytes | bytearray | Pieces], Any],
        handler: Callable[..., Any],
        name: str,
        now: NowHandler | None = None,
        *,
        action: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind = kind
        self.decode = decode
        self.handler = handler  # a UnaryHandler, or a StreamHandler for the streaming kinds
        self.name = name  # "Service/Method", for logs
        self.operation = name.rpartition("/")[2]  # "Method", for metrics
        # ``<Method>Now(request, call)`` of a unary RPC, if the implementation
        # has one: the serialized answer when it needs no waiting (a
        # shared-cache hit), else None. The server tries it first and answers
        # at once, with no task of its own; None (or an error) sends the call
        # to the handler.
        self.now = now
        # READ or WRITE: what the access rules must allow a caller on the
        # request's namespace; None: open to every caller.
        self.action = action
        self._clock = clock  # for the rate limit on logging now's failures
        self._log_after = -float("inf")
        self._not_logged = 0

    async def invoke(self, request: Any, call: CallContext) -> bytes:
        """Run the unary handler; its answer serialized (as it is, if the handler
        answered bytes). Every path that runs a unary call goes through here."""
        response = await self.handler(request, call)
        if type(response) is bytes:
            return response
        payload: bytes = response.SerializeToString()
        return payload

    def answer_now(self, request: Any, call: CallContext) -> bytes | None:
        """``now``'s answer; None without one, or if it raised (the handler
        then answers the call, its errors included). What it raised is
        logged, at most once per ``NOW_FAILURE_LOG_INTERVAL_S``."""
        if self.now is None:
            return None
        try:
            return self.now(request, call)
        except Exception as exc:
            self._log_now_failure(exc)
            return None

    def _log_now_failure(self, exc: Exception) -> None:
        now = self._clock()
        if now < self._log_after:
            self._not_logged += 1
            return
        since = f" ({self._not_logged} more since the last report)" if self._not_logged else ""
        log.warning("%sNow failed; the handler answers instead%s", self.name, since, exc_info=exc)
        self._log_after = now + NOW_FAILURE_LOG_INTERVAL_S
        self._not_logged = 0


class MethodTable:
    """Paths (as bytes, as they arrive in ``:path``) to methods."""

    def __init__(self) -> None:
        self.methods: dict[bytes, Method] = {}
        self.service_names: list[str] = []
        # The paths whose requests stream (``GrpcProtocol`` buffers them unsplit).
        self.streaming_paths: set[bytes] = set()
        # The paths whose decoders take a large message as its ``Pieces``.
        self.piecewise_paths: set[bytes] = set()

    def add_service(self, descriptor: ServiceDescriptor, implementation: object) -> None:
        """Register every RPC of ``descriptor`` from same-named methods of
        ``implementation``, with the actions of its ``actions``; a missing
        method, or an action that cannot be checked, is a programming error."""
        actions: Mapping[str, str] = getattr(implementation, "actions", {})
        decoders: Mapping[str, Callable[[bytes | bytearray | Pieces], Any]] = getattr(
            implementation, "decoders", {}
        )
        for what, names in (("actions", actions), ("decoders", decoders)):
            unknown = set(names) - {m.name for m in descriptor.methods}
            if unknown:
                raise ValueError(f"{descriptor.full_name}: {what} for no such RPC: {sorted(unknown)}")
        for m in descriptor.methods:
            handler = getattr(implementation, m.name)
            path = f"/{descriptor.full_name}/{m.name}".encode()
            if m.client_streaming:
                kind = CLIENT_STREAM
                self.streaming_paths.add(path)
            elif m.server_streaming:
                kind = SERVER_STREAM
            else:
                kind = UNARY
            request_class = GetMessageClass(m.input_type)
            now = getattr(implementation, f"{m.name}Now", None) if kind == UNARY else None
            action = actions.get(m.name)
            if action is not None:
                if action not in (READ, WRITE):
                    raise ValueError(f"{path.decode()}: action {action!r} is not {READ!r} or {WRITE!r}")
                if kind == CLIENT_STREAM or "namespace" not in request_class.DESCRIPTOR.fields_by_name:
                    # The check reads the namespace of the call's one request.
                    raise ValueError(f"{path.decode()}: no single request with a namespace to check")
            decode = decoders.get(m.name)
            if decode is None:
                # (protobuf parses any buffer; its stubs say bytes.)
                decode = cast(Callable[[bytes | bytearray | Pieces], Message], request_class.FromString)
            else:
                self.piecewise_paths.add(path)
            name = f"{descriptor.name}/{m.name}"
            self.methods[path] = Method(kind, decode, handler, name, now, action=action)
        self.service_names.append(descriptor.full_name)

    def get(self, path: bytes) -> Method | None:
        return self.methods.get(path)

    def data_operation(self, headers: Any) -> str | None:
        """The operation of the data call a request's ``headers`` open; None
        for any other call (health, reflection), which the overload door serves."""
        for name, value in headers:
            if name == b":path":
                method = self.methods.get(bytes(value))
                return None if method is None or method.action is None else method.operation
        return None
