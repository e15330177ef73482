"""``prism.pubsub.v1.PubSub``: request checks and conversion, nothing stored here.

Semantics live in the backends (see ``prism/backends/pubsub.py``).
``Publish`` and ``Ack`` for a namespace another tenant holds are forwarded
like any unary call. A ``Subscribe`` stream is served where its namespace is
held: on a connection that reached another tenant's worker it fails with
FAILED_PRECONDITION naming the tenant, whose workers the client reaches with
the ``prism-tenant`` metadata key (or an ``:authority`` of ``<tenant>.*``) on
its first call of the connection (the connection is then handed over).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Final, Protocol

import trio

from prism.backends.pubsub import Message, PubSubBackend, Start, StartKind, Subscription
from prism.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from prism.proto import pubsub_pb2
from prism.rpc.call import CallContext
from prism.rpc.methods import READ, SEND_HEADERS, WRITE

from .namespaces import Held, Remote, elsewhere

SERVICE = pubsub_pb2.DESCRIPTOR.services_by_name["PubSub"]

_ACK_OK = pubsub_pb2.AckResponse().SerializeToString()
_KINDS = {int(k) for k in StartKind}


class Locator(Protocol):
    def tenant_of(self, namespace: str) -> str | None:
        """The tenant that holds ``namespace``, or None if none does."""
        ...


class PubSub:
    """The PubSub service over this process's PubSub namespaces (the table's
    PubSub view); Publish and Ack for any other go to ``remote``."""

    # What the access rules must allow, per RPC (prism.rpc.methods).
    actions: Final = {"Subscribe": READ, "Ack": READ, "Publish": WRITE}

    def __init__(
        self,
        namespaces: Mapping[str, Held[PubSubBackend]],
        *,
        remote: Remote | None = None,
        locator: Locator | None = None,
    ) -> None:
        self.namespaces = namespaces
        self._remote = remote
        self._locator = locator
        self._streams: dict[str, set[_Stream]] = {}

    def end_streams(self, namespace: str | None = None) -> None:
        """End the Subscribe streams of ``namespace`` (every one if None) with
        UNAVAILABLE: the worker is draining or the namespace left it. Their
        unacknowledged messages go back to their groups; clients subscribe again."""
        names = list(self._streams) if namespace is None else [namespace]
        for name in names:
            for stream in self._streams.get(name, ()):
                stream.end()

    async def _elsewhere(self, namespace: str, call: CallContext) -> bytes:
        return await elsewhere(self._remote, namespace, call)

    def _local(
        self,
        request: pubsub_pb2.PublishRequest | pubsub_pb2.AckRequest | pubsub_pb2.SubscribeRequest,
        call: CallContext,
    ) -> PubSubBackend | None:
        """The backend of the request's namespace if this process holds it
        (None: forward), after the checks every local call gets."""
        call.namespace = request.namespace
        held = self.namespaces.get(request.namespace)
        if held is None:
            return None
        if not request.topic:
            raise InvalidArgument("topic must not be empty")
        return held.backend

    async def Publish(self, request: pubsub_pb2.PublishRequest, call: CallContext) -> bytes:
        backend = self._local(request, call)
        if backend is None:
            return await self._elsewhere(request.namespace, call)
        sequence = await backend.publish(
            request.topic, request.payload, dict(request.headers), request.message_id
        )
        return pubsub_pb2.PublishResponse(sequence=sequence).SerializeToString()

    async def Ack(self, request: pubsub_pb2.AckRequest, call: CallContext) -> bytes:
        backend = self._local(request, call)
        if backend is None:
            return await self._elsewhere(request.namespace, call)
        if not request.group:
            raise InvalidArgument("group must not be empty: an ephemeral subscription needs no acks")
        if request.sequences:
            await backend.ack(request.topic, request.group, list(request.sequences))
        return _ACK_OK

    async def Subscribe(
        self, request: pubsub_pb2.SubscribeRequest, call: CallContext
    ) -> AsyncIterator[pubsub_pb2.Message | object]:
        backend = self._local(request, call)
        if backend is None:
            tenant = self._locator.tenant_of(request.namespace) if self._locator else None
            if tenant is None:
                raise NotFound(f"unknown namespace {request.namespace!r}")
            raise FailedPrecondition(
                f"namespace {request.namespace!r} is held by tenant {tenant!r}: subscribe on a "
                f"connection to that tenant (metadata prism-tenant: {tenant})"
            )
        kind = request.start.kind
        if kind not in _KINDS:
            raise InvalidArgument(f"start.kind {kind} is not LATEST, EARLIEST or SEQUENCE")
        start = Start(StartKind(kind), request.start.sequence)
        if start.kind == StartKind.SEQUENCE and start.sequence < 1:
            raise InvalidArgument("start.sequence must be >= 1 for a SEQUENCE start")
        stream = _Stream()
        streams = self._streams.setdefault(request.namespace, set())
        streams.add(stream)
        try:
            async with backend.subscribe(request.topic, request.group, start) as subscription:
                # The subscription is in place: a LATEST subscriber that waits
                # for the response headers misses nothing published after them.
                yield SEND_HEADERS
                while True:
                    m = await stream.receive(subscription)
                    yield pubsub_pb2.Message(
                        topic=m.topic,
                        sequence=m.sequence,
                        payload=m.payload,
                        headers=m.headers,
                        message_id=m.message_id,
                    )
        finally:
            streams.discard(stream)
            if not streams and self._streams.get(request.namespace) is streams:
                del self._streams[request.namespace]


class _Stream:
    """One Subscribe call, which ``end`` stops between (or during) receives.

    The cancel scope covers only the wait for the next message, never the
    ``yield`` (a scope held across a generator's yield would also cover the
    code consuming it)."""

    __slots__ = ("ended", "scope")

    def __init__(self) -> None:
        self.ended = False
        self.scope: trio.CancelScope | None = None

    def end(self) -> None:
        self.ended = True
        if self.scope is not None:
            self.scope.cancel()

    async def receive(self, subscription: Subscription) -> Message:
        if not self.ended:
            with trio.CancelScope() as self.scope:
                return await subscription.receive()
            self.scope = None
        raise Unavailable(
            "subscription ended: the server is draining or the namespace moved; subscribe again"
        )
