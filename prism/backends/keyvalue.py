"""The KeyValue backend Protocol and the plain data types it speaks.

Backends see neither protobuf nor gRPC: the API layer validates requests and
hands over these structs; backends return them. Every method receives the
caller's clock (``now_ms``) so that TTL behaves identically in every backend
and tests can drive time.

Semantics every backend implements (the contract suite checks them):

- Items of a record are ordered by key, unsigned bytewise.
- Each stored item remembers the stamp (``generation_time_us``, ``token``)
  of the write that produced it. A put of an item is skipped when the stored
  item's stamp is newer: stamps compare as the tuple (time, token).
  A delete removes only matched items whose stamp is not newer than its own.
- A delete leaves tombstones, kept for the namespace's ``tombstone_ttl_s``
  (the same stamp rule, so that a put stamped before a delete but arriving
  after it does not bring the item back): ``MatchKeys`` one per key named,
  held in the key's place (a key holds an item or a tombstone: whichever
  the newest-stamped write left); ``MatchRange`` and ``MatchAll`` one for
  the range (``b""``, ``b""`` for the whole record), which also removes the
  key tombstones in it that are not newer, and replaces an older one of the
  same range. A put of a key is skipped when a tombstone holding it, or a
  range tombstone covering it, is newer than the put and not yet past its
  time. Tombstones are never returned, and a record of tombstones only is
  absent from scans. Backends purge them once past their time, as they
  purge old tokens.
- A write whose non-empty token was already applied to the same
  (namespace, id) within ``IDEMPOTENCY_WINDOW_MS`` does nothing.
- Items with ``expires_at_ms`` != 0 and <= now_ms are never returned and
  count as absent.
- ``mutate_items`` applies its mutations in order, all or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast, runtime_checkable

import msgspec

IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000


class Stamp(msgspec.Struct, frozen=True):
    """When and by which token a write was made (client clock, or server's)."""

    generation_time_us: int
    token: str = ""


class ItemWrite(msgspec.Struct, frozen=True):
    key: bytes
    value: bytes
    expires_at_ms: int = 0  # absolute; 0 never


class StoredItem(msgspec.Struct, frozen=True):
    key: bytes
    value: bytes
    expires_at_ms: int = 0


class StampedItem(StoredItem, frozen=True):
    """A stored item with the stamp of the write that left it (``Migratable``):
    a copy made with it loses to any newer write, as the write itself would."""

    stamp_us: int = 0
    token: str = ""

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.stamp_us, self.token)


class MatchAll(msgspec.Struct, frozen=True, tag="all"):
    pass


class MatchKeys(msgspec.Struct, frozen=True, tag="keys"):
    keys: tuple[bytes, ...]


class MatchRange(msgspec.Struct, frozen=True, tag="range"):
    start: bytes = b""
    end: bytes = b""  # exclusive; b"" means to the last key


Predicate = MatchAll | MatchKeys | MatchRange


class Put(msgspec.Struct, frozen=True, tag="put"):
    item: ItemWrite


class Delete(msgspec.Struct, frozen=True, tag="delete"):
    predicate: Predicate


Mutation = Put | Delete


class ItemPage(msgspec.Struct, frozen=True):
    items: list[StoredItem]
    # Key of the last item returned when more remain, else None.
    last_key: bytes | None


class RecordPage(msgspec.Struct, frozen=True):
    records: list[tuple[str, list[StoredItem]]]
    # Id of the last record returned when more remain, else None.
    last_id: str | None


class ReadsNow(Protocol):
    """A backend whose reads never wait (the memory backend): the API answers
    its GetItems in the reader's step, without a task (``Method.now``)."""

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
    ) -> ItemPage: ...


class ExportPage(msgspec.Struct, frozen=True):
    """Records (whole, id order) with their items' stamps: ``Migratable.export_records``."""

    records: list[tuple[str, list[StampedItem]]]
    last_id: str | None  # id of the last record returned when more remain, else None


def export_page(page: RecordPage) -> ExportPage:
    """A ``RecordPage`` built from ``StampedItem``s (``paging.RecordPager`` takes
    any ``StoredItem``) as the ``ExportPage`` it is."""
    return ExportPage(cast(list[tuple[str, list[StampedItem]]], page.records), page.last_id)


@runtime_checkable
class KeyValueBackend(Protocol):
    """What a KeyValue backend provides. One instance serves one namespace."""

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None: ...

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
        """Matched live items of ``id`` in key order (or reverse), starting
        strictly after ``after`` (in the direction of travel). A page holds at
        most ``limit_items`` items and ``limit_bytes`` bytes of key + value,
        but at least one item if any remain."""
        ...

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None: ...

    async def mutate_items(
        self, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int
    ) -> None: ...

    async def scan_items(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> RecordPage:
        """Records (with their live items, key order) in id order strictly after
        ``after``. Records are never split: a page holds whole records, at
        least one if any remain, and stops before the record that would take
        it past ``limit_items`` items or ``limit_bytes`` bytes. Records with no
        live items are skipped."""
        ...

    async def open(self) -> None:
        """Connect, create files or tables: whatever must happen before serving."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Migratable(Protocol):
    """What a KeyValue backend provides so that a live migration
    (``prism.migrate``) can copy a namespace to or from it.

    ``export_records`` pages the live items with their stamps, as
    ``scan_items`` pages records (whole records, id order, strictly after
    ``after``, at least one if any remain). ``import_records`` applies each
    item as a put stamped with its own stamp, under the ordinary stamp rule:
    it is skipped where the backend holds a newer item, or a newer tombstone
    (key or range) for its key, so a copy never undoes a write made since the
    copy was read. Expiry is copied as is (absolute); items already expired
    at ``now_ms`` are not written. No idempotency token is checked or
    recorded: a copy is not a client's write. A call that fails may have
    applied part of its items; importing them again is harmless (the stamp
    rule), which is how a copy resumes."""

    async def export_records(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> ExportPage: ...

    async def import_records(
        self, records: Sequence[tuple[str, Sequence[StampedItem]]], now_ms: int
    ) -> None: ...

    async def count_records(self, now_ms: int) -> int:
        """How many records hold live items: the backfill's total, for the
        share copied and the time left in ``prism migrate status`` (read once
        as the copy starts; writes made since make it an estimate)."""
        ...


@runtime_checkable
class BatchWritable(Protocol):
    """A backend that takes several clients' puts in one go, cheaper than one
    by one (PostgreSQL: one statement, one round trip). A live migration
    delivers the writes queued for its second backend so (``prism.migrate.retry``).

    ``put_batch`` applies each put as ``put_items`` would: its own stamp
    under the stamp rule, its token claimed (a replay is skipped). The
    records are distinct (ValueError otherwise: one record's writes go one
    at a time, in order). A call that fails may have applied some of them;
    applying them again is harmless (stamp and token)."""

    async def put_batch(
        self, puts: Sequence[tuple[str, Sequence[ItemWrite], Stamp]], now_ms: int
    ) -> None: ...
