"""Calls for another tenant's namespace, forwarded over nng REQ/REP.

The receiving worker sends the raw request bytes to a worker of the owning
tenant and relays its answer; the owner runs the same handler a local call
would. One REQ socket per owner worker (redialled by nng when that worker is
replaced), one nng context per call so calls on a socket run concurrently.
A forwarded call is never forwarded again: an owner that no longer owns the
namespace answers UNAVAILABLE, which the client may retry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pynng
import trio

from prism.errors import DeadlineExceeded, PrismError, StatusCode, Unavailable
from prism.router.messages import (
    ForwardRequest,
    ForwardResponse,
    control_encoder,
    forward_request_decoder,
    forward_response_decoder,
)
from prism.router.table import WorkerEntry

log = logging.getLogger("prism.forward")

# Without a deadline from the client, a forwarded call waits this long for
# the owner (e.g. one that died mid-call) before answering UNAVAILABLE.
DEFAULT_FORWARD_TIMEOUT_S = 30.0
# Concurrent forwarded calls an owner worker serves.
SERVER_CONTEXTS = 64


class RemoteStatus(PrismError):
    """A non-OK answer relayed from the owner worker, with its status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.grpc_status = StatusCode(status)


class Forwarder:
    """The sending side, shared by every connection of a worker."""

    def __init__(self) -> None:
        self._sockets: dict[str, pynng.Req0] = {}
        self._next = 0

    def _socket(self, address: str) -> pynng.Req0:
        sock = self._sockets.get(address)
        if sock is None:
            sock = pynng.Req0(dial=address, block_on_dial=False)
            # REQ resends unanswered requests after a minute by default; a
            # forwarded write must not be applied twice, so never resend.
            sock.resend_time = -1
            self._sockets[address] = sock
        return sock

    async def forward(
        self,
        owners: list[WorkerEntry],
        path: bytes,
        payload: bytes,
        metadata: list[tuple[str, str | bytes]],
        deadline: float,
    ) -> bytes:
        """Run a call on one of ``owners``; its response bytes, or its error raised."""
        serving = [w for w in owners if w.serving]
        if not serving:
            raise Unavailable("no worker of the owning tenant is serving; retry")
        self._next += 1
        owner = serving[self._next % len(serving)]
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded")
        timeout = None if math.isinf(remaining) else remaining
        request = ForwardRequest(path, payload, metadata, timeout)
        ctx = self._socket(owner.forward_address).new_context()
        try:
            with trio.move_on_after(min(remaining, DEFAULT_FORWARD_TIMEOUT_S)):
                await ctx.asend(control_encoder.encode(request))
                raw = await ctx.arecv()
                response: ForwardResponse = forward_response_decoder.decode(raw)
                if response.status != StatusCode.OK:
                    raise RemoteStatus(response.status, response.message)
                return response.payload
        finally:
            ctx.close()
        if remaining <= DEFAULT_FORWARD_TIMEOUT_S:
            raise DeadlineExceeded("deadline exceeded")
        raise Unavailable(f"worker {owner.id} of tenant {owner.tenant!r} did not answer; retry")

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


Handler = Callable[[ForwardRequest], Awaitable[ForwardResponse]]


async def serve_forwarded(
    address: str,
    handle: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer forwarded calls on ``address`` until cancelled."""
    with pynng.Rep0(listen=address) as rep:
        task_status.started()
        async with trio.open_nursery() as nursery:
            for _ in range(SERVER_CONTEXTS):
                nursery.start_soon(_serve_context, rep.new_context(), handle)


async def _serve_context(ctx: Any, handle: Handler) -> None:
    with ctx:
        while True:
            raw = await ctx.arecv()
            try:
                request = forward_request_decoder.decode(raw)
            except Exception:
                log.warning("undecodable forwarded call dropped")
                response = ForwardResponse(StatusCode.INTERNAL, "bad forwarded call", b"")
            else:
                response = await handle(request)
            await ctx.asend(control_encoder.encode(response))
