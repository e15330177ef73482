"""An in-process KeyValue backend: the reference for the contract, the store
for tests and benchmarks. Everything is lost on restart.

Each record keeps its items in parallel lists sorted by key (keys, stored
items, stamps), so a lookup is a bisect and reading a whole record is one
list copy: that read (GetItems, match_all, default limits) is the hot path
of the benchmark and takes the first branch of ``get_items``.

Expired items are dropped lazily. A record remembers a lower bound of its
items' expiry times; the first access at or after that bound purges it, so
every other code path can treat the record's items as live.

Tombstones (``prism.backends.keyvalue``) live beside the items, in two
dicts per record that are empty unless something was deleted: a put checks
them only then, and reads never look at them. A record stays while it holds
an item or a tombstone; tombstones past their time are forgotten, oldest
first, on later writes (as tokens are).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Sequence

from prism.backends.keyvalue import (
    IDEMPOTENCY_WINDOW_MS,
    ExportPage,
    ItemPage,
    ItemWrite,
    MatchAll,
    MatchKeys,
    MatchRange,
    Mutation,
    Predicate,
    Put,
    RecordPage,
    Stamp,
    StampedItem,
    StoredItem,
    export_page,
)
from prism.backends.options import DEFAULT_TOMBSTONE_TTL_S, tombstone_ttl_ms
from prism.backends.paging import RecordPager, page_items
from prism.backends.rules import check_items, check_mutations, in_range, is_expired, is_replay, key_range

_NEVER = 1 << 63  # expiry bound of a record none of whose items expires

_StampKey = tuple[int, str]  # (generation_time_us, token): compares as the contract says
_Tombstone = tuple[_StampKey, int]  # the delete's stamp, and when it is forgotten (ms)


def _holds(tomb: _Tombstone | None, stamp: _StampKey, now_ms: int) -> bool:
    """Whether ``tomb`` blocks a write stamped ``stamp`` at ``now_ms``."""
    return tomb is not None and tomb[0] > stamp and tomb[1] > now_ms


class _Record:
    __slots__ = ("expiry_bound", "items", "keys", "nbytes", "ranges", "stamps", "tombs")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.items: list[StoredItem] = []
        self.stamps: list[_StampKey] = []
        self.nbytes = 0  # sum of len(key) + len(value)
        self.expiry_bound = _NEVER  # <= every non-zero expires_at_ms held
        self.tombs: dict[bytes, _Tombstone] = {}  # key -> tombstone; never a key of ``keys``
        self.ranges: dict[tuple[bytes, bytes], _Tombstone] = {}  # (start, end) -> tombstone

    def empty(self) -> bool:
        return not self.items and not self.tombs and not self.ranges

    def _blocked(self, key: bytes, stamp: _StampKey, now_ms: int) -> bool:
        """Whether a tombstone holds back a write of ``key`` stamped ``stamp``."""
        if self.tombs and _holds(self.tombs.get(key), stamp, now_ms):
            return True
        return any(
            _holds(tomb, stamp, now_ms) and in_range(key, start, end)
            for (start, end), tomb in self.ranges.items()
        )

    def put(self, item: ItemWrite, stamp: _StampKey, now_ms: int) -> None:
        keys = self.keys
        i = bisect_left(keys, item.key)
        if (self.tombs or self.ranges) and self._blocked(item.key, stamp, now_ms):
            return
        if i < len(keys) and keys[i] == item.key:
            old = self.items[i]
            if self.stamps[i] > stamp and not is_expired(old.expires_at_ms, now_ms):
                return
            self.nbytes += len(item.value) - len(old.value)
            self.items[i] = StoredItem(item.key, item.value, item.expires_at_ms)
            self.stamps[i] = stamp
        else:
            keys.insert(i, item.key)
            self.items.insert(i, StoredItem(item.key, item.value, item.expires_at_ms))
            self.stamps.insert(i, stamp)
            self.nbytes += len(item.key) + len(item.value)
            self.tombs.pop(item.key, None)  # the put is newer: it takes the key's place
        if item.expires_at_ms and item.expires_at_ms < self.expiry_bound:
            self.expiry_bound = item.expires_at_ms

    def delete(self, predicate: Predicate, stamp: _StampKey, now_ms: int, forget_at_ms: int) -> None:
        """Remove what ``predicate`` matches and is not newer than ``stamp``,
        and leave its tombstones (to be forgotten at ``forget_at_ms``)."""
        stamps, items = self.stamps, self.items
        tomb = (stamp, forget_at_ms)
        if isinstance(predicate, MatchKeys):  # a tombstone in each key's place, unless a newer write holds it
            doomed = set()
            for key in set(predicate.keys):
                i = self.index(key)
                if i is not None:
                    if stamps[i] > stamp and not is_expired(items[i].expires_at_ms, now_ms):
                        continue
                    doomed.add(i)
                elif _holds(self.tombs.get(key), stamp, now_ms):
                    continue
                self.tombs[key] = tomb
        else:
            doomed = {i for i in self.select(predicate, False, None) if stamps[i] <= stamp}
            span = start, end = key_range(predicate) or (b"", b"")
            for key in [k for k, t in self.tombs.items() if t[0] <= stamp and in_range(k, start, end)]:
                del self.tombs[key]
            if not _holds(self.ranges.get(span), stamp, now_ms):
                self.ranges[span] = tomb
        if doomed:
            self._keep([i for i in range(len(self.keys)) if i not in doomed])

    def forget(self, now_ms: int) -> None:
        """Drop the tombstones past their time."""
        self.tombs = {k: t for k, t in self.tombs.items() if t[1] > now_ms}
        self.ranges = {r: t for r, t in self.ranges.items() if t[1] > now_ms}

    def purge(self, now_ms: int) -> None:
        """Drop expired items; a no-op until ``now_ms`` reaches the bound."""
        if now_ms < self.expiry_bound:
            return
        items = self.items
        self._keep([i for i, it in enumerate(items) if not is_expired(it.expires_at_ms, now_ms)])
        expiries = [it.expires_at_ms for it in self.items if it.expires_at_ms]
        self.expiry_bound = min(expiries, default=_NEVER)

    def _keep(self, kept: list[int]) -> None:
        keys, items, stamps = self.keys, self.items, self.stamps
        self.keys = [keys[i] for i in kept]
        self.items = [items[i] for i in kept]
        self.stamps = [stamps[i] for i in kept]
        self.nbytes = sum(len(it.key) + len(it.value) for it in self.items)

    def index(self, key: bytes) -> int | None:
        keys = self.keys
        i = bisect_left(keys, key)
        return i if i < len(keys) and keys[i] == key else None

    def select(self, predicate: Predicate, reverse: bool, after: bytes | None) -> Sequence[int]:
        """Indices of the matched items strictly after ``after``, in travel order."""
        keys = self.keys
        if isinstance(predicate, MatchKeys):
            found: list[int] = []
            for key in set(predicate.keys):
                i = bisect_left(keys, key)
                if i < len(keys) and keys[i] == key:
                    found.append(i)
            found.sort(reverse=reverse)
            if after is None:
                return found
            if reverse:
                return [i for i in found if keys[i] < after]
            return [i for i in found if keys[i] > after]
        lo, hi = 0, len(keys)
        if isinstance(predicate, MatchRange):
            if predicate.start:
                lo = bisect_left(keys, predicate.start)
            if predicate.end:
                hi = bisect_left(keys, predicate.end)
        if after is not None:
            if reverse:
                hi = min(hi, bisect_left(keys, after))
            else:
                lo = max(lo, bisect_right(keys, after))
        return range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)


class MemoryBackend:
    """KeyValue in dicts. Methods never await: each runs to completion, which
    makes every write atomic with respect to other calls."""

    def __init__(self, tombstone_ttl_s: float = DEFAULT_TOMBSTONE_TTL_S) -> None:
        self._records: dict[str, _Record] = {}
        self._sorted_ids: list[str] | None = None  # built by the first scan, then kept
        self._applied: dict[tuple[str, str], int] = {}  # (id, token) -> applied_at_ms
        self._applied_log: deque[tuple[int, str, str]] = deque()  # to forget old tokens
        self._tombstone_ttl_ms = tombstone_ttl_ms(tombstone_ttl_s)
        self._tomb_log: deque[tuple[int, str]] = deque()  # (forget_at_ms, id): to forget old tombstones

    async def open(self) -> None:
        """Nothing to open; present so that every backend is started the same way."""

    async def aclose(self) -> None:
        """Nothing to release; the data stays until the object goes."""

    async def get_items(
        self,
        id: str,
        predicate: Predicate,
        *,
        reverse: bool,
        after: bytes | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> ItemPage:
        return self.get_items_now(
            id,
            predicate,
            reverse=reverse,
            after=after,
            limit_items=limit_items,
            limit_bytes=limit_bytes,
            now_ms=now_ms,
        )

    def get_items_now(
        self,
        id: str,
        predicate: Predicate,
        *,
        reverse: bool,
        after: bytes | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> ItemPage:
        """``get_items`` (``prism.backends.keyvalue.ReadsNow``): nothing here waits."""
        rec = self._records.get(id)
        if rec is None:
            return ItemPage([], None)
        if (
            now_ms < rec.expiry_bound
            and isinstance(predicate, MatchAll)
            and not reverse
            and after is None
            and len(rec.items) <= limit_items
            and rec.nbytes <= limit_bytes
        ):
            return ItemPage(rec.items[:], None)
        rec.purge(now_ms)
        items = rec.items
        chosen = rec.select(predicate, reverse, after)
        return page_items((items[i] for i in chosen), limit_items, limit_bytes)

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        check_items(items)
        if self._replayed(id, stamp.token, now_ms):
            return
        rec = self._record(id, now_ms)
        key = (stamp.generation_time_us, stamp.token)
        for item in items:
            rec.put(item, key, now_ms)
        self._finish(id, rec, stamp.token, now_ms)

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        if self._replayed(id, stamp.token, now_ms):
            return
        rec = self._record(id, now_ms)
        self._delete(id, rec, predicate, (stamp.generation_time_us, stamp.token), now_ms)
        self._finish(id, rec, stamp.token, now_ms)

    async def mutate_items(self, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int) -> None:
        # Validating first is what makes this all or nothing: past this
        # point nothing can fail.
        check_mutations(mutations)
        if self._replayed(id, stamp.token, now_ms):
            return
        rec = self._record(id, now_ms)
        key = (stamp.generation_time_us, stamp.token)
        for m in mutations:
            if isinstance(m, Put):
                rec.put(m.item, key, now_ms)
            else:
                self._delete(id, rec, m.predicate, key, now_ms)
        self._finish(id, rec, stamp.token, now_ms)

    def _delete(self, id: str, rec: _Record, predicate: Predicate, stamp: _StampKey, now_ms: int) -> None:
        forget_at = now_ms + self._tombstone_ttl_ms
        rec.delete(predicate, stamp, now_ms, forget_at)
        log = self._tomb_log
        if not log or log[-1] != (forget_at, id):
            log.append((forget_at, id))

    async def scan_items(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> RecordPage:
        ids = self._ids()
        pager = RecordPager(limit_items, limit_bytes)
        empty: list[str] = []
        start = 0 if after is None else bisect_right(ids, after)
        for i in range(start, len(ids)):
            rid = ids[i]
            rec = self._records[rid]
            rec.purge(now_ms)
            if not rec.items:
                if rec.empty():
                    empty.append(rid)  # dropped after the loop: it indexes ``ids``
                continue
            page = pager.add_record(rid, rec.items[:], rec.nbytes)
            if page is not None:
                self._drop_empty(empty)
                return page
        self._drop_empty(empty)
        return pager.last_page()

    async def count_records(self, now_ms: int) -> int:
        """``Migratable``."""
        return len(self._records)

    async def export_records(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> ExportPage:
        """``Migratable``: as ``scan_items``, each item with its stamp."""
        ids = self._ids()
        pager = RecordPager(limit_items, limit_bytes)
        for i in range(0 if after is None else bisect_right(ids, after), len(ids)):
            rid = ids[i]
            rec = self._records[rid]
            rec.purge(now_ms)
            if not rec.items:
                continue
            stamped: list[StoredItem] = [
                StampedItem(it.key, it.value, it.expires_at_ms, us, token)
                for it, (us, token) in zip(rec.items, rec.stamps, strict=True)
            ]
            page = pager.add_record(rid, stamped, rec.nbytes)
            if page is not None:
                return export_page(page)
        return export_page(pager.last_page())

    async def import_records(self, records: Sequence[tuple[str, Sequence[StampedItem]]], now_ms: int) -> None:
        """``Migratable``: each item put under its own stamp; no token."""
        for _, items in records:
            check_items(items)
        for id, items in records:
            live = [it for it in items if not is_expired(it.expires_at_ms, now_ms)]
            if not live:
                continue
            self._replayed(id, "", now_ms)  # forgets tombstones past their time
            rec = self._record(id, now_ms)
            for it in live:
                rec.put(ItemWrite(it.key, it.value, it.expires_at_ms), (it.stamp_us, it.token), now_ms)
            self._finish(id, rec, "", now_ms)

    def _replayed(self, id: str, token: str, now_ms: int) -> bool:
        if self._tomb_log and self._tomb_log[0][0] <= now_ms:
            self._forget_tombstones(now_ms)
        if not token:
            return False
        # Forget tokens that left the window, oldest first; amortised O(1).
        horizon = now_ms - IDEMPOTENCY_WINDOW_MS
        log, applied = self._applied_log, self._applied
        while log and log[0][0] <= horizon:
            at, old_id, old_token = log.popleft()
            if applied.get((old_id, old_token)) == at:
                del applied[(old_id, old_token)]
        return is_replay(applied.get((id, token)), now_ms)

    def _forget_tombstones(self, now_ms: int) -> None:
        """Forget the tombstones past their time, oldest first; amortised O(1)."""
        log = self._tomb_log
        while log and log[0][0] <= now_ms:
            _, id = log.popleft()
            rec = self._records.get(id)
            if rec is not None:
                rec.forget(now_ms)
                if rec.empty():
                    self._drop_empty([id])

    def _record(self, id: str, now_ms: int) -> _Record:
        rec = self._records.get(id)
        if rec is None:
            rec = self._records[id] = _Record()
            if self._sorted_ids is not None:
                ids = self._sorted_ids
                ids.insert(bisect_left(ids, id), id)
        else:
            rec.purge(now_ms)
        return rec

    def _finish(self, id: str, rec: _Record | None, token: str, now_ms: int) -> None:
        if token:
            self._applied[(id, token)] = now_ms
            self._applied_log.append((now_ms, id, token))
        if rec is not None and rec.empty():
            self._drop_empty([id])

    def _ids(self) -> list[str]:
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self._records)
        return self._sorted_ids

    def _drop_empty(self, ids: list[str]) -> None:
        for id in ids:
            del self._records[id]
            if self._sorted_ids is not None:
                del self._sorted_ids[bisect_left(self._sorted_ids, id)]
