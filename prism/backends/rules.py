"""The KeyValue contract's rules that every backend applies the same way:
which writes are refused before anything is applied, when a token still
blocks a write, and when an item counts as gone. Shared so that the backends
cannot drift apart on them (paging is in ``paging``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prism.backends.keyvalue import (
    IDEMPOTENCY_WINDOW_MS,
    ItemWrite,
    MatchKeys,
    MatchRange,
    Mutation,
    Predicate,
    Put,
    StoredItem,
)
from prism.errors import InvalidArgument


def check_items(items: Iterable[ItemWrite | StoredItem]) -> None:
    """Reject writes no backend can store. Runs before anything is applied,
    so a bad item fails its whole write (and the write's token stays unused)."""
    for item in items:
        if not item.key:
            raise InvalidArgument("item key must not be empty")


def check_mutations(mutations: Sequence[Mutation]) -> None:
    """``check_items`` for the puts among ``mutations``."""
    check_items(m.item for m in mutations if isinstance(m, Put))


def is_replay(applied_at_ms: int | None, now_ms: int) -> bool:
    """Whether a token applied at ``applied_at_ms`` still blocks a write at ``now_ms``."""
    return applied_at_ms is not None and now_ms - applied_at_ms < IDEMPOTENCY_WINDOW_MS


def is_expired(expires_at_ms: int, now_ms: int) -> bool:
    """Whether an item with this expiry counts as absent at ``now_ms`` (0: never expires)."""
    return expires_at_ms != 0 and expires_at_ms <= now_ms


def key_range(predicate: Predicate) -> tuple[bytes, bytes] | None:
    """The range a delete with ``predicate`` leaves its tombstone on (``b""``,
    ``b""``: the whole record); None for ``MatchKeys`` (a tombstone per key)."""
    if isinstance(predicate, MatchKeys):
        return None
    if isinstance(predicate, MatchRange):
        return predicate.start, predicate.end
    return b"", b""


def in_range(key: bytes, start: bytes, end: bytes) -> bool:
    """Whether ``key`` is in [``start``, ``end``) (``end`` b"": to the last key)."""
    return start <= key and (not end or key < end)
