"""PubSub on NATS JetStream, driven from trio by ``prism.drivers.nats`` (no asyncio, no threads).

Layout. One stream per namespace (option ``stream``, default ``PRISM_<namespace>``)
holds subjects ``prism.<stream>.>``; a topic is the subject token
``t<base64url(topic)>`` (any topic string is one valid token). ``open()``
creates the stream if missing (file storage, limits retention,
``duplicate_window`` = ``dedup_window_s``) or updates its
``duplicate_window``; it never deletes or purges. The message id goes in
``Nats-Msg-Id`` as ``<token>:<base64url(id)>``, so JetStream dedups per topic
and a subscriber gets the id back; user headers go as
``P-<base64url(name)>: <base64url(value)>`` (no collision with ``Nats-*``,
any name and value survive). The sequence is the stream sequence (a
duplicate's PubAck carries the first one's ``seq``).

Groups. A named group is a durable pull consumer ``g_<hash(topic, group)>``
(explicit acks, ``ack_wait`` = ``ack_wait_ms``), created at ``start`` if
missing and reused otherwise (its position kept; its ``ack_wait`` updated if
the option changed since); its members pull from it, so they
share its messages. ``receive`` sends a pull of one message
(``$JS.API.CONSUMER.MSG.NEXT``) only when called, so no member holds
messages it was not asked for. An empty group is an ephemeral consumer
(``ack_policy`` none), deleted when its context exits; the server also drops
it after ``EPHEMERAL_INACTIVE_S`` without a pull (a client that stops
reading for that long gets ``Unavailable`` and resubscribes).

Acks. Acking needs the delivery's reply subject (``$JS.ACK.<stream>.<consumer>...``),
which only the process that received it knows, while the gRPC Ack may come
to any worker. ``ack`` acks the sequences this process holds at once (as a
request: the server confirms, so an ack that returned is stored), and asks
for the others on ``_PRISM.ack.<stream>.<consumer>``, where every live
member of the group listens, acks what it holds and answers with what it
acked. No listener: nobody holds them, nothing to do. Listeners but no
answer within ``FORWARD_WAIT_S``: nobody holds them either (or a holder
failed; those deliveries then come back after ``ack_wait``). When a member's
context exits, its unacked deliveries are NAKed, so they are redelivered at
once; a delivery arriving after that (to a pull still open) is NAKed on
arrival (the pull's subscription ends with ``UNSUB <sid> <n+1>``, so the
server still sends that last message).

Tasks. The backend has one shared NATS connection (opened again on
next use if lost) and no background task, since ``open()`` and ``aclose()``
are separate calls. Each durable subscription runs one task in its own
nursery, inside its context: it answers forwarded acks, and while it waits
for them it keeps the shared connection read (server PINGs answered).

Modules. This one holds the backend (stream, consumers, publish, ack);
``subscription`` a member (pulls, held deliveries, leaving); ``jetstream``
the naming both use; ``errors`` the driver and JetStream errors' table.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

from prism.backends.nats.errors import ERRORS, JetStreamError
from prism.backends.nats.jetstream import (
    API_TIMEOUT_S,
    CLOSE_TIMEOUT_S,
    FAILURES,
    NS_PER_S,
    b64,
    consumer_name,
    forward_subject,
    topic_token,
)
from prism.backends.nats.options import NatsPubSubOptions
from prism.backends.nats.subscription import Member, nak_orphan
from prism.backends.pubsub import Start, StartKind
from prism.drivers import nats as natsio
from prism.drivers.tls import ClientContexts
from prism.errors import FailedPrecondition, Internal, Unavailable

KIND = "nats"
FORWARD_WAIT_S = 0.25
EPHEMERAL_INACTIVE_S = 30.0
MAX_ACK_PENDING = 10_000
_ERR_STREAM_NOT_FOUND = 10059
_ERR_CONSUMER_NOT_FOUND = 10014


class NatsPubSubBackend:
    """Options: ``NatsPubSubOptions`` (the server, the stream, and every
    PubSub backend's ``ack_wait_ms`` and ``dedup_window_s``)."""

    def __init__(self, options: NatsPubSubOptions, *, namespace: str) -> None:
        self.options = options
        self.url = options.url
        self.stream = options.stream or "PRISM_" + re.sub(r"[^A-Za-z0-9_-]", "_", namespace)
        self.prefix = f"prism.{self.stream}"
        self.connect_timeout_s = options.connect_timeout_s
        self._tls = ClientContexts(options.ca_file)
        self._nc: natsio.Connection | None = None
        self._connect_lock = trio.Lock()
        self._members: dict[str, set[Member]] = {}  # consumer -> live members here
        self._closed = False

    # -- connection and API ---------------------------------------------------

    async def _conn(self) -> natsio.Connection:
        if self._closed:
            raise Unavailable(f"{KIND} backend is closed")
        nc = self._nc
        if nc is not None and not nc.closed and nc.idle_s() <= natsio.IDLE_CHECK_S:
            return nc  # the common case, without the lock's checkpoint
        async with self._connect_lock:
            nc = self._nc
            if nc is not None and not nc.closed and nc.idle_s() > natsio.IDLE_CHECK_S:
                try:
                    await nc.flush(self.connect_timeout_s)
                except natsio.NatsError:
                    pass  # closed now: reconnected below
            if nc is None or nc.closed:
                nc = self._nc = await natsio.connect(
                    self.url, timeout_s=self.connect_timeout_s, contexts=self._tls
                )
                nc.orphan = nak_orphan(nc)
            return nc

    async def _api(self, subject: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        nc = await self._conn()
        data = json.dumps(body).encode() if body is not None else b""
        try:
            msg = await nc.request(subject, data, timeout_s=API_TIMEOUT_S)
        except natsio.NoResponders:
            raise Unavailable(f"nats: JetStream is not available ({subject}: no responders)") from None
        try:
            reply: dict[str, Any] = json.loads(msg.data)
        except ValueError:
            raise Internal(f"nats: {subject}: not a JetStream answer: {msg.data[:100]!r}") from None
        if "error" in reply:
            raise JetStreamError(subject, reply["error"])
        return reply

    async def open(self) -> None:
        with ERRORS:
            await self._open()

    async def _open(self) -> None:
        api = f"$JS.API.STREAM.%s.{self.stream}"
        window = int(self.options.dedup_window_s * NS_PER_S)
        try:
            info = await self._api(api % "INFO")
        except JetStreamError as exc:
            if exc.err_code != _ERR_STREAM_NOT_FOUND:
                raise
            config = {
                "name": self.stream, "subjects": [f"{self.prefix}.>"], "retention": "limits",
                "storage": "file", "discard": "old", "num_replicas": 1, "duplicate_window": window,
            }  # fmt: skip
            await self._api(api % "CREATE", config)
            return
        config = info["config"]
        if f"{self.prefix}.>" not in config.get("subjects", []):
            raise FailedPrecondition(
                f"nats: stream {self.stream} exists but does not take subjects {self.prefix}.> (not Prism's?)"
            )
        if config.get("duplicate_window") != window:
            await self._api(api % "UPDATE", {**config, "duplicate_window": window})

    async def aclose(self) -> None:
        self._closed = True
        if self._nc is not None:
            self._nc.close()

    async def drop(self) -> None:
        """Delete the stream and everything in it. For tests: the product never calls it."""
        with ERRORS:
            await self._api(f"$JS.API.STREAM.DELETE.{self.stream}")

    async def ping(self) -> None:
        """Raise unless NATS and JetStream answer (health checks)."""
        with ERRORS:
            await self._api("$JS.API.INFO")

    # -- publish ----------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, headers: Mapping[str, str], message_id: str) -> int:
        token = topic_token(topic)
        hdrs = {f"P-{b64(k)}": b64(v) for k, v in headers.items()}
        if message_id:
            hdrs["Nats-Msg-Id"] = f"{token}:{b64(message_id)}"
        subject = f"{self.prefix}.{token}"
        with ERRORS:
            nc = await self._conn()
            try:
                msg = await nc.request(subject, payload, hdrs, timeout_s=API_TIMEOUT_S)
            except natsio.NoResponders:
                raise Unavailable(f"nats: no stream stores {subject} (was {self.stream} deleted?)") from None
            ack: dict[str, Any] = json.loads(msg.data)
            if "error" in ack:
                raise JetStreamError(subject, ack["error"])
        return int(ack["seq"])

    # -- subscribe --------------------------------------------------------------

    def subscribe(self, topic: str, group: str, start: Start) -> AbstractAsyncContextManager[Member]:
        return self._subscribe(topic, group, start)

    def _consumer_config(self, topic: str, start: Start) -> dict[str, Any]:
        config: dict[str, Any] = {
            "filter_subject": f"{self.prefix}.{topic_token(topic)}",
            "replay_policy": "instant",
        }
        if start.kind == StartKind.SEQUENCE:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=max(start.sequence, 1))
        else:
            config["deliver_policy"] = "all" if start.kind == StartKind.EARLIEST else "new"
        return config

    async def _durable(self, topic: str, group: str, start: Start) -> str:
        name = consumer_name(topic, group)
        try:
            info = await self._api(f"$JS.API.CONSUMER.INFO.{self.stream}.{name}")
        except JetStreamError as exc:
            if exc.err_code != _ERR_CONSUMER_NOT_FOUND:
                raise
        else:
            await self._follow_ack_wait(name, info.get("config", {}))
            return name
        config = {
            **self._consumer_config(topic, start), "durable_name": name, "ack_policy": "explicit",
            "ack_wait": self.options.ack_wait_ms * 1_000_000, "max_ack_pending": MAX_ACK_PENDING,
            "max_deliver": -1,
        }  # fmt: skip
        try:
            await self._api(f"$JS.API.CONSUMER.DURABLE.CREATE.{self.stream}.{name}",
                            {"stream_name": self.stream, "config": config})  # fmt: skip
        except JetStreamError as exc:
            # Created meanwhile by another member (with another start)? Use it.
            try:
                await self._api(f"$JS.API.CONSUMER.INFO.{self.stream}.{name}")
            except JetStreamError:
                raise exc from None
        return name

    async def _ephemeral(self, topic: str, start: Start) -> str:
        inactive_ns = int(EPHEMERAL_INACTIVE_S * NS_PER_S)
        config = {**self._consumer_config(topic, start), "ack_policy": "none",
                  "inactive_threshold": inactive_ns, "mem_storage": True}  # fmt: skip
        info = await self._api(
            f"$JS.API.CONSUMER.CREATE.{self.stream}", {"stream_name": self.stream, "config": config}
        )
        name: str = info["name"]
        return name

    async def _follow_ack_wait(self, name: str, config: dict[str, Any]) -> None:
        # A group made under another ack_wait_ms (the option changed since)
        # takes the namespace's current one: JetStream keeps a durable
        # consumer's ack_wait until the consumer is updated, and ack_wait is
        # one of the settings an update may change.
        wanted = self.options.ack_wait_ms * 1_000_000
        if config.get("ack_wait") != wanted:
            await self._api(
                f"$JS.API.CONSUMER.DURABLE.CREATE.{self.stream}.{name}",
                {"stream_name": self.stream, "config": {**config, "ack_wait": wanted}},
            )

    @asynccontextmanager
    async def _subscribe(self, topic: str, group: str, start: Start) -> AsyncIterator[Member]:
        with ERRORS:
            name = await (self._durable(topic, group, start) if group else self._ephemeral(topic, start))
            nc = await self._conn()
            box = await nc.subscribe(nc.new_inbox())
        sub = Member(nc, box, self.stream, topic, name, durable=bool(group))
        try:
            async with trio.open_nursery() as nursery:
                if group:
                    with ERRORS:
                        listener = await nc.subscribe(forward_subject(self.stream, name))
                    nursery.start_soon(sub.serve_forwarded_acks, listener)
                    self._members.setdefault(name, set()).add(sub)
                try:
                    yield sub
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group_exc:
            # The nursery wraps what the subscriber's own code raised (say,
            # Unavailable when the stream is ended); give it back as it was.
            if len(group_exc.exceptions) == 1:
                raise group_exc.exceptions[0] from None
            raise
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await self._release(sub)

    async def _release(self, sub: Member) -> None:
        members = self._members.get(sub.consumer)
        if members is not None:
            members.discard(sub)
            if not members:
                del self._members[sub.consumer]
        try:
            await sub.leave()
            if not sub.durable:
                await self._api(f"$JS.API.CONSUMER.DELETE.{self.stream}.{sub.consumer}")
        except FAILURES:
            pass  # connection lost: the server redelivers after ack_wait / drops the consumer

    # -- ack --------------------------------------------------------------------

    async def ack(self, topic: str, group: str, sequences: Sequence[int]) -> None:
        if group and sequences:
            with ERRORS:
                await self._ack(consumer_name(topic, group), set(sequences))

    async def _ack(self, name: str, wanted: set[int]) -> None:
        for member in list(self._members.get(name, ())):
            wanted -= await member.ack_held(wanted)
        if not wanted:
            return
        nc = await self._conn()
        box = nc.new_box()
        try:
            await nc.publish(
                forward_subject(self.stream, name), json.dumps(sorted(wanted)).encode(), reply=box.subject
            )
            with trio.move_on_after(FORWARD_WAIT_S):
                while wanted:
                    msg = await nc.next_msg(box)
                    if msg.status == 503:
                        return  # no member anywhere: nothing is pending for anyone to ack
                    wanted -= set(json.loads(msg.data))
        finally:
            nc.drop_box(box)
