"""Resting a connection on which a quota refused a call.

A read with a call a quota refused (rps or concurrency, of the namespace or
its tenant) makes its connection wait ``LIMITED_REST_S`` before its next
read (``prism.rpc.server``). A client flooding a namespace past its rps, a
call or a few per read, cost its worker a wake-up, a read and a write per
refusal: 5,000 refused calls a second took 66-80% of a worker, and a
neighbour namespace's p99 (on another connection) went from 2.4 ms to 6-23
ms. Resting, the flood's calls wait in the kernel and come in fewer, larger
reads, and a client that waits for its answers before sending more
(HTTP/2's stream limit) sends fewer. Its calls within the quota wait up to
this long (it was told to back off); the worker's other connections are not
delayed.

And such reads, of all the worker's connections, are made at least
``LIMITED_READ_GAP_S`` apart: a flood over many connections takes its
turns, so the calls of other connections never wait behind more than one of
its reads (over more connections than a rest has gaps, each rests longer).

What waited out a rest waited for its own client's quota, not for the
worker: the reader dates such a read's calls from the rest's end for the
overload shedder (``prism.limits.shed``), which would otherwise take them
for late and shut its door to every call.
"""

from __future__ import annotations

from typing import Final

from prism.rpc.settings import ServerSettings

LIMITED_REST_S: Final = 0.02
LIMITED_READ_GAP_S: Final = 0.002


def turn(settings: ServerSettings, now: float) -> float:
    """When a connection that starts resting at ``now`` (trio's clock) may read
    again; the worker's next such read is booked ``LIMITED_READ_GAP_S`` later."""
    at = max(now + LIMITED_REST_S, settings.limited_read_at)
    settings.limited_read_at = at + LIMITED_READ_GAP_S
    return at
