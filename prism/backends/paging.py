"""Where a KeyValue page ends, the same way in every backend.

Kept out of ``keyvalue`` so that the contract module stays declarative, and
shared so that the backends cannot drift apart on what the API layer turns
into page tokens (where a page ends, when ``last_key`` or ``last_id`` is
set). The other rules every backend applies alike are in ``rules``.
"""

from __future__ import annotations

from collections.abc import Iterable

from prism.backends.keyvalue import ItemPage, RecordPage, StoredItem


def page_items(items: Iterable[StoredItem], limit_items: int, limit_bytes: int) -> ItemPage:
    """The first page of ``items`` (live, already in travel order).

    Greedy: takes items until the next one would pass a limit, but always at
    least one. ``last_key`` is set only when an item was left over, which is
    why ``items`` must be able to yield one item past the page.
    """
    out: list[StoredItem] = []
    size = 0
    for item in items:
        n = len(item.key) + len(item.value)
        if out and (len(out) >= limit_items or size + n > limit_bytes):
            return ItemPage(out, out[-1].key)
        out.append(item)
        size += n
    return ItemPage(out, None)


class RecordPager:
    """Builds one ScanItems page: whole records in id order until the next
    would pass a limit, but always at least one. Records come whole
    (``add_record``) or row by row in (id, key) order (``add_row``, which
    stops as soon as the record being read can no longer fit, without
    reading the rest of it). Either returns the page once it is full."""

    def __init__(self, limit_items: int, limit_bytes: int) -> None:
        self._limit_items = limit_items
        self._limit_bytes = limit_bytes
        self._records: list[tuple[str, list[StoredItem]]] = []
        self._n_items = self._n_bytes = 0  # of the records in the page
        self._rid: str | None = None  # the record add_row is reading
        self._items: list[StoredItem] = []
        self._size = 0

    def _full(self, n_items: int, size: int) -> RecordPage | None:
        if self._records and (
            self._n_items + n_items > self._limit_items or self._n_bytes + size > self._limit_bytes
        ):
            return RecordPage(self._records, self._records[-1][0])
        return None

    def _append(self, rid: str, items: list[StoredItem], size: int) -> None:
        self._records.append((rid, items))
        self._n_items += len(items)
        self._n_bytes += size

    def add_record(self, rid: str, items: list[StoredItem], size: int) -> RecordPage | None:
        page = self._full(len(items), size)
        if page is None:
            self._append(rid, items, size)
        return page

    def add_row(self, rid: str, item: StoredItem) -> RecordPage | None:
        if rid != self._rid:
            if self._rid is not None:
                self._append(self._rid, self._items, self._size)
            self._rid, self._items, self._size = rid, [], 0
        self._items.append(item)
        self._size += len(item.key) + len(item.value)
        return self._full(len(self._items), self._size)

    def last_page(self) -> RecordPage:
        """The page when the records ran out first."""
        if self._rid is not None:
            self._append(self._rid, self._items, self._size)
            self._rid = None
        return RecordPage(self._records, None)
