"""Messages on the nng sockets, as msgspec structs (msgpack on the wire).

Control messages (supervisor -> workers, PUB/SUB) announce *state*, not
commands: "the routing generation is N", "drain", "log level is X". The
supervisor repeats the current state every heartbeat interval, so a worker
that missed a message (PUB/SUB drops to late or slow subscribers) catches up,
and a message received twice does nothing the second time.
"""

from __future__ import annotations

from typing import Any

import msgspec


class State(msgspec.Struct, tag="state", frozen=True):
    """The supervisor's current word to every worker."""

    generation: int
    draining: bool = False
    log_level: str = "info"


class Heartbeat(msgspec.Struct, tag="hb", frozen=True):
    """A worker is alive and serving ``generation`` (workers -> supervisor, PUSH/PULL)."""

    worker_id: int
    pid: int
    generation: int
    active_calls: int = 0


class BootFailed(msgspec.Struct, tag="bootfail", frozen=True):
    """A worker could not start serving at all; the supervisor halts."""

    worker_id: int
    pid: int
    reason: str


WorkerEvent = Heartbeat | BootFailed


class ForwardCall(msgspec.Struct, tag="c", frozen=True, array_like=True):
    """A call for a namespace of another tenant, sent to one of its workers.

    With security on, the sender has checked the call and established who
    made it: ``principal`` (the bearer token's subject or the client
    certificate's identity; the token itself is not sent) and ``peer`` (the
    client's address, for the owner's audit lines). The owner checks the
    access rules for that principal again: no worker serves an unchecked call.
    """

    id: int
    reply_to: str  # the sender's forward address, where the answer goes
    path: bytes
    payload: bytes
    metadata: list[tuple[str, Any]]  # str values, bytes for -bin keys
    timeout_s: float | None
    principal: str | None = None  # None: the sender ran no check (security off there)
    peer: str = ""


class ForwardAnswer(msgspec.Struct, tag="a", frozen=True, array_like=True):
    """The owner's answer to a ``ForwardCall`` of the same id: the response
    bytes with status OK, or a gRPC status and message."""

    id: int
    status: int
    message: str
    payload: bytes
    # The owner no longer holds the call's namespace: a reload moved it since
    # the sender read its routing table. The sender refreshes its table and
    # tries once more; status and message are what its client sees otherwise.
    moved: bool = False
    # A quota's or the shedder's ``grpc-retry-pushback-ms`` (prism.limits); -1: none.
    pushback_ms: int = -1


Forwarded = ForwardCall | ForwardAnswer


control_encoder = msgspec.msgpack.Encoder()
control_decoder = msgspec.msgpack.Decoder(State)
event_decoder = msgspec.msgpack.Decoder(WorkerEvent)
