"""An in-process TimeSeries backend: the reference for the contract and the
store for tests and development. Everything is lost on restart.

Each series keeps its events' positions ``(event_time_us, event_id)`` in a
sorted list beside a dict from position to event, so a range read is two
bisects and a slice. Events past retention are cut off the front of a series
when it is written, and every series is swept at most once a minute of
caller time.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator, Sequence

from prism.backends.memory.options import MemoryTimeSeriesOptions
from prism.backends.timeseries import (
    Cursor,
    Event,
    EventPage,
    check_events,
    horizon_us,
    page_events,
    retention_ms,
)

SWEEP_INTERVAL_MS = 60_000
_DEFAULTS = MemoryTimeSeriesOptions()  # frozen: one instance serves every default


class _Series:
    __slots__ = ("events", "positions")

    def __init__(self) -> None:
        self.positions: list[Cursor] = []
        self.events: dict[Cursor, Event] = {}

    def add(self, event: Event) -> None:
        pos = event.cursor
        if pos not in self.events:
            self.events[pos] = event
            insort(self.positions, pos)

    def drop_before(self, time_us: int) -> None:
        cut = bisect_left(self.positions, (time_us, ""))
        if cut:
            for pos in self.positions[:cut]:
                del self.events[pos]
            del self.positions[:cut]


class MemoryTimeSeriesBackend:
    """Options: ``MemoryTimeSeriesOptions`` (``retention_days``)."""

    def __init__(self, options: MemoryTimeSeriesOptions = _DEFAULTS) -> None:
        self.retention_ms = retention_ms(options.retention_days)
        self._series: dict[str, _Series] = {}
        self._next_sweep_ms = 0

    async def open(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def write_events(self, events: Sequence[Event], now_ms: int) -> None:
        check_events(events)
        horizon = horizon_us(self.retention_ms, now_ms)
        for e in events:
            if horizon is not None and e.event_time_us < horizon:
                continue  # accepted, and never returned
            series = self._series.get(e.series_id)
            if series is None:
                series = self._series[e.series_id] = _Series()
            series.add(e)
        if horizon is not None:
            self._purge(horizon, {e.series_id for e in events}, now_ms)

    def _purge(self, horizon: int, written: set[str], now_ms: int) -> None:
        if now_ms >= self._next_sweep_ms:
            self._next_sweep_ms = now_ms + SWEEP_INTERVAL_MS
            written = set(self._series)
        for sid in written:
            series = self._series.get(sid)
            if series is not None:
                series.drop_before(horizon)
                if not series.positions:
                    del self._series[sid]

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
        series = self._series.get(series_id)
        if series is None:
            return EventPage([], None)
        horizon = horizon_us(self.retention_ms, now_ms)
        bounds = [t for t in (start_us, horizon) if t is not None]
        pos = series.positions
        # An event_id is never empty, so (t, "") sorts before every event at t.
        lo = bisect_left(pos, (max(bounds), "")) if bounds else 0
        hi = len(pos) if end_us is None else bisect_left(pos, (end_us, ""))
        hi = max(lo, hi)
        if after is not None:  # strictly after the cursor, in the direction of travel
            if reverse:
                hi = bisect_left(pos, after, lo, hi)
            else:
                lo = bisect_right(pos, after, lo, hi)
        return page_events(self._walk(series, lo, hi, reverse), limit_items, limit_bytes)

    @staticmethod
    def _walk(series: _Series, lo: int, hi: int, reverse: bool) -> Iterator[Event]:
        idx = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        pos, events = series.positions, series.events
        return (events[pos[i]] for i in idx)
