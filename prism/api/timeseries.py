"""``prism.timeseries.v1.TimeSeries``: request checks and conversion, nothing stored here.

Each RPC validates its request (namespace known, series_id and event_id
non-empty, time range and page token sound), turns protobuf into the
backend's plain structs, and the backend's answer back into protobuf.
Semantics live in the backends (see ``prism/backends/timeseries.py``).
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Mapping
from typing import Final

from prism.backends.timeseries import Cursor, Event, TimeSeriesBackend
from prism.errors import InvalidArgument
from prism.proto import common_pb2, timeseries_pb2
from prism.rpc.call import CallContext
from prism.rpc.methods import READ, WRITE

from .namespaces import Held, Remote, elsewhere
from .pagetoken import PageTokens

SERVICE = timeseries_pb2.DESCRIPTOR.services_by_name["TimeSeries"]

DEFAULT_LIMIT_ITEMS = 1000
MAX_LIMIT_ITEMS = 10000
DEFAULT_LIMIT_BYTES = 1024 * 1024

_WRITE_OK = timeseries_pb2.WriteEventsResponse().SerializeToString()
_TIME = struct.Struct(">q")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _event(n: int, e: timeseries_pb2.Event) -> Event:
    if not e.series_id:
        raise InvalidArgument(f"events[{n}]: series_id must not be empty")
    if not e.event_id:
        raise InvalidArgument(f"events[{n}]: event_id must not be empty")
    return Event(e.series_id, e.event_time_us, e.event_id, e.payload, dict(e.tags))


def _encode_cursor(cursor: Cursor) -> bytes:
    return _TIME.pack(cursor[0]) + cursor[1].encode()


def _decode_cursor(raw: bytes | str) -> Cursor:
    # Sealed by us, so well formed unless issued by another service's request.
    if not isinstance(raw, bytes) or len(raw) <= _TIME.size:
        raise InvalidArgument("page_token was issued for another request")
    try:
        return _TIME.unpack_from(raw)[0], raw[_TIME.size :].decode()
    except UnicodeDecodeError:
        raise InvalidArgument("page_token was issued for another request") from None


class TimeSeries:
    """The TimeSeries service over this process's TimeSeries namespaces
    (the table's TimeSeries view); calls for any other go to ``remote``."""

    # What the access rules must allow, per RPC (prism.rpc.methods).
    actions: Final = {"ReadEvents": READ, "WriteEvents": WRITE}

    def __init__(
        self,
        namespaces: Mapping[str, Held[TimeSeriesBackend]],
        tokens: PageTokens,
        *,
        max_limit_bytes: int,
        remote: Remote | None = None,
    ) -> None:
        self.namespaces = namespaces
        self._tokens = tokens
        self._max_limit_bytes = max_limit_bytes
        self._remote = remote

    async def _elsewhere(self, namespace: str, call: CallContext) -> bytes:
        return await elsewhere(self._remote, namespace, call)

    def _limits(self, s: common_pb2.Selection) -> tuple[int, int]:
        items = min(s.limit_items or DEFAULT_LIMIT_ITEMS, MAX_LIMIT_ITEMS)
        nbytes = min(s.limit_bytes or DEFAULT_LIMIT_BYTES, self._max_limit_bytes)
        return items, nbytes

    async def WriteEvents(self, request: timeseries_pb2.WriteEventsRequest, call: CallContext) -> bytes:
        ns = call.namespace = request.namespace
        held = self.namespaces.get(ns)
        if held is None:
            return await self._elsewhere(ns, call)
        # All checked before the backend sees any: one bad event fails the batch.
        events = [_event(n, e) for n, e in enumerate(request.events)]
        if events:
            await held.backend.write_events(events, _now_ms())
        return _WRITE_OK

    async def ReadEvents(
        self, request: timeseries_pb2.ReadEventsRequest, call: CallContext
    ) -> timeseries_pb2.ReadEventsResponse | bytes:
        ns = call.namespace = request.namespace
        held = self.namespaces.get(ns)
        if held is None:
            return await self._elsewhere(ns, call)
        if not request.series_id:
            raise InvalidArgument("series_id must not be empty")
        start, end = request.start_time_us, request.end_time_us
        if start and end and start > end:
            raise InvalidArgument("start_time_us must not be after end_time_us")
        selection = request.selection
        limit_items, limit_bytes = self._limits(selection)
        fingerprint = hashlib.blake2b(
            b"\x00".join(
                (
                    b"events",
                    request.namespace.encode(),
                    request.series_id.encode(),
                    _TIME.pack(start),
                    _TIME.pack(end),
                    b"r" if selection.reverse else b"f",
                )
            ),
            digest_size=16,
        ).digest()
        after: Cursor | None = None
        if request.page_token:
            after = _decode_cursor(self._tokens.open(request.page_token, fingerprint))
        page = await held.backend.read_events(
            request.series_id,
            start or None,
            end or None,
            reverse=selection.reverse,
            after=after,
            limit_items=limit_items,
            limit_bytes=limit_bytes,
            now_ms=_now_ms(),
        )
        response = timeseries_pb2.ReadEventsResponse(
            events=[
                timeseries_pb2.Event(
                    series_id=e.series_id,
                    event_time_us=e.event_time_us,
                    event_id=e.event_id,
                    payload=e.payload,
                    tags=e.tags,
                )
                for e in page.events
            ]
        )
        if page.last is not None:
            response.next_page_token = self._tokens.seal(fingerprint, _encode_cursor(page.last))
        return response
