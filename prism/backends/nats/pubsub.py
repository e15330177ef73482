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
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import trio

from prism.backends.nats.errors import ERRORS, JetStreamError
from prism.backends.nats.options import NatsPubSubOptions
from prism.backends.pubsub import Message, Start, StartKind
from prism.drivers import nats as natsio
from prism.errors import FailedPrecondition, Internal, PrismError, Unavailable

KIND = "nats"
API_TIMEOUT_S = 5.0
FETCH_EXPIRES_S = 30.0
FORWARD_WAIT_S = 0.25
EPHEMERAL_INACTIVE_S = 30.0
MAX_ACK_PENDING = 10_000
CLOSE_TIMEOUT_S = 2.0
_NS = 1_000_000_000
_ERR_STREAM_NOT_FOUND = 10059
_ERR_CONSUMER_NOT_FOUND = 10014
# What a background step (forwarded acks, release) may meet when NATS goes
# away; the calls a client is waiting on report it instead.
_FAILURES = (natsio.NatsError, JetStreamError, PrismError)


def _b64(s: str) -> str:
    return base64.urlsafe_b64encode(s.encode()).rstrip(b"=").decode()


def _unb64(s: str) -> str:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)).decode()


def topic_token(topic: str) -> str:
    return "t" + _b64(topic)


def consumer_name(topic: str, group: str) -> str:
    return "g_" + hashlib.sha256(f"{topic}\0{group}".encode()).hexdigest()[:32]


def ack_sequence(reply: str) -> int:
    """The stream sequence in a ``$JS.ACK`` subject (old 9-token and new 12-token forms)."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


class NatsPubSubBackend:
    """Options: ``NatsPubSubOptions`` (the server, the stream, and every
    PubSub backend's ``ack_wait_ms`` and ``dedup_window_s``)."""

    def __init__(self, options: NatsPubSubOptions, *, namespace: str) -> None:
        self.options = options
        self.url = options.url
        self.stream = options.stream or "PRISM_" + re.sub(r"[^A-Za-z0-9_-]", "_", namespace)
        self.prefix = f"prism.{self.stream}"
        self.connect_timeout_s = options.connect_timeout_s
        self._nc: natsio.Connection | None = None
        self._connect_lock = trio.Lock()
        self._members: dict[str, set[_Subscription]] = {}  # consumer -> live members here
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
                nc = self._nc = await natsio.connect(self.url, timeout_s=self.connect_timeout_s)
                nc.orphan = _nak_orphan(nc)
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
        window = int(self.options.dedup_window_s * _NS)
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
        hdrs = {f"P-{_b64(k)}": _b64(v) for k, v in headers.items()}
        if message_id:
            hdrs["Nats-Msg-Id"] = f"{token}:{_b64(message_id)}"
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

    def subscribe(self, topic: str, group: str, start: Start) -> AbstractAsyncContextManager[_Subscription]:
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
        config = {**self._consumer_config(topic, start), "ack_policy": "none",
                  "inactive_threshold": int(EPHEMERAL_INACTIVE_S * _NS), "mem_storage": True}  # fmt: skip
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
    async def _subscribe(self, topic: str, group: str, start: Start) -> AsyncIterator[_Subscription]:
        with ERRORS:
            name = await (self._durable(topic, group, start) if group else self._ephemeral(topic, start))
            nc = await self._conn()
            box = await nc.subscribe(nc.new_inbox())
        sub = _Subscription(self, nc, box, topic, name, durable=bool(group))
        try:
            async with trio.open_nursery() as nursery:
                if group:
                    with ERRORS:
                        listener = await nc.subscribe(f"_PRISM.ack.{self.stream}.{name}")
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
                await sub.release()

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
                f"_PRISM.ack.{self.stream}.{name}", json.dumps(sorted(wanted)).encode(), reply=box.subject
            )
            with trio.move_on_after(FORWARD_WAIT_S):
                while wanted:
                    msg = await nc.next_msg(box)
                    if msg.status == 503:
                        return  # no member anywhere: nothing is pending for anyone to ack
                    wanted -= set(json.loads(msg.data))
        finally:
            nc.drop_box(box)


def _nak_orphan(nc: natsio.Connection) -> Any:
    def orphan(msg: natsio.Msg) -> None:
        # A JetStream delivery for a pull whose subscription is gone: give it back now.
        if msg.reply.startswith("$JS.ACK.") and not msg.status:
            nc.send_later(nc.pub_bytes(msg.reply, b"-NAK", None, ""))

    return orphan


