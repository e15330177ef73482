"""The method table: which handler serves which ``/package.Service/Method``.

A service is registered from its protobuf ``ServiceDescriptor`` plus an object
with one ``async def`` per RPC, named as in the .proto (and, optionally, a
``<Method>Now`` for answers that need no waiting: ``Method.now``). Request decoding and
streaming kinds come from the descriptor, so a handler cannot disagree with
the contract clients are generated from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, NamedTuple

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

UNARY: Final = 0  # one request, one response
# A streaming handler may yield this (instead of a message) to have the
# response headers sent at once: a client then knows the call is under way
# (PubSub's Subscribe yields it once its subscription is in place).
SEND_HEADERS: Final = object()

SERVER_STREAM: Final = 1  # one request, a stream of responses
CLIENT_STREAM: Final = 2  # requests streamed; handler yields responses (bidi too)

UnaryHandler = Callable[[Any, Any], Awaitable[Message]]
StreamHandler = Callable[[Any, Any], AsyncIterator[Message]]


class Method(NamedTuple):
    kind: int
    decode: Callable[[bytes], Message]
    handler: Callable[..., Any]
    name: str  # "Service/Method", for logs and metrics
    # ``<Method>Now(request, call)`` of a unary RPC, if the implementation has
    # one: the serialized answer when it needs no waiting (a shared-cache
    # hit), else None. The server tries it first and answers at once, with no
    # task of its own; None (or an error) sends the call to the handler.
    now: Callable[[Any, Any], bytes | None] | None = None

    def answer_now(self, request: Any, call: Any) -> bytes | None:
        """``now``'s answer; None without one, or if it raised (the handler
        then answers the call, its errors included)."""
        if self.now is None:
            return None
        try:
            return self.now(request, call)
        except Exception:
            return None


class MethodTable:
    """Paths (as bytes, as they arrive in ``:path``) to methods."""

    def __init__(self) -> None:
        self.methods: dict[bytes, Method] = {}
        self.service_names: list[str] = []

    def add_service(self, descriptor: ServiceDescriptor, implementation: object) -> None:
        """Register every RPC of ``descriptor`` from same-named methods of
        ``implementation``; a missing one is a programming error."""
        for m in descriptor.methods:
            handler = getattr(implementation, m.name)
            if m.client_streaming:
                kind = CLIENT_STREAM
            elif m.server_streaming:
                kind = SERVER_STREAM
            else:
                kind = UNARY
            request_class = GetMessageClass(m.input_type)
            path = f"/{descriptor.full_name}/{m.name}".encode()
            now = getattr(implementation, f"{m.name}Now", None) if kind == UNARY else None
            self.methods[path] = Method(
                kind, request_class.FromString, handler, f"{descriptor.name}/{m.name}", now
            )
        self.service_names.append(descriptor.full_name)

    def get(self, path: bytes) -> Method | None:
        return self.methods.get(path)
