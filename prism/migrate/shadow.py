"""Shadow reads: a share of the reads answered by the source is read again from
the target, in the background, and the two answers compared.

What this says before ``promote`` is whether the target would have given the
client the same answer. Differences are counted by kind, per key:

- ``missing``: the source has the key, the target does not;
- ``extra``: the target has a key the source does not;
- ``value``: both have it, with different values;
- ``expiry``: the same value, a different expiry time.

A read that races a write (the write reached the source, not yet the target)
differs without anything being wrong, so a difference is confirmed before it
counts: once the target has every write of that record the source had
acknowledged (``delivered``: the target's copies are delivered after the
client's answer), and at least ``CONFIRM_AFTER_S`` later, both backends are
read again, the target first, and it counts only if the source still
answers as it did (no write came between) and the target still differs.
That order holds only while the source takes each write first: a read whose
confirmation a change of roles overtook (``promote`` and the target takes
writes first, the source gets them later; ``abort`` and the target gets none)
is inconclusive too (``epoch``: seen under load in CI, a write made just after
``promote`` on the target and not yet on the source counted as a difference).
Pages are compared up to the first end of either (a key past a page's end
is not a difference).

The client's answer never waits for any of this: ``submit`` only queues the
comparison (at most ``MAX_PENDING`` wait, the rest are skipped and counted),
and ``run`` compares with ``CONCURRENCY`` tasks. A sample of differences is
logged, with the namespace, id and key only (never a value), at most one line
per ``LOG_EVERY_S``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from prism.backends.keyvalue import ItemPage, KeyValueBackend, Predicate, StoredItem

log = logging.getLogger("prism.migrate")

KINDS: Final = ("missing", "extra", "value", "expiry")
MAX_PENDING: Final = 256
CONCURRENCY: Final = 4
CONFIRM_AFTER_S: Final = 0.25
READ_TIMEOUT_S: Final = 5.0
LOG_EVERY_S: Final = 10.0
_LOGGED_KEY_BYTES: Final = 64


@dataclass(frozen=True, slots=True)
class ShadowRead:
    """A GetItems's arguments, and the backends' roles as it was made."""

    id: str
    predicate: Predicate
    reverse: bool
    after: bytes | None
    limit_items: int
    limit_bytes: int
    now_ms: int
    epoch: int = 0  # the backends' roles as it was made (``Shadow``'s ``epoch``)

    async def read(self, backend: KeyValueBackend) -> ItemPage:
        return await backend.get_items(
            self.id,
            self.predicate,
            reverse=self.reverse,
            after=self.after,
            limit_items=self.limit_items,
            limit_bytes=self.limit_bytes,
            now_ms=self.now_ms,
        )


def differences(source: ItemPage, target: ItemPage, *, reverse: bool) -> list[tuple[str, bytes]]:
    """(kind, key) for each key the two pages disagree on, up to the first page end."""
    ends = [p.items[-1].key for p in (source, target) if p.last_key is not None and p.items]
    if ends:
        cut = max(ends) if reverse else min(ends)

        def within(key: bytes) -> bool:
            return key >= cut if reverse else key <= cut
    else:

        def within(key: bytes) -> bool:
            return True

    ours: dict[bytes, StoredItem] = {i.key: i for i in source.items if within(i.key)}
    theirs: dict[bytes, StoredItem] = {i.key: i for i in target.items if within(i.key)}
    found: list[tuple[str, bytes]] = []
    for key in sorted(ours.keys() | theirs.keys(), reverse=reverse):
        a, b = ours.get(key), theirs.get(key)
        if b is None:
            found.append(("missing", key))
        elif a is None:
            found.append(("extra", key))
        elif a.value != b.value:
            found.append(("value", key))
        elif a.expires_at_ms != b.expires_at_ms:
            found.append(("expiry", key))
    return found


def _same(a: ItemPage, b: ItemPage) -> bool:
    return a.last_key == b.last_key and [(i.key, i.value, i.expires_at_ms) for i in a.items] == [
        (i.key, i.value, i.expires_at_ms) for i in b.items
    ]


class Shadow:
    """The comparisons of one namespace's shadow reads, and their counts."""

    def __init__(
        self,
        namespace: str,
        source: Callable[[], KeyValueBackend],
        target: Callable[[], KeyValueBackend],
        *,
        max_pending: int = MAX_PENDING,
        delivered: Callable[[str], Awaitable[None]] | None = None,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        self.namespace = namespace
        self._delivered = delivered
        self._epoch = epoch  # changes whenever the backends' roles do
        self._source = source
        self._target = target
        self._send, self._receive = trio.open_memory_channel[tuple[ShadowRead, ItemPage]](max_pending)
        self.reads = 0  # compared
        self.skipped = 0  # not compared: too many waiting, or a backend did not answer
        self.inconclusive = 0  # the source, or the roles, changed before a difference was confirmed
        self.mismatched_reads = 0
        self.mismatches: dict[str, int] = {}
        self._logged_at = -math.inf
        self._unlogged = 0

    def submit(self, read: ShadowRead, answer: ItemPage) -> None:
        """Queue ``read``, the source's ``answer`` to it, for comparison, never waiting."""
        try:
            self._send.send_nowait((read, answer))
        except trio.WouldBlock:
            self.skipped += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(self._compare_each)
            task_status.started()

    async def _compare_each(self) -> None:
        async for read, answer in self._receive:
            try:
                with trio.fail_after(READ_TIMEOUT_S * 4 + CONFIRM_AFTER_S):
                    await self.compare(read, answer)
            except Exception as exc:  # a backend down or slow: that read is not compared
                self.skipped += 1
                log.debug("namespace %s: shadow read of id %r not compared: %r", self.namespace, read.id, exc)

    async def compare(self, read: ShadowRead, answer: ItemPage) -> list[tuple[str, bytes]]:
        """Compare one read; the differences counted (none if it matched or was inconclusive)."""
        found = differences(answer, await read.read(self._target()), reverse=read.reverse)
        if found:
            await trio.sleep(CONFIRM_AFTER_S)
            if self._delivered is not None:
                with trio.move_on_after(READ_TIMEOUT_S):
                    await self._delivered(read.id)
            # The target first: a write that reached it before this read
            # reached the source before too, and the source's answer then
            # shows it (inconclusive). Read the other way round, a write
            # between the two reads made the target differ from a source
            # read just before it: a difference counted that was none.
            target = await read.read(self._target())
            again = await read.read(self._source())
            if not _same(again, answer) or (self._epoch is not None and self._epoch() != read.epoch):
                self.inconclusive += 1
                self.reads += 1
                return []
            found = differences(again, target, reverse=read.reverse)
        self.reads += 1
        if found:
            self.mismatched_reads += 1
            for kind, _ in found:
                self.mismatches[kind] = self.mismatches.get(kind, 0) + 1
            self._log(read.id, found)
        return found

    def _log(self, id: str, found: list[tuple[str, bytes]]) -> None:
        now = trio.current_time()
        if now - self._logged_at < LOG_EVERY_S:
            self._unlogged += 1
            return
        kind, key = found[0]
        log.warning(
            "namespace %s: shadow read differs: id %r key %s: %s (%d keys differ in this read; "
            "%d reads differed unlogged since the last line)",
            self.namespace,
            id,
            key[:_LOGGED_KEY_BYTES].hex(),
            kind,
            len(found),
            self._unlogged,
        )
        self._logged_at = now
        self._unlogged = 0
