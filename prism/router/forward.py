"""Calls for another tenant's namespace, forwarded over nng.

Each worker has one ``ForwardBus``: an nng PULL socket at its forward address
that receives both the calls other workers forward to it and the answers to
the calls it forwarded; answers and calls go out on PUSH sockets dialled to
the peer's address (nng redials by itself when a worker is replaced). Calls
and answers are matched by a per-worker call id.

Why not REQ/REP with pynng's async API: every async operation there
completes on an nng thread and wakes trio through ``run_sync_soon``, four
cross-thread wake-ups per forwarded call; that alone made a forwarded call
cost more than twice a local one. Here the trio loop waits on the PULL
socket's ``recv_fd`` (readable while messages are queued) and sends without
blocking, so nng's own I/O threads never call back into Python.

Each nng message still costs a hand-off to nng's I/O threads and back, of
the order of a whole local call's CPU, so messages are batched: the calls
(and answers) for one peer that arise in one trio scheduling batch go out as
one nng message, flushed once the batch has run. Under load a message
carries many calls; a lone call pays for one message, as before. (What a
forwarded call costs: the "forwarded" scenario in ``bench/results/gateway.json``.)

This is the transport only: which calls go where, and what a worker does
with a call forwarded to it, is the forwarding policy (``prism.router.remote``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Awaitable, Callable

import msgspec
import trio

from prism.errors import DeadlineExceeded, PrismError, StatusCode, Unavailable
from prism.nng import pynng
from prism.router.messages import ForwardAnswer, ForwardCall, Forwarded
from prism.router.table import WorkerEntry
from prism.rpc.call import Caller

log = logging.getLogger("prism.forward")

# Without a deadline from the client, a forwarded call waits this long for
# the owner before answering UNAVAILABLE (an owner that dies is noticed
# sooner: see owners_gone).
DEFAULT_FORWARD_TIMEOUT_S = 30.0
# Messages an nng PUSH socket queues for a peer before send would block.
_SEND_BUFFER = 1024
# Answered calls the give-up heap may hold beyond twice the calls in flight.
_EXPIRIES_SLACK = 1024
# A PUSH socket just dialled has no connection yet; sends retry this often.
_CONNECT_RETRY_S = 0.002

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Forwarded])

Handler = Callable[[ForwardCall], Awaitable[ForwardAnswer]]


class RemoteStatus(PrismError):
    """A non-OK answer relayed from the owner worker, with its status."""

    def __init__(self, status: int, message: str, pushback_ms: int = -1) -> None:
        super().__init__(message)
        self.grpc_status = StatusCode(status)
        self.pushback_ms = pushback_ms  # the owner's retry pushback (prism.limits); -1: none


class Moved(RemoteStatus):
    """The worker a call was forwarded to no longer holds its namespace
    (``ForwardAnswer.moved``). Raised by that worker's forwarding policy,
    which answers it as a moved answer, and by ``ForwardBus.forward`` on the
    sender's side when such an answer comes back."""


Answered = Callable[[ForwardAnswer | None], None]


class _Pending:
    """A call sent and not yet answered: awaited (``forward``: its event) or
    called back (``post``: ``answered``, with None if no answer came)."""

    __slots__ = ("answer", "answered", "event", "owner_id")

    def __init__(self, owner_id: int, answered: Answered | None = None) -> None:
        self.event = trio.Event() if answered is None else None
        self.answer: ForwardAnswer | None = None
        self.owner_id = owner_id
        self.answered = answered

    def settle(self, answer: ForwardAnswer | None) -> None:
        if self.answered is not None:
            self.answered(answer)
        else:
            self.answer = answer
            assert self.event is not None
            self.event.set()


