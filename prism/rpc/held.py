"""Refusals held back a moment, to go out with their connection's next write.

A read whose only output is the overload door's refusals
(``prism.rpc.respond``) is not written at once: its connection is held, and
its refusals go out with whatever that connection writes next (an answer),
or, if it writes nothing meanwhile, ``HOLD_S`` later, from one task that
writes for every connection held (``Held.run``). A read a quota refused is
written at once: its connection rests (``prism.rpc.rest``), and resting
connections' reads take turns 2 ms apart so that a neighbour's call waits
behind one of them at most; held, their writes would all go at once.

Overloaded, a worker refuses most calls, a few per read, and each read's
write was most of what a refusal cost: ~20 us per ``writev`` on loopback,
where the receiving side's TCP work runs on the sender's CPU, against ~4 us
for the refusals of a read themselves. At twice the load a worker can
serve, what refusals cost is taken from the calls it serves (``prism.limits.shed``).

A refused client hears a few milliseconds later; it was refused to make it
wait, and its pushback (``grpc-retry-pushback-ms``) is longer. Nothing else
is held: an answer, a window update, a PING's ACK, a GOAWAY are written as
they were, and take any held refusals with them.
"""

from __future__ import annotations

from typing import Final, Protocol

import trio

# The longest a refusal is held (trio's clock).
HOLD_S: Final = 0.005


class Holder(Protocol):
    """A connection whose refusals can be held (``prism.rpc.server.Connection``)."""

    held: bool

    def write_held(self) -> None: ...


class Held:
    """The connections whose refusals wait to be written, for one listener's
    connections; ``run`` writes them ``HOLD_S`` after the first was held."""

    def __init__(self) -> None:
        self._held: list[Holder] = []
        self._lot = trio.lowlevel.ParkingLot()

    def hold(self, conn: Holder) -> None:
        """Hold ``conn``'s queued refusals (nothing if it is held already)."""
        if conn.held:
            return
        conn.held = True
        self._held.append(conn)
        if len(self._held) == 1:
            self._lot.unpark()

    async def run(self) -> None:
        """Write what is held, ``HOLD_S`` after the first of each batch, until cancelled."""
        while True:
            if not self._held:
                await self._lot.park()
            await trio.sleep(HOLD_S)
            held, self._held = self._held, []
            for conn in held:
                conn.held = False
                conn.write_held()
