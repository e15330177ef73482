"""The calls of a workload: each operation's request bytes, and how its answer is checked.

A benchmark of wrong answers is worthless, so every answer is checked, and
cheaply enough that the load generator can keep up with a Prism worker:

- ``get``: record ``r<i>`` holds one item, key ``k``, whose value is
  :func:`value_of` ``(i)`` (its index in the first bytes, then a pattern),
  so the expected answer is known without asking: the answer's bytes must
  equal ``GetItemsResponse(items=[Item(k, value_of(i))])`` encoded here
  (checked against the server's own encoding when the run starts);
- ``put``: writes that same value again (so reads stay predictable) and
  expects an empty message;
- ``scan`` and ``read_events``: the answer is compared with the one learned
  for the same request when the run started (itself checked item by item);
  an answer that differs byte for byte (a fresh page token, another order)
  is decoded and checked item by item;
- ``write_events``: a new event (unique id) in series ``w<i>``; expects an
  empty message. ``read_events`` reads the seeded series ``s<i>``, which
  writes never touch, so its answers do not change;
- ``publish``: topic ``t<i>``; the answer must decode to a sequence > 0.

Messages are encoded by hand where they are fixed-shaped (field tags and
lengths: the protobuf wire format), since encoding through protobuf per call
would cost the generator more than the server spends decoding it.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

import msgspec

from prism.proto import common_pb2, kv_pb2, pubsub_pb2, timeseries_pb2

EMPTY_ANSWER = b"\x00\x00\x00\x00\x00"  # a gRPC frame holding an empty message
ITEM_KEY = b"k"
PATHS = {
    "get": b"/prism.kv.v1.KeyValue/GetItems",
    "put": b"/prism.kv.v1.KeyValue/PutItems",
    "scan": b"/prism.kv.v1.KeyValue/ScanItems",
    "write_events": b"/prism.timeseries.v1.TimeSeries/WriteEvents",
    "read_events": b"/prism.timeseries.v1.TimeSeries/ReadEvents",
    "publish": b"/prism.pubsub.v1.PubSub/Publish",
}
CACHE_BYTES = 64 << 20  # requests and expected answers kept per key, up to this much per process
PICKS = 1 << 16  # length of the precomputed (operation, key) sequence each process cycles through
SEED_TIME_US = 1_700_000_000_000_000  # seeded events' times: fixed, so answers repeat


class Spec(msgspec.Struct, frozen=True):
    """What a load process needs to build and check calls (sent to it as msgpack)."""

    namespace: str
    weights: dict[str, float]
    records: int
    value_bytes: int
    distribution: str
    zipf_skew: float
    events_per_series: int
    scan_limit: int
    learned: dict[str, dict[int, bytes]] = {}  # op -> key -> the answer frame learned at start


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, data: bytes) -> bytes:
    """A length-delimited field (string, bytes, message)."""
    return bytes((tag << 3 | 2,)) + _varint(len(data)) + data


_PATTERN = bytes((i * 37 + 11) % 256 for i in range(256 + 4096))


def value_of(i: int, size: int) -> bytes:
    """Record ``i``'s value: its index (4 bytes) then a pattern, ``size`` bytes in all."""
    head = i.to_bytes(4, "big")
    if size <= 4:
        return head[4 - size :]
    body = size - 4
    start = i % 256
    if body <= len(_PATTERN) - start:
        return head + _PATTERN[start : start + body]
    return head + (_PATTERN[start:] * (body // len(_PATTERN) + 2))[:body]


def record_id(i: int) -> str:
    return f"r{i}"


class Calls:
    """Builds each operation's request for key ``i`` and checks its answer."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self._ns = _field(1, spec.namespace.encode())
        self._events = itertools.count()
        self._tag = f"{random.getrandbits(48):012x}"
        # Fixed per key: built once, kept while they fit in CACHE_BYTES.
        per_key = 2 * spec.value_bytes + 64
        self._keep = spec.records * per_key <= CACHE_BYTES
        self._gets: dict[int, bytes] = {}
        self._puts: dict[int, bytes] = {}
        self._answers: dict[int, bytes] = {}
        self.build: dict[str, Callable[[int], bytes]] = {
            "get": self._get,
            "put": self._put,
            "scan": self._scan,
            "write_events": self._write_events,
            "read_events": self._read_events,
            "publish": self._publish,
        }
        self.check: dict[str, Callable[[int, bytes], bool]] = {
            "get": self._check_get,
            "put": _check_empty,
            "scan": self._check_scan,
            "write_events": _check_empty,
            "read_events": self._check_read_events,
            "publish": _check_publish,
        }

    # ---- requests (gRPC-framed)

    def _get(self, i: int) -> bytes:
        request = self._gets.get(i)
        if request is None:
            request = grpc_frame(self._ns + _field(2, record_id(i).encode()))
            if self._keep:
                self._gets[i] = request
        return request

    def _put(self, i: int) -> bytes:
        request = self._puts.get(i)
        if request is None:
            item = _field(1, ITEM_KEY) + _field(2, value_of(i, self.spec.value_bytes))
            request = grpc_frame(self._ns + _field(2, record_id(i).encode()) + _field(3, item))
            if self._keep:
                self._puts[i] = request
        return request

    def _scan(self, i: int) -> bytes:
        selection = common_pb2.Selection(limit_items=self.spec.scan_limit).SerializeToString()
        return grpc_frame(self._ns + _field(2, selection))

    def _write_events(self, i: int) -> bytes:
        event = timeseries_pb2.Event(
            series_id=f"w{i}",
            event_time_us=time.time_ns() // 1000,
            event_id=f"{self._tag}-{next(self._events)}",
            payload=value_of(i, self.spec.value_bytes),
        )
        return grpc_frame(self._ns + _field(2, event.SerializeToString()))

    def _read_events(self, i: int) -> bytes:
        request = timeseries_pb2.ReadEventsRequest(
            namespace=self.spec.namespace,
            series_id=f"s{i}",
            selection=common_pb2.Selection(limit_items=self.spec.events_per_series),
        )
        return grpc_frame(request.SerializeToString())

    def _publish(self, i: int) -> bytes:
        payload = value_of(i, self.spec.value_bytes)
        return grpc_frame(self._ns + _field(2, f"t{i}".encode()) + _field(3, payload))

    def seed_events(self, i: int) -> bytes:
        """WriteEvents of series ``s<i>``'s seeded events (what ``read_events`` reads)."""
        events = [seeded_event(i, n, self.spec.value_bytes) for n in range(self.spec.events_per_series)]
        request = timeseries_pb2.WriteEventsRequest(namespace=self.spec.namespace, events=events)
        return grpc_frame(request.SerializeToString())

    # ---- answers (the whole DATA of the answer: gRPC-framed)

    def expected_get(self, i: int) -> bytes:
        answer = self._answers.get(i)
        if answer is None:
            item = kv_pb2.Item(key=ITEM_KEY, value=value_of(i, self.spec.value_bytes))
            answer = grpc_frame(kv_pb2.GetItemsResponse(items=[item]).SerializeToString())
            if self._keep:
                self._answers[i] = answer
        return answer

    def _check_get(self, i: int, answer: bytes) -> bool:
        return answer == self.expected_get(i)

    def _check_scan(self, i: int, answer: bytes) -> bool:
        if answer == self.spec.learned.get("scan", {}).get(0):
            return True
        return self.scan_ok(answer)

    def scan_ok(self, answer: bytes) -> bool:
        """A ScanItems page: 1 to ``scan_limit`` seeded records, each holding exactly its value."""
        message = _message(answer)
        if message is None:
            return False
        try:
            page = kv_pb2.ScanItemsResponse.FromString(message)
        except Exception:
            return False
        if not 1 <= len(page.records) <= min(self.spec.scan_limit, self.spec.records):
            return False
        for record in page.records:
            if not record.id.startswith("r") or not record.id[1:].isdigit():
                return False
            i = int(record.id[1:])
            wanted = [(ITEM_KEY, value_of(i, self.spec.value_bytes))]
            if i >= self.spec.records or [(it.key, it.value) for it in record.items] != wanted:
                return False
        return True

    def _check_read_events(self, i: int, answer: bytes) -> bool:
        if answer == self.spec.learned.get("read_events", {}).get(i):
            return True
        return self.read_events_ok(i, answer)

    def read_events_ok(self, i: int, answer: bytes) -> bool:
        """Series ``s<i>``'s answer holds exactly its seeded events (ids and payloads)."""
        message = _message(answer)
        if message is None:
            return False
        try:
            events = timeseries_pb2.ReadEventsResponse.FromString(message).events
        except Exception:
            return False
        got = sorted((e.series_id, e.event_id, e.payload) for e in events)
        wanted = sorted(
            (e.series_id, e.event_id, e.payload)
            for e in (seeded_event(i, n, self.spec.value_bytes) for n in range(self.spec.events_per_series))
        )
        return got == wanted


def seeded_event(i: int, n: int, size: int) -> timeseries_pb2.Event:
    return timeseries_pb2.Event(
        series_id=f"s{i}", event_time_us=SEED_TIME_US + n, event_id=f"e{n}", payload=value_of(n + i, size)
    )


def _message(answer: bytes) -> bytes | None:
    """The message of a one-message gRPC answer, or None if it is not exactly one."""
    if len(answer) < 5 or answer[0] != 0 or int.from_bytes(answer[1:5], "big") != len(answer) - 5:
        return None
    return answer[5:]


def _check_empty(i: int, answer: bytes) -> bool:
    return answer == EMPTY_ANSWER


def _check_publish(i: int, answer: bytes) -> bool:
    message = _message(answer)
    if message is None:
        return False
    try:
        return pubsub_pb2.PublishResponse.FromString(message).sequence > 0
    except Exception:
        return False


def picks(spec: Spec, seed: int) -> list[tuple[str, int]]:
    """A sequence of (operation, key) drawn by the mix's weights and the key distribution."""
    rng = random.Random(seed)
    ops = rng.choices(list(spec.weights), weights=list(spec.weights.values()), k=PICKS)
    if spec.records == 1:
        keys = [0] * PICKS
    elif spec.distribution == "zipf":
        # P(rank k) ~ 1 / (k + 1) ** skew; rank k is record k (the hot keys come first).
        cum = list(itertools.accumulate(1.0 / (k + 1) ** spec.zipf_skew for k in range(spec.records)))
        keys = rng.choices(range(spec.records), cum_weights=cum, k=PICKS)
    else:
        keys = [rng.randrange(spec.records) for _ in range(PICKS)]
    return list(zip(ops, keys, strict=True))
