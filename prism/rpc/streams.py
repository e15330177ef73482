"""The trio side of streaming calls: a streaming request read as its handler
asks, and a streaming answer held back while the client does not read.

``prism.rpc.server.Connection`` runs a streaming call's handler in a task of
its own; these are the two places that task waits. The bytes themselves are
``GrpcProtocol``'s (``prism.rpc.inbound`` for requests, ``prism.rpc.respond``
for answers), under the buffer budgets of ``prism.rpc.budget``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import trio

from prism.errors import InvalidArgument
from prism.rpc.call import Call
from prism.rpc.methods import Method
from prism.rpc.protocol import GrpcProtocol

# A streaming answer waits for the client once this much waits for its window
# (256 KiB let 100 unread streams make the server build ~320 K answers).
STREAM_HIGH_WATER: Final = 64 * 1024
# A handler held back by the worker's budget (which other connections free)
# looks again this often.
BUDGET_RECHECK_S: Final = 0.05


async def wait_for_room(proto: GrpcProtocol, call: Call, window_lot: trio.lowlevel.ParkingLot) -> None:
    """Hold a streaming handler back (its next message not asked for) while its answers
    wait for the client, past the high-water mark or the connection's or worker's budget.
    ``window_lot`` is unparked whenever the client's frames may have made room."""
    while not call.done and call.pending_bytes:
        if call.pending_bytes > STREAM_HIGH_WATER:
            await window_lot.park()
        elif proto.budget.full(proto.unwritten()) is not None:
            with trio.move_on_after(BUDGET_RECHECK_S):
                await window_lot.park()
        else:
            return


async def requests(
    proto: GrpcProtocol, call: Call, method: Method, input_lot: trio.lowlevel.ParkingLot
) -> AsyncIterator[Any]:
    """A streaming call's requests, decoded, as its handler asks for them: each taken
    from the protocol's buffer (which gives the client window back), waiting while
    none is whole. ``input_lot`` is unparked whenever the client's frames arrive."""
    while True:
        try:
            raw = proto.next_message(call)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if raw is not None:
            proto.on_output()  # a window it may have given back
            yield method.decode(raw)
        elif call.done:
            return
        elif call.half_closed:
            if proto.stream_tail(call):
                raise InvalidArgument("stream ended inside a message (truncated)")
            return
        else:
            await input_lot.park()
