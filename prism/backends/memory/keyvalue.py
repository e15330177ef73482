"""An in-process KeyValue backend: the reference for the contract, the store
for tests and benchmarks. Everything is lost on restart.

Each record keeps its items in parallel lists sorted by key (keys, stored
items, stamps), so a lookup is a bisect and reading a whole record is one
list copy: that read (GetItems, match_all, default limits) is the hot path
of the benchmark and takes the first branch of ``get_items``.

Expired items are dropped lazily. A record remembers a lower bound of its
items' expiry times; the first access at or after that bound purges it, so
every other code path can treat the record's items as live.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Sequence

from prism.backends.keyvalue import (
    IDEMPOTENCY_WINDOW_MS,
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
    StoredItem,
)
from prism.backends.paging import RecordPager, page_items
from prism.backends.rules import check_items, check_mutations, is_expired, is_replay

_NEVER = 1 << 63  # expiry bound of a record none of whose items expires

_StampKey = tuple[int, str]  # (generation_time_us, token): compares as the contract says


class _Record:
    __slots__ = ("expiry_bound", "items", "keys", "nbytes", "stamps")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.items: list[StoredItem] = []
        self.stamps: list[_StampKey] = []
        self.nbytes = 0  # sum of len(key) + len(value)
        self.expiry_bound = _NEVER  # <= every non-zero expires_at_ms held

    def put(self, item: ItemWrite, stamp: _StampKey, now_ms: int) -> None:
        keys = self.keys
        i = bisect_left(keys, item.key)
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
        if item.expires_at_ms and item.expires_at_ms < self.expiry_bound:
            self.expiry_bound = item.expires_at_ms

    def delete(self, predicate: Predicate, stamp: _StampKey) -> None:
        stamps = self.stamps
        doomed = {i for i in self.select(predicate, False, None) if stamps[i] <= stamp}
        if doomed:
            self._keep([i for i in range(len(self.keys)) if i not in doomed])

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

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._sorted_ids: list[str] | None = None  # built by the first scan, then kept
        self._applied: dict[tuple[str, str], int] = {}  # (id, token) -> applied_at_ms
        self._applied_log: deque[tuple[int, str, str]] = deque()  # to forget old tokens

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
        rec = self._records.get(id)
        if rec is not None:
            rec.delete(predicate, (stamp.generation_time_us, stamp.token))
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
                rec.delete(m.predicate, key)
        self._finish(id, rec, stamp.token, now_ms)

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
                empty.append(rid)  # dropped after the loop: it indexes ``ids``
                continue
            page = pager.add_record(rid, rec.items[:], rec.nbytes)
            if page is not None:
                self._drop_empty(empty)
                return page
        self._drop_empty(empty)
        return pager.last_page()

    def _replayed(self, id: str, token: str, now_ms: int) -> bool:
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
        if rec is not None and not rec.items:
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