class _Subscription:
    def __init__(
        self, backend: NatsPubSubBackend, nc: natsio.Connection, box: natsio.Box, topic: str, consumer: str,
        *, durable: bool,
    ) -> None:  # fmt: skip
        self._backend = backend
        self._nc = nc
        self.topic = topic
        self.consumer = consumer
        self.durable = durable
        self._box = box  # the pulls' deliveries
        self._fetching = False
        self._held: dict[int, str] = {}  # sequence -> reply subject of deliveries not acked yet
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{backend.stream}.{consumer}"
        self._fetch = json.dumps({"batch": 1, "expires": int(FETCH_EXPIRES_S * _NS)}).encode()

    async def receive(self) -> Message:
        with ERRORS:
            return await self._receive()

    async def _receive(self) -> Message:
        nc = self._nc
        while True:
            if not self._box.msgs and not self._fetching:
                await nc.publish(self._next, self._fetch, reply=self._box.subject)
                self._fetching = True
            with trio.move_on_after(FETCH_EXPIRES_S + API_TIMEOUT_S) as scope:
                msg = await nc.next_msg(self._box)
            if scope.cancelled_caught:  # the pull's end never came: is the server still there?
                await nc.flush(API_TIMEOUT_S)
                self._fetching = False
                continue
            self._fetching = False
            if msg.status in (404, 408, 100):  # no messages / pull expired / heartbeat
                continue
            if msg.status:
                raise Unavailable(f"nats: pull from {self.consumer}: {msg.status} {msg.description}")
            return self._message(msg)

    def _message(self, msg: natsio.Msg) -> Message:
        seq = ack_sequence(msg.reply)
        if self.durable:
            self._held[seq] = msg.reply
        headers: dict[str, str] = {}
        message_id = ""
        for k, v in msg.headers.items():
            if k.startswith("P-"):
                headers[_unb64(k[2:])] = _unb64(v)
            elif k == "Nats-Msg-Id":
                message_id = _unb64(v.partition(":")[2])
        return Message(
            topic=self.topic, sequence=seq, payload=msg.data, headers=headers, message_id=message_id
        )

    async def ack_held(self, sequences: set[int]) -> set[int]:
        """Ack the deliveries among ``sequences`` this member holds, all in one
        write, and wait for the server to confirm each; the ones acked."""
        held = sorted(sequences & self._held.keys())
        if not held:
            return set()
        nc = self._nc
        boxes = [nc.new_box() for _ in held]
        try:
            for seq, box in zip(held, boxes, strict=True):
                nc.send_later(nc.pub_bytes(self._held[seq], b"+ACK", None, box.subject))
            await nc.send_queued()
            with trio.move_on_after(API_TIMEOUT_S):
                for box in boxes:
                    await nc.next_msg(box)  # "no responders" too: the consumer is gone, nothing to ack
                for seq in held:
                    self._held.pop(seq, None)
                return set(held)
            raise Unavailable(f"nats: acks to {self.consumer} not confirmed within {API_TIMEOUT_S:g} s")
        finally:
            for box in boxes:
                nc.drop_box(box)

    async def serve_forwarded_acks(self, listener: natsio.Box) -> None:
        nc = self._nc
        try:
            while True:
                msg = await nc.next_msg(listener)
                try:
                    wanted = {int(s) for s in json.loads(msg.data)}
                except (ValueError, TypeError):
                    continue
                done = await self.ack_held(wanted)
                if done and msg.reply:
                    await nc.publish(msg.reply, json.dumps(sorted(done)).encode())
        except _FAILURES:
            pass  # connection lost: receive() reports it
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                try:
                    await nc.unsubscribe(listener)
                except _FAILURES:
                    pass

    async def release(self) -> None:
        """NAK what this member holds (redelivered at once); drop an ephemeral consumer."""
        backend, nc = self._backend, self._nc
        members = backend._members.get(self.consumer)
        if members is not None:
            members.discard(self)
            if not members:
                del backend._members[self.consumer]
        naks = [m.reply for m in self._box.msgs if m.reply.startswith("$JS.ACK.") and not m.status]
        naks += self._held.values()
        self._held.clear()
        try:
            # An open pull still ends with one message (a delivery, NAKed by
            # the orphan handler, or a status): the server unsubscribes after it.
            pull_open = self._fetching and not self._box.msgs  # one message ends a pull
            await nc.unsubscribe(self._box, more=1 if pull_open else 0)
            if self.durable:
                if naks:
                    for reply in naks:
                        nc.send_later(nc.pub_bytes(reply, b"-NAK", None, ""))
                    await nc.flush(API_TIMEOUT_S)  # sends them first
            else:
                await backend._api(f"$JS.API.CONSUMER.DELETE.{backend.stream}.{self.consumer}")
        except _FAILURES:
            pass  # connection lost: the server redelivers after ack_wait / drops the consumer