class ForwardBus:
    """Forwarded calls in and out of one worker."""

    def __init__(self, address: str, handle: Handler) -> None:
        self.address = address
        self._handle = handle
        self._pull: pynng.Pull0 | None = None
        self._pushes: dict[str, pynng.Push0] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._next_owner = 0
        self.nursery: trio.Nursery | None = None  # the bus's tasks (and forward_now's retries)
        self.serving = 0  # calls forwarded here being answered (a draining worker waits for them)
        # Posted calls' give-up times (time, call id), earliest first, and
        # the scope whose deadline is the earliest (``_expire``).
        self._expiries: list[tuple[float, int]] = []
        self._expiry_scope = trio.CancelScope()
        self._outbox: dict[str, list[Forwarded]] = {}
        self._flush_lot = trio.lowlevel.ParkingLot()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive calls and answers until cancelled."""
        with pynng.Pull0(listen=self.address) as pull:
            self._pull = pull
            fd = pull.recv_fd
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._expire)
                task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    self._drain(pull, nursery)

    def _drain(self, pull: pynng.Pull0, nursery: trio.Nursery) -> None:
        while True:
            try:
                raw = pull.recv(block=False)
            except pynng.TryAgain:
                return
            try:
                batch = _decoder.decode(raw)
            except msgspec.DecodeError:
                log.warning("undecodable forwarded message dropped")
                continue
            for message in batch:
                if isinstance(message, ForwardAnswer):
                    pending = self._pending.pop(message.id, None)
                    if pending is not None:  # else: the caller gave up already
                        pending.settle(message)
                else:
                    self.serving += 1
                    nursery.start_soon(self._answer, message)

    async def _answer(self, call: ForwardCall) -> None:
        try:
            self._post(call.reply_to, await self._handle(call))
        finally:
            self.serving -= 1

    def _post(self, address: str, message: Forwarded) -> None:
        queue = self._outbox.get(address)
        if queue is None:
            self._outbox[address] = [message]
            self._flush_lot.unpark()
        else:
            queue.append(message)

    async def _flusher(self) -> None:
        # Runs after the tasks that posted in this scheduling batch: each peer
        # gets everything queued for it in one message.
        while True:
            if not self._outbox:
                await self._flush_lot.park()
            outbox, self._outbox = self._outbox, {}
            for address, batch in outbox.items():
                try:
                    await self._send(address, _encoder.encode(batch), trio.current_time() + 1.0)
                except Unavailable:
                    log.warning("forwarded messages to %s dropped: peer unreachable", address)

    async def _send(self, address: str, data: bytes, deadline: float) -> None:
        push = self._pushes.get(address)
        if push is None:
            push = pynng.Push0(dial=address, block_on_dial=False, send_buffer_size=_SEND_BUFFER)
            self._pushes[address] = push
        while True:
            try:
                push.send(data, block=False)
                return
            except pynng.TryAgain:
                # Not connected yet (a new or restarting peer) or its queue is full.
                if trio.current_time() >= deadline:
                    raise Unavailable("the owning worker is not reachable; retry") from None
                await trio.sleep(_CONNECT_RETRY_S)

    async def forward(
        self,
        owners: list[WorkerEntry],
        path: bytes,
        payload: bytes,
        metadata: list[tuple[str, str | bytes]],
        deadline: float,
        caller: Caller | None = None,
    ) -> bytes:
        """Run a call on one of ``owners``; its response bytes, or its error raised.
        ``caller``: who made it, as this worker's access check established."""
        serving = [w for w in owners if w.serving]
        if not serving:
            raise Unavailable("no worker of the owning tenant is serving; retry")
        self._next_owner += 1
        owner = serving[self._next_owner % len(serving)]
        now = trio.current_time()
        if deadline <= now:
            raise DeadlineExceeded("deadline exceeded")
        timeout = None if math.isinf(deadline) else deadline - now
        give_up = min(deadline, now + DEFAULT_FORWARD_TIMEOUT_S)
        call_id = next(self._ids)
        pending = self._pending[call_id] = _Pending(owner.id)
        assert pending.event is not None
        try:
            principal, peer = caller if caller is not None else (None, "")
            self._post(
                owner.forward_address,
                ForwardCall(call_id, self.address, path, payload, metadata, timeout, principal, peer),
            )
            with trio.move_on_at(give_up):
                await pending.event.wait()
        finally:
            self._pending.pop(call_id, None)
        answer = pending.answer
        if answer is None:
            if trio.current_time() >= deadline:
                raise DeadlineExceeded("deadline exceeded")
            raise Unavailable(f"worker {owner.id} of tenant {owner.tenant!r} did not answer; retry")
        if answer.status != StatusCode.OK:
            raise (Moved if answer.moved else RemoteStatus)(answer.status, answer.message, answer.pushback_ms)
        return answer.payload

    def post(
        self,
        owners: list[WorkerEntry],
        path: bytes,
        payload: bytes,
        metadata: list[tuple[str, str | bytes]],
        deadline: float,
        caller: Caller | None,
        answered: Answered,
    ) -> bool:
        """``forward`` without waiting: send the call to one of ``owners``
        and return; ``answered`` gets the owner's answer, or None if none
        came by the deadline (or ``DEFAULT_FORWARD_TIMEOUT_S``), or the owner
        stopped serving. False (nothing sent): no owner serves, or the
        deadline has passed."""
        serving = [w for w in owners if w.serving]
        now = trio.current_time()
        if not serving or deadline <= now:
            return False
        self._next_owner += 1
        owner = serving[self._next_owner % len(serving)]
        timeout = None if math.isinf(deadline) else deadline - now
        give_up = min(deadline, now + DEFAULT_FORWARD_TIMEOUT_S)
        call_id = next(self._ids)
        self._pending[call_id] = _Pending(owner.id, answered)
        principal, peer = caller if caller is not None else (None, "")
        self._post(
            owner.forward_address,
            ForwardCall(call_id, self.address, path, payload, metadata, timeout, principal, peer),
        )
        expiries = self._expiries
        if len(expiries) > 2 * len(self._pending) + _EXPIRIES_SLACK:
            # Answered calls stay in the heap until their time comes (up to
            # DEFAULT_FORWARD_TIMEOUT_S): dropped here, the heap stays the
            # size of the calls in flight, not of 30 s of calls.
            expiries[:] = [entry for entry in expiries if entry[1] in self._pending]
            heapq.heapify(expiries)
        heapq.heappush(expiries, (give_up, call_id))
        if give_up < self._expiry_scope.deadline:
            self._expiry_scope.deadline = give_up
        return True

    async def _expire(self) -> None:
        # Posted calls past their give-up time are answered None. One task,
        # one deadline (the earliest): a heap push per call, not a task.
        expiries = self._expiries
        while True:
            with trio.CancelScope() as self._expiry_scope:
                self._expiry_scope.deadline = expiries[0][0] if expiries else math.inf
                await trio.sleep_forever()
            now = trio.current_time()
            while expiries and expiries[0][0] <= now:
                _, call_id = heapq.heappop(expiries)
                pending = self._pending.pop(call_id, None)
                if pending is not None:  # else answered already
                    pending.settle(None)

    def owners_gone(self, serving: set[int]) -> None:
        """Give up at once on calls sent to workers that no longer serve (the
        routing table says so), instead of waiting out their timeout."""
        gone = [i for i, pending in self._pending.items() if pending.owner_id not in serving]
        for call_id in gone:
            self._pending.pop(call_id).settle(None)  # no answer: the caller answers UNAVAILABLE

    def close(self) -> None:
        for push in self._pushes.values():
            push.close()
        self._pushes.clear()
