"""One member of a NATS subscription: its pulls, the deliveries it holds
until they are acked, and what it gives back when it leaves.

A member pulls one message at a time (``$JS.API.CONSUMER.MSG.NEXT``) only
when ``receive`` is called, so it never holds messages it was not asked for.
A durable member remembers each delivery's reply subject (``$JS.ACK...``):
only the process that received a delivery can ack it, so a member acks what
it holds at once, and answers acks forwarded by other workers on
``forward_subject``. Leaving NAKs what it still holds (redelivered at once).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import trio

from prism.backends.nats.errors import ERRORS
from prism.backends.nats.jetstream import (
    API_TIMEOUT_S,
    CLOSE_TIMEOUT_S,
    FAILURES,
    FETCH_EXPIRES_S,
    NS_PER_S,
    ack_sequence,
    unb64,
)
from prism.backends.pubsub import Message
from prism.drivers import nats as natsio
from prism.errors import Unavailable


def nak_orphan(nc: natsio.Connection) -> Callable[[natsio.Msg], None]:
    """``nc``'s handler of messages for a box that is gone (``Connection.orphan``)."""

    def orphan(msg: natsio.Msg) -> None:
        # A JetStream delivery for a pull whose subscription is gone: give it back now.
        if msg.reply.startswith("$JS.ACK.") and not msg.status:
            nc.send_later(nc.pub_bytes(msg.reply, b"-NAK", None, ""))

    return orphan


class Member:
    """Receives for one ``subscribe`` context; ``stream``'s consumer ``consumer``."""

    def __init__(
        self, nc: natsio.Connection, box: natsio.Box, stream: str, topic: str, consumer: str, *, durable: bool
    ) -> None:
        self._nc = nc
        self.topic = topic
        self.consumer = consumer
        self.durable = durable
        self._box = box  # the pulls' deliveries
        self._fetching = False
        self._held: dict[int, str] = {}  # sequence -> reply subject of deliveries not acked yet
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._fetch = json.dumps({"batch": 1, "expires": int(FETCH_EXPIRES_S * NS_PER_S)}).encode()

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
                headers[unb64(k[2:])] = unb64(v)
            elif k == "Nats-Msg-Id":
                message_id = unb64(v.partition(":")[2])
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
        except FAILURES:
            pass  # connection lost: receive() reports it
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                try:
                    await nc.unsubscribe(listener)
                except FAILURES:
                    pass

    async def leave(self) -> None:
        """Stop pulling and NAK what this member holds (redelivered at once)."""
        nc = self._nc
        naks = [m.reply for m in self._box.msgs if m.reply.startswith("$JS.ACK.") and not m.status]
        naks += self._held.values()
        self._held.clear()
        # An open pull still ends with one message (a delivery, NAKed by the
        # orphan handler, or a status): the server unsubscribes after it.
        pull_open = self._fetching and not self._box.msgs  # one message ends a pull
        await nc.unsubscribe(self._box, more=1 if pull_open else 0)
        if self.durable and naks:
            for reply in naks:
                nc.send_later(nc.pub_bytes(reply, b"-NAK", None, ""))
            await nc.flush(API_TIMEOUT_S)  # sends them first
