"""The TimeSeries backend Protocol, its plain data types, and the rules every
TimeSeries backend applies the same way (input checks, retention, paging).

Backends see neither protobuf nor gRPC. Every method receives the caller's
clock (``now_ms``) so that retention behaves identically in every backend and
tests can drive time.

Semantics every backend implements (the contract suite checks them):

- An event's identity is (series_id, event_time_us, event_id). Writing an
  identity again changes nothing: the first write stays, also within a batch.
- A batch holding an invalid event (empty series_id or event_id) is rejected
  whole, before anything is written.
- A series reads in (event_time_us, event_id) order, ``event_id`` compared by
  code point (the same order as SQLite's BINARY collation on UTF-8);
  ``reverse`` reverses both.
- With ``retention_days`` set, an event whose time is before
  ``now - retention`` is never returned (also when it was written already
  expired) and is eventually purged. Without it events are kept forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import msgspec

from prism.errors import InvalidArgument

DAY_MS = 24 * 3600 * 1000

Cursor = tuple[int, str]  # (event_time_us, event_id) of the last event returned


class Event(msgspec.Struct, frozen=True):
    series_id: str
    event_time_us: int
    event_id: str
    payload: bytes = b""
    tags: dict[str, str] = {}

    @property
    def cursor(self) -> Cursor:
        return (self.event_time_us, self.event_id)


class EventPage(msgspec.Struct, frozen=True):
    events: list[Event]
    # Position of the last event returned when more remain, else None.
    last: Cursor | None


@runtime_checkable
class TimeSeriesBackend(Protocol):
    """What a TimeSeries backend provides. One instance serves one namespace."""

    async def write_events(self, events: Sequence[Event], now_ms: int) -> None:
        """Store ``events`` (all or nothing), skipping identities already stored."""
        ...

    async def read_events(
        self,
        series_id: str,
        start_us: int | None,
        end_us: int | None,
        *,
        reverse: bool,
        after: Cursor | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> EventPage:
        """Retained events of ``series_id`` with ``start_us <= time < end_us``
        (None: unbounded) in order (or reverse), strictly after ``after`` in
        the direction of travel. A page holds at most ``limit_items`` events
        and ``limit_bytes`` payload bytes, but at least one if any remain."""
        ...

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...


def retention_ms(retention_days: float) -> int:
    """The ``retention_days`` option in milliseconds; 0 keeps events forever."""
    return int(retention_days * DAY_MS)


def horizon_us(retention_ms: int, now_ms: int) -> int | None:
    """Events with a time before this are past retention; None: keep all."""
    return (now_ms - retention_ms) * 1000 if retention_ms else None


def check_events(events: Iterable[Event]) -> None:
    """Runs before anything is stored, so one bad event fails its whole batch."""
    for n, e in enumerate(events):
        if not e.series_id:
            raise InvalidArgument(f"events[{n}]: series_id must not be empty")
        if not e.event_id:
            raise InvalidArgument(f"events[{n}]: event_id must not be empty")


def page_events(events: Iterable[Event], limit_items: int, limit_bytes: int) -> EventPage:
    """The first page of ``events`` (retained, in travel order).

    Greedy: takes events until the next one would pass a limit, but always at
    least one. ``last`` is set only when an event was left over, which is why
    ``events`` must be able to yield one event past the page.
    """
    out: list[Event] = []
    size = 0
    for e in events:
        n = len(e.payload)
        if out and (len(out) >= limit_items or size + n > limit_bytes):
            return EventPage(out, out[-1].cursor)
        out.append(e)
        size += n
    return EventPage(out, None)
